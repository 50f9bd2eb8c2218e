"""A toy data source that injects NaN into chosen batches (fault-injection tests)."""

from __future__ import annotations

from fewstep.data.toy2d import Toy2DData


class NaNToy2D(Toy2DData):
    nan_positions: set[int] = set()

    def batches(self, seed, position=0, rank=0, world=1):
        for batch in super().batches(seed, position, rank, world):
            if position in self.nan_positions:
                batch.x[0, 0] = float("nan")
            position += 1
            yield batch
