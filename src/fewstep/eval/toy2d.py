"""Quality of samples from the 2-D toy distributions: sliced Wasserstein to fresh data.

Protocol (fixed): the reference set is ``REF_SIZE`` = 10,000 fresh samples of
the distribution drawn with ``torch.Generator().manual_seed(REF_SEED)``
(independent of any training stream), and ``swd`` is
:func:`~fewstep.eval.metrics.sliced_wasserstein` with 256 projections, seed 0. Samples are scored
as drawn, not clamped (the digits protocol's clamp to [-1, 1] would cut the moons' tips at ±1.6).
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep.data.toy2d_dists import TOY2D_NAMES, sample_toy2d
from fewstep.eval.metrics import as_features, sliced_wasserstein

REF_SEED = 4321
REF_SIZE = 10_000
N_PROJECTIONS = 256
PROJ_SEED = 0


class Toy2DEvaluator:
    """``evaluate(x, y=None) -> {"swd": float}`` for samples ``x`` (N, 2) of toy distribution ``dataset_name``."""

    def __init__(self, dataset_name: str, n_ref: int = REF_SIZE, n_projections: int = N_PROJECTIONS) -> None:
        if dataset_name not in TOY2D_NAMES:
            raise ValueError(f"unknown toy distribution {dataset_name!r}; expected one of {TOY2D_NAMES}")
        self.dataset_name = dataset_name
        self.n_ref = int(n_ref)
        self.n_projections = int(n_projections)
        self._ref = None
        self._refpoints: dict[str, dict[str, float]] | None = None

    @property
    def reference(self):
        """The fixed reference samples (n_ref, 2), float64 numpy; drawn once."""
        if self._ref is None:
            g = torch.Generator().manual_seed(REF_SEED)
            self._ref = as_features(sample_toy2d(self.dataset_name, self.n_ref, g, dtype=torch.float64))
        return self._ref

    def evaluate(self, x: Any, y: Any = None) -> dict[str, float]:
        """Sliced W1 between ``x`` (N, 2) and the reference; ``y`` is accepted and ignored (unconditional)."""
        feats = as_features(x)
        if feats.shape[1] != 2:
            raise ValueError(f"toy samples must be (N, 2), got {tuple(feats.shape)}")
        return {"swd": sliced_wasserstein(feats, self.reference, n_projections=self.n_projections, seed=PROJ_SEED)}

    def reference_points(self, n: int = 1000) -> dict[str, dict[str, float]]:
        """Floor (``n`` fresh data samples, seed 0) and ceiling (``n`` N(0, I) samples, seed 0) scores."""
        if self._refpoints is None:
            data = sample_toy2d(self.dataset_name, n, torch.Generator().manual_seed(0), dtype=torch.float64)
            noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            self._refpoints = {"floor": self.evaluate(data), "ceiling": self.evaluate(noise)}
        return self._refpoints
