"""The flow path, once: interpolation, reconstructions and time conventions.

Conventions (SPEC §2): data ``x``, noise ``z``, time ``t`` in [0, 1] with
``t = 1`` pure noise; ``x_t = t·z + (1 − t)·x`` and velocity ``v = z − x``.
Negative times address the fake (self-generated) trajectory: the network sees
the signed time, the path arithmetic uses ``|t|``.
"""

from __future__ import annotations

import torch


def expand_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample time (B,) so it broadcasts against ``ref`` (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (ref.ndim - 1))).to(ref.dtype)


def interpolate(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point on the straight path: ``x_t = |t|·z + (1 − |t|)·x``."""
    tb = expand_like(t.abs(), x)
    return tb * z + (1 - tb) * x


def reconstruct(x_t: torch.Tensor, F: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and noise estimates from a velocity: ``x̂ = x_t − |t|·F``, ``ẑ = x_t + (1 − |t|)·F``."""
    tb = expand_like(t.abs(), x_t)
    return x_t - tb * F, x_t + (1 - tb) * F


def full_time(t: float | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """A (n,) time vector filled with ``t`` on ``like``'s device and dtype."""
    if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == n:
        return t.to(device=like.device, dtype=like.dtype)
    return torch.full((n,), float(t), device=like.device, dtype=like.dtype)
