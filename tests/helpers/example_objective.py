"""A new objective as docs/objectives.md ("Adding an objective") describes it: this one Python module and one
YAML (``objective/pseudo_huber.yaml``, written by the test into a user config folder), nothing else touched.

Pseudo-Huber flow matching (the iCT distance): ``sqrt(‖f(x_t, t, t, c) − v‖² / d + c²) − c`` per sample, mean over
the batch (``d`` elements per sample). Small residuals weigh as L2, large ones as L1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fewstep.config.checks import check_range
from fewstep.data.base import Batch
from fewstep.objectives.base import EvalCounter, Objective, sample_time
from fewstep.path import interpolate

YAML = """\
defaults:
  - /schema/objective/pseudo_huber@_here_
  - _self_

c: 0.03
"""


@dataclass
class PseudoHuberConfig:
    _target_: str = "helpers.example_objective.PseudoHuberFlowMatching"
    target_step_count: int = 50
    c: float = 0.03
    time_dist: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


class PseudoHuberFlowMatching(Objective):
    name = "pseudo_huber"
    config_schema = PseudoHuberConfig
    samples_with_guidance = True  # a multi-step flow-matching model: samplers may apply CFG

    @classmethod
    def check_config(cls, cfg) -> None:
        check_range("objective.c", cfg.objective.c, 0, None, lo_open=True, hint=" (the distance's L2-to-L1 scale)")

    def __init__(self, target_step_count: int = 50, c: float = 0.03, time_dist=(1.0, 1.0, 1.0)):
        self.target_step_count, self.c, self.time_dist = int(target_step_count), float(c), tuple(time_dist)

    def loss(self, student, teacher, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        x, b = batch.x, batch.x.shape[0]
        t = sample_time(b, self.time_dist, x)
        z = torch.randn_like(x)
        counter = EvalCounter(batch=b)
        counter.add("student", b, grad=True)
        residual = student(interpolate(x, z, t), t, t, batch.cond) - (z - x)
        per_sample = (residual.pow(2).flatten(1).mean(dim=1) + self.c**2).sqrt() - self.c
        loss = per_sample.mean()
        return loss, {"loss/main": loss.detach(), **counter.logs(), "times": (t.detach(), t.detach())}
