"""Plain conditional flow matching: ``d(f(x_t, t, t, c), z − x)``.

Draws its randomness in the same order as TwinFlow (condition dropout, t, z),
so TwinFlow with ``probs={mul: 1}`` and consistency/enhancement off gives the
same loss on the same inputs (a test pins it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fewstep.data.base import Batch, cond_where
from fewstep.objectives.base import EvalCounter, LossConfig, Objective, make_distance, sample_time, time_weight
from fewstep.path import interpolate


@dataclass
class FlowMatchingConfig:
    _target_: str = "fewstep.objectives.flow_matching.FlowMatching"
    target_step_count: int = 50
    time_dist: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    loss: LossConfig = field(default_factory=lambda: LossConfig(type="l2"))
    time_weighting: str = "none"
    cond_dropout: float = 0.0
    allow_diff2flow: bool = False


class FlowMatching(Objective):
    needs_time_pair = False
    name = "flow_matching"
    config_schema = FlowMatchingConfig
    samples_with_guidance = True  # a multi-step sampler applies sampler.guidance_scale (CFG)

    def __init__(
        self,
        target_step_count: int = 50,
        time_dist: tuple[float, float, float] = (1.0, 1.0, 1.0),
        loss: Mapping | None = None,
        time_weighting: str = "none",
        cond_dropout: float = 0.0,
        allow_diff2flow: bool = False,
    ):
        self.target_step_count = int(target_step_count)
        self.time_dist = tuple(float(v) for v in time_dist)
        self.distance = make_distance(dict(loss) if loss is not None else {"type": "l2"})
        self.time_weighting = time_weighting
        self.cond_dropout = float(cond_dropout)
        self.allow_diff2flow = bool(allow_diff2flow)
        time_weight(torch.zeros(1), torch.zeros(1), time_weighting)

    def loss(self, student, teacher, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        x, cond = batch.x, batch.cond
        b = x.shape[0]
        counter = EvalCounter(batch=b)
        if self.cond_dropout > 0:
            cond = cond_where(torch.rand(b, device=x.device) < self.cond_dropout, batch.null_cond, cond)
        t = sample_time(b, self.time_dist, x)
        z = torch.randn_like(x)
        x_t = interpolate(x, z, t)
        counter.add("student", b, grad=True)
        F = student(x_t, t, t, cond)
        per_sample = self.distance(F, z - x)
        loss = (per_sample * time_weight(t, t, self.time_weighting)).mean()
        logs = {"loss/main": loss.detach(), **counter.logs(), "times": (t.detach(), t.detach())}
        return loss, logs
