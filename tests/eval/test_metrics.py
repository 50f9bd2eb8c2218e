"""Metric primitives (FD, k-NN precision/recall, sliced Wasserstein) and the 2-D toy evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.data.toy2d_dists import TOY2D_NAMES, sample_toy2d
from fewstep.eval.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    precision_recall,
    random_directions,
    sliced_wasserstein,
)
from fewstep.eval.toy2d import Toy2DEvaluator


def samples_with_moments(mu: np.ndarray, sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean / ddof=1 covariance are exactly ``mu`` / ``sigma`` (up to round-off)."""
    z = np.random.default_rng(seed).standard_normal((n, mu.size))
    z -= z.mean(axis=0)
    c = z.T @ z / (n - 1)
    z = z @ np.linalg.inv(np.linalg.cholesky(c)).T
    return z @ np.linalg.cholesky(sigma).T + mu


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Fréchet distance


def test_fd_identical_sets_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 32)) * 3.0 + 1.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(x).float()) == pytest.approx(0.0, abs=1e-6)


def test_fd_closed_form_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ev_a, ev_b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    s_a, s_b = (q * ev_a) @ q.T, (q * ev_b) @ q.T
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(ev_a) - np.sqrt(ev_b)) ** 2)
    xa, xb = samples_with_moments(mu_a, s_a, 400, 2), samples_with_moments(mu_b, s_b, 300, 3)
    assert frechet_distance(xa, xb) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(expected, rel=1e-9)


def test_fd_closed_form_non_commuting_2d():
    # for 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); here M ~ S1 S2 (similar matrices)
    s1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    s2 = np.array([[0.3, -0.2], [-0.2, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    tr_covmean = math.sqrt(np.trace(s1 @ s2) + 2.0 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    xa, xb = samples_with_moments(mu1, s1, 50, 4), samples_with_moments(mu2, s2, 80, 5)
    assert frechet_distance(xa, xb) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(xb, xa) == pytest.approx(expected, rel=1e-6)


def test_fd_general_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(6)
    s1, s2 = random_spd(12, rng), random_spd(12, rng)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fd_robust_to_rank_deficient_covariances():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) + 0.5
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-7)
    const = np.ones((10, 8))  # zero covariance
    assert frechet_distance(const, const + 2.0) == pytest.approx(8 * 4.0)


def test_feature_stats_ddof1():
    x = np.random.default_rng(8).standard_normal((50, 3))
    mu, s = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(s, np.cov(x, rowvar=False))


# ----------------------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets_is_one():
    x = np.random.default_rng(9).standard_normal((300, 16))
    assert precision_recall(x, x, k=5) == (1.0, 1.0)
    dup = np.concatenate([x, x[:50]])  # duplicates (zero radii) must not break it
    assert precision_recall(dup, dup, k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_and_subset():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((400, 8))
    far = rng.standard_normal((300, 8)) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # mode collapse: fakes are a tight cluster of real points -> high precision, low recall
    collapsed = real[:1] + 1e-3 * rng.standard_normal((200, 8))
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1


# ----------------------------------------------------------------------------- sliced Wasserstein


def test_swd_identical_is_zero_and_shift_is_exact():
    a = np.random.default_rng(11).standard_normal((1000, 2))
    assert sliced_wasserstein(a, a) == 0.0
    s = np.array([0.7, -1.2])
    expected = np.abs(random_directions(256, 2, seed=0) @ s).mean()
    assert sliced_wasserstein(a, a + s) == pytest.approx(expected, rel=1e-9)
    assert sliced_wasserstein(a + s, a) == pytest.approx(expected, rel=1e-9)
    # and, for uniform directions in 2-D, E|s.theta| = 2|s|/pi
    assert expected == pytest.approx(2.0 * np.linalg.norm(s) / math.pi, rel=0.05)


def test_swd_unequal_sizes_and_seed():
    a = np.random.default_rng(12).standard_normal((300, 2))
    s = np.array([0.0, 2.0])
    assert sliced_wasserstein(a, np.concatenate([a, a])) == pytest.approx(0.0, abs=1e-12)
    expected = np.abs(random_directions(64, 2, seed=3) @ s).mean()
    got = sliced_wasserstein(a, np.concatenate([a, a]) + s, n_projections=64, seed=3)
    assert got == pytest.approx(expected, rel=1e-9)
    b = np.random.default_rng(13).standard_normal((457, 2))
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a), rel=1e-12)


# ----------------------------------------------------------------------------- toy distributions


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_toy_sampler_deterministic(name):
    x1 = sample_toy2d(name, 2000, torch.Generator().manual_seed(5))
    x2 = sample_toy2d(name, 2000, torch.Generator().manual_seed(5))
    x3 = sample_toy2d(name, 2000, torch.Generator().manual_seed(6))
    assert x1.shape == (2000, 2) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.isfinite(x1).all() and x1.abs().max() < 2.5


def test_toy_sampler_shapes_of_distributions():
    g = torch.Generator().manual_seed(0)
    cb = sample_toy2d("checkerboard", 5000, g, dtype=torch.float64)
    assert ((torch.floor(cb[:, 0]) + torch.floor(cb[:, 1])) % 2 == 0).all()  # only "black" cells
    g8 = sample_toy2d("8gaussians", 5000, g, dtype=torch.float64)
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 1.5 * torch.stack([angles.cos(), angles.sin()], 1)
    assert torch.cdist(g8, centres).min(1).values.max() < 5 * 0.15 * 1.5
    moons = sample_toy2d("moons", 5000, g)
    assert moons.mean(0).abs().max() < 0.1 and moons[:, 0].abs().max() < 1.8
    with pytest.raises(ValueError):
        sample_toy2d("spirals", 10)


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_toy_evaluator_floor_below_ceiling(name):
    ev = Toy2DEvaluator(name)
    ref = ev.reference_points()
    assert ref["floor"]["swd"] < 0.08 < ref["ceiling"]["swd"]
    assert ref["floor"]["swd"] < ref["ceiling"]["swd"] / 4
    fresh = sample_toy2d(name, 1000, torch.Generator().manual_seed(99))
    assert ev.evaluate(fresh)["swd"] < 0.08
    with pytest.raises(ValueError):
        ev.evaluate(torch.zeros(10, 3))
