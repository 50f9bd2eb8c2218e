"""``data=toy2d``: unconditional 2-D toy distributions, drawn fresh for every batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fewstep.data.base import Batch
from fewstep.data.toy2d_dists import sample_toy2d
from fewstep.eval.toy2d import Toy2DEvaluator


class Toy2DData:
    num_classes = 1
    shape = (2,)
    value_range = None  # the points are scored as sampled (moons spans about ±1.6): no clamp to [-1, 1]

    def __init__(self, batch_size: int = 256, name: str = "moons"):

        self.sample = sample_toy2d
        self.batch_size = int(batch_size)
        self.name = name
        self.sample(name, 1, torch.Generator().manual_seed(0))  # fail fast on an unknown name

    def null_cond(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def grid_conds(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long)

    def batches(self, seed: int, position: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        while True:
            gen = torch.Generator().manual_seed(((seed * 1_000_003) + position) * 64 + rank)
            x = self.sample(self.name, self.batch_size, gen)
            position += 1
            yield Batch(x, torch.zeros(self.batch_size, dtype=torch.long), self.null_cond(self.batch_size))

    def reference_points(self, n: int = 1000) -> torch.Tensor:
        """Fixed draws of the distribution, drawn behind the sample scatters."""
        return self.sample(self.name, n, torch.Generator().manual_seed(4321))

    def evaluator(self):

        return Toy2DEvaluator(self.name)

    def eval_inputs(self):
        gen = torch.Generator().manual_seed(1234)
        return torch.randn(2000, 2, generator=gen), torch.zeros(2000, dtype=torch.long)
