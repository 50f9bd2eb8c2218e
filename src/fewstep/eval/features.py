"""Hook for user-supplied feature extractors (latent or image data): FD and k-NN precision/recall.

Nothing is downloaded: you bring the extractor (any ``Callable[[Tensor], Tensor]``
mapping a batch (B, ...) of samples to features (B, ...), flattened to (B, D))
and a file of features of real data computed with that same extractor.

Typical use::

    from fewstep.eval.features import FeatureExtractorEvaluator

    extractor = my_encoder.eval()  # e.g. a VAE/CLIP/Inception wrapper you load yourself
    # once: cache real-data features (a Tensor, or an iterable of batches / (x, label) tuples)
    FeatureExtractorEvaluator.save_real_features(extractor, real_loader, "cache/real_feats.npy", device="cuda")
    # every evaluation:
    ev = FeatureExtractorEvaluator(extractor, "cache/real_feats.npy", device="cuda")
    metrics = ev.evaluate(samples)  # {"fd": ..., "precision": ..., "recall": ...}

Real-feature files: ``.npy`` (an (N, D) array), ``.npz`` (key ``features`` or
its only array), or ``.pt``/``.pth`` (a tensor, or a dict with key
``features``; loaded with ``weights_only=True``). Metrics: ``fd`` =
:func:`~fewstep.eval.metrics.frechet_distance` of generated vs all real
features; ``precision``/``recall`` = k-NN manifold metrics (k=5) on at most
``max_pr_samples`` real and generated features (random subsets, seed 0, when
larger — the k-NN part is O(N^2)).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.eval.metrics import (
    as_features,
    feature_stats,
    frechet_distance_from_stats,
    knn_radii,
    manifold_coverage,
)

Extractor = Callable[[torch.Tensor], torch.Tensor]


def load_features(path: str | os.PathLike) -> np.ndarray:
    """Read an (N, D) float64 feature array from ``.npy`` / ``.npz`` / ``.pt`` / ``.pth``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"real-feature file {path} not found; compute it once with "
            "FeatureExtractorEvaluator.save_real_features(extractor, real_data, path) (nothing is downloaded)"
        )
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "features" in z.files:
                arr = z["features"]
            elif len(z.files) == 1:
                arr = z[z.files[0]]
            else:
                raise ValueError(f"{path}: expected key 'features' or a single array, found {z.files}")
    elif suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj["features"]
        arr = obj
    else:
        raise ValueError(f"unsupported feature file type {suffix!r} (use .npy, .npz, .pt or .pth)")
    return as_features(arr)


def _batches(data: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(data)
        for i in range(0, t.shape[0], batch_size):
            yield t[i : i + batch_size]
        return
    for item in data:  # an iterable of batches, e.g. a DataLoader; take x from (x, y, ...) tuples
        if isinstance(item, (tuple, list)):
            item = item[0]
        elif isinstance(item, dict):
            item = item["x"]
        yield torch.as_tensor(item)


@torch.no_grad()
def extract_features(
    extractor: Extractor, data: Any, *, batch_size: int = 256, device: torch.device | str | None = None
) -> np.ndarray:
    """Run ``extractor`` over ``data`` (Tensor/array (N, ...) or an iterable of batches) -> (N, D) float64."""
    out = []
    for xb in _batches(data, batch_size):
        if device is not None:
            xb = xb.to(device)
        f = extractor(xb)
        out.append(f.detach().reshape(f.shape[0], -1).double().cpu().numpy())
    if not out:
        raise ValueError("no data to extract features from")
    return np.concatenate(out)


class FeatureExtractorEvaluator:
    """FD + k-NN precision/recall of generated samples vs cached real features, in a user extractor's space.

    Args:
        extractor: maps a batch (B, ...) of samples (already in the data space
            the extractor expects, moved to ``device`` if given) to (B, ...) features.
        real_features_path: features of real data from the same extractor
            (see :meth:`save_real_features` and the module docstring for formats).
        k: neighbourhood size of precision/recall.
        batch_size: extractor batch size.
        device: where batches are moved before calling ``extractor`` (None: left as given).
        max_pr_samples: cap on the real and generated sets used for precision/recall.

    ``evaluate(x, y=None)`` returns ``{"fd", "precision", "recall"}``; ``y`` is ignored.
    Real statistics are loaded and computed once per evaluator.
    """

    def __init__(
        self,
        extractor: Extractor,
        real_features_path: str | os.PathLike,
        *,
        k: int = 5,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        max_pr_samples: int = 10_000,
    ) -> None:
        self.extractor = extractor
        self.real_features_path = Path(real_features_path)
        self.k = int(k)
        self.batch_size = int(batch_size)
        self.device = device
        self.max_pr_samples = int(max_pr_samples)
        self._real: dict[str, np.ndarray] | None = None

    @staticmethod
    def save_real_features(
        extractor: Extractor,
        real_data: Any,
        path: str | os.PathLike,
        *,
        batch_size: int = 256,
        device: torch.device | str | None = None,
    ) -> np.ndarray:
        """Extract features of ``real_data`` and save them to ``path`` (``.npy`` / ``.npz`` / ``.pt``); returns them."""
        feats = extract_features(extractor, real_data, batch_size=batch_size, device=device)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            np.save(path, feats)
        elif suffix == ".npz":
            np.savez(path, features=feats)
        elif suffix in (".pt", ".pth"):
            torch.save({"features": torch.from_numpy(feats)}, path)
        else:
            raise ValueError(f"unsupported feature file type {suffix!r} (use .npy, .npz, .pt or .pth)")
        return feats

    def _subset(self, feats: np.ndarray) -> np.ndarray:
        if feats.shape[0] <= self.max_pr_samples:
            return feats
        idx = np.random.default_rng(0).choice(feats.shape[0], size=self.max_pr_samples, replace=False)
        return feats[np.sort(idx)]

    @property
    def real_stats(self) -> dict[str, np.ndarray]:
        """Cached real features' mean, covariance, precision/recall subset and its k-NN radii."""
        if self._real is None:
            feats = load_features(self.real_features_path)
            mu, sigma = feature_stats(feats)
            pr = self._subset(feats)
            self._real = {"mu": mu, "sigma": sigma, "pr_feats": pr, "radii": knn_radii(pr, self.k)}
        return self._real

    def features(self, x: Any) -> np.ndarray:
        """Extractor features (N, D), float64, of samples ``x``."""
        return extract_features(self.extractor, x, batch_size=self.batch_size, device=self.device)

    def evaluate(self, x: Any, y: Any = None) -> dict[str, float]:
        real = self.real_stats
        feats = self.features(x)
        if feats.shape[1] != real["mu"].shape[0]:
            raise ValueError(f"feature dim {feats.shape[1]} != real feature dim {real['mu'].shape[0]}")
        mu, sigma = feature_stats(feats)
        fake_pr = self._subset(feats)
        return {
            "fd": frechet_distance_from_stats(mu, sigma, real["mu"], real["sigma"]),
            "precision": manifold_coverage(real["pr_feats"], real["radii"], fake_pr),
            "recall": manifold_coverage(fake_pr, knn_radii(fake_pr, self.k), real["pr_feats"]),
        }
