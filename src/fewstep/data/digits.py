"""``data=digits``: class-conditional 8×8 digits for the embedded default."""

from __future__ import annotations

import torch

from fewstep.data.digits_split import NUM_CLASSES, SIDE, load_digits_split
from fewstep.data.memory import InMemoryData
from fewstep.eval.digits import DigitsEvaluator, eval_labels, eval_noise


class DigitsData(InMemoryData):
    """1,500 (``split=train``) or 1,797 (``split=all``) real digits as (1, 8, 8) images in [-1, 1];
    condition = class label, null condition = label 10."""

    def __init__(self, batch_size: int = 128, split: str = "train"):
        d = load_digits_split()
        if split not in ("train", "all"):
            raise ValueError(f"data.split={split!r} is unknown; use 'train' or 'all'")
        x, y = (d["x_train"], d["y_train"]) if split == "train" else (d["x_all"], d["y_all"])
        super().__init__(
            x=torch.from_numpy(x).reshape(-1, 1, SIDE, SIDE),
            labels=torch.from_numpy(y),
            num_classes=NUM_CLASSES,
            batch_size=batch_size,
        )

    def grid_conds(self, n: int) -> torch.Tensor:
        """Labels for an n-sample grid: row-major, one class per column when n is a multiple of 10."""
        return torch.arange(n) % NUM_CLASSES

    def evaluator(self):

        return DigitsEvaluator()

    def eval_inputs(self):
        """The evaluation protocol's labels (100 per class) and fixed noise."""

        labels = torch.as_tensor(eval_labels())
        return eval_noise(self.shape, len(labels)), labels
