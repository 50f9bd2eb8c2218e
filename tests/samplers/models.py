"""Small deterministic velocity models shared by the sampler tests."""

from __future__ import annotations

import torch
from torch import nn


class RandomVelocityMLP(nn.Module):
    """A fixed random MLP ``f(x_t, t, tt, cond)``: every input (including ``tt``) changes the output."""

    def __init__(self, shape=(2, 2, 2), cond_dim: int = 3, hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = int(torch.tensor(shape).prod())
        self.shape = tuple(shape)
        self.w1 = nn.Parameter(torch.randn(dim + 2 + cond_dim, hidden, generator=g) / (dim + 2 + cond_dim) ** 0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g) / hidden**0.5)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, tt, cond):
        self.calls.append((t.detach().clone(), tt.detach().clone()))
        h = torch.cat([x.flatten(1), t[:, None], tt[:, None], cond.to(x.dtype)], dim=1)
        return (torch.tanh(h @ self.w1.to(x.dtype)) @ self.w2.to(x.dtype)).reshape(x.shape)


class DiracVelocity:
    """Exact straight-path velocity when all data sit at ``target`` (the condition): ``F = (x_t − c)/t``."""

    def __init__(self):
        self.calls: list[tuple[int, float]] = []

    def __call__(self, x, t, tt, cond):
        self.calls.append((x.shape[0], float(t[0])))
        tb = t.abs().reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (x - cond.to(x.dtype)) / tb
