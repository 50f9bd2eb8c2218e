"""Shared machinery for data sets that fit in memory: a resumable, rank-aware batch stream."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fewstep.data.base import Batch


class InMemoryData:
    """Samples ``x`` (N, ...) with integer labels; label ``num_classes`` is the null condition.

    ``batches(seed, position, rank, world)`` yields an endless stream of
    ``batch_size``-row batches for this rank. Epoch ``e`` uses a permutation
    drawn from ``seed + e``; ``position`` counts global batches already taken,
    so a checkpoint resumes the exact data order.
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.x = x.float().contiguous()
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.shape = tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def null_cond(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def batches(self, seed: int, position: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        global_batch = self.batch_size * world
        per_epoch = len(self) // global_batch
        if per_epoch == 0:
            raise ValueError(
                f"data.batch_size={self.batch_size} x {world} processes exceeds the {len(self)} samples; "
                "lower data.batch_size"
            )
        while True:
            epoch, index = divmod(position, per_epoch)
            perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed + epoch))
            start = index * global_batch + rank * self.batch_size
            rows = perm[start : start + self.batch_size]
            position += 1
            yield Batch(self.x[rows], self.labels[rows], self.null_cond(len(rows)))
