"""Sample-quality metrics shared by every evaluator (numpy, float64).

* :func:`frechet_distance` — Fréchet distance between Gaussians fitted to two
  feature sets (FID-style): ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``.
  The matrix square roots are taken by symmetric eigendecomposition (negative
  round-off eigenvalues clipped to 0), which stays real and finite even for
  rank-deficient covariances (fewer samples than dimensions).
* :func:`precision_recall` — k-NN manifold precision/recall (Kynkäänniemi et
  al., 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models").
* :func:`sliced_wasserstein` — sliced 1-Wasserstein distance, meant for the
  2-D toy distributions.

All inputs may be numpy arrays or torch tensors of shape (N, D) (anything of
more dimensions is flattened to (N, -1)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_features",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "knn_radii",
    "manifold_coverage",
    "precision_recall",
    "random_directions",
    "sliced_wasserstein",
]


def as_features(x: Any) -> np.ndarray:
    """Convert ``x`` (numpy array, torch tensor or nested list) to a float64 (N, D) array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim > 2:
        arr = arr.reshape(arr.shape[0], -1)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, D) feature array, got shape {arr.shape}")
    return arr


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) (``ddof=1``; needs N >= 2) of ``feats`` in float64."""
    f = as_features(feats)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 samples to estimate a covariance")
    mu = f.mean(axis=0)
    c = f - mu
    sigma = (c.T @ c) / (f.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _sym_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``tr((S1 S2)^1/2)`` is evaluated as ``sum(sqrt(eig(S1^1/2 S2 S1^1/2)))`` — a
    symmetric PSD matrix, so no complex parts or ``sqrtm`` failures. The result
    is clipped at 0 (round-off can make identical inputs slightly negative).
    """
    mu1 = np.asarray(mu1, dtype=np.float64).reshape(-1)
    mu2 = np.asarray(mu2, dtype=np.float64).reshape(-1)
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _sym_sqrt(s1)
    m = root1 @ s2 @ root1
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * tr_covmean
    return max(fd, 0.0)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted (mean, ``ddof=1`` covariance) to two (N, D) feature sets."""
    mu_a, s_a = feature_stats(feats_a)
    mu_b, s_b = feature_stats(feats_b)
    return frechet_distance_from_stats(mu_a, s_a, mu_b, s_b)


# ----------------------------------------------------------------------------- precision / recall

_CHUNK = 1024


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), clipped at 0."""
    if b_sq is None:
        b_sq = np.einsum("ij,ij->i", b, b)
    a_sq = np.einsum("ij,ij->i", a, a)
    d = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each point of ``feats`` (N, D) to its k-th nearest *other* point of the same set."""
    feats = as_features(feats)
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    sq = np.einsum("ij,ij->i", feats, feats)
    radii = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        d = _sq_dists(feats[start : start + _CHUNK], feats, sq)
        rows = np.arange(d.shape[0])
        d[rows, start + rows] = -1.0  # self always sorts first, whatever round-off did
        # index 0 is self, so index k is the k-th nearest other point
        radii[start : start + _CHUNK] = np.partition(d, k, axis=1)[:, k]
    return radii


def manifold_coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of ``queries`` inside at least one ball (centre ``manifold[i]``, squared radius ``radii[i]``)."""
    manifold = as_features(manifold)
    queries = as_features(queries)
    radii = np.asarray(radii, dtype=np.float64)
    sq = np.einsum("ij,ij->i", manifold, manifold)
    # relative slack so a query equal to a manifold point is always inside despite matmul round-off
    tol = 1e-9 * (sq.max() + 1.0)
    inside = np.zeros(queries.shape[0], dtype=bool)
    for start in range(0, queries.shape[0], _CHUNK):
        d = _sq_dists(queries[start : start + _CHUNK], manifold, sq)
        inside[start : start + _CHUNK] = (d <= radii[None, :] + tol).any(axis=1)
    return float(inside.mean())


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 5) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al., 2019).

    The real (fake) manifold is the union of balls around every real (fake)
    feature with radius = distance to its k-th nearest neighbour in the same
    set. Precision = fraction of fake samples inside the real manifold;
    recall = fraction of real samples inside the fake manifold. Both in [0, 1];
    identical sets give (1, 1). Memory is chunked (1,024 rows at a time), time
    is O(N^2 D).
    """
    real = as_features(real_feats)
    fake = as_features(fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise ValueError("k must be >= 1")
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall


# ----------------------------------------------------------------------------- sliced Wasserstein


def random_directions(n_projections: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n_projections, dim) unit vectors drawn uniformly on the sphere with ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((n_projections, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def _w1_sorted(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Exact 1-D W1 per row between empirical distributions given by row-sorted samples (P, n) and (P, m)."""
    n, m = pa.shape[1], pb.shape[1]
    if n == m:
        return np.abs(pa - pb).mean(axis=1)
    # integrate |F_a^-1(t) - F_b^-1(t)| over t in [0, 1]: both quantile functions are step functions
    # whose breakpoints are i/n and j/m; on each piece between consecutive breakpoints both are constant
    t = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid = 0.5 * (t[:-1] + t[1:])
    width = np.diff(t)
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return (np.abs(pa[:, ia] - pb[:, ib]) * width[None, :]).sum(axis=1)


def sliced_wasserstein(a: Any, b: Any, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between sample sets ``a`` (N, D) and ``b`` (M, D).

    ``mean_theta W1(a·theta, b·theta)`` over ``n_projections`` directions from
    :func:`random_directions` (``seed``), each 1-D W1 computed exactly from the
    sorted projections (``mean |sorted(a·theta) - sorted(b·theta)|`` when N == M;
    exact quantile integration otherwise). For ``b = a + s`` it equals
    ``mean_theta |s·theta|`` exactly; with uniform directions in 2-D that is
    ``~ 2|s|/pi``.
    """
    fa = as_features(a)
    fb = as_features(b)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"dims differ: {fa.shape[1]} vs {fb.shape[1]}")
    theta = random_directions(n_projections, fa.shape[1], seed)
    pa = np.sort(theta @ fa.T, axis=1)
    pb = np.sort(theta @ fb.T, axis=1)
    return float(_w1_sorted(pa, pb).mean())
