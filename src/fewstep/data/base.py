"""The one batch type every data source yields, and helpers on conditions.

A condition is a tensor (class labels) or a dict of tensors (prompt
embeddings); every helper below maps over either form along dim 0, so
objectives never need to know which model family they train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Cond = Any  # torch.Tensor | dict[str, torch.Tensor]


def cond_map(fn: Callable[[torch.Tensor], torch.Tensor], cond: Cond) -> Cond:
    """Apply ``fn`` to every tensor of a condition."""
    if isinstance(cond, dict):
        return {k: fn(v) for k, v in cond.items()}
    return fn(cond)


def cond_select(cond: Cond, idx: torch.Tensor) -> Cond:
    """Rows ``idx`` (bool mask or index tensor) of a condition."""
    return cond_map(lambda v: v[idx], cond)


def cond_cat(*conds: Cond) -> Cond:
    """Concatenate conditions along the batch dimension."""
    first = conds[0]
    if isinstance(first, dict):
        return {k: torch.cat([c[k] for c in conds]) for k in first}
    return torch.cat(conds)


def cond_where(mask: torch.Tensor, a: Cond, b: Cond) -> Cond:
    """Row-wise choice: ``a`` where ``mask`` (B,) is true, else ``b``."""

    def pick(va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        m = mask.reshape(mask.shape[0], *([1] * (va.ndim - 1)))
        return torch.where(m, va, vb)

    if isinstance(a, dict):
        return {k: pick(a[k], b[k]) for k in a}
    return pick(a, b)


def cond_to(cond: Cond, device: torch.device | str) -> Cond:
    return cond_map(lambda v: v.to(device, non_blocking=True), cond)


def cond_len(cond: Cond) -> int:
    if isinstance(cond, dict):
        return next(iter(cond.values())).shape[0]
    return cond.shape[0]


@dataclass
class Batch:
    """Training data: samples ``x`` (B, ...), their condition, and the null
    (unconditional) condition of the same structure, used by CFG-style passes."""

    x: torch.Tensor
    cond: Cond
    null_cond: Cond

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device, non_blocking=True), cond_to(self.cond, device), cond_to(self.null_cond, device))

    def __len__(self) -> int:
        return self.x.shape[0]
