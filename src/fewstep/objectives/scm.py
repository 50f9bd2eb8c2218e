"""Continuous-time consistency (sCM, arXiv 2410.11081) in flow form (SPEC §11; docs/objectives.md).

The network ``F = f(x_t, t, 0, c)`` is the average velocity down to the data, so the consistency function
is ``g(x_t, t) = x_t − t·F``. Along the probability-flow ODE (``dx_t/dt = v``) a consistent ``g`` is
constant: ``dg/dt = v − F − t·dF/dt = 0``, with ``dF/dt`` the JVP along ``(v, 1, 0)`` shared with MeanFlow.
sCM's update pushes ``F`` along that tangent: loss ``‖F − sg(F + ĝ)‖²`` with ``ĝ = dg/dt``, the ``t·dF/dt``
part warmed up linearly over ``warmup_steps`` and ``ĝ`` normalised to ``ĝ/(‖ĝ‖ + c)``. Without
normalisation and warm-up this is MeanFlow at ``tt = 0``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fewstep.config.checks import check_range
from fewstep.data.base import Batch, cond_where
from fewstep.objectives.base import EvalCounter, Objective, wide_dtype
from fewstep.objectives.jvp import time_derivative
from fewstep.objectives.meanflow import check_time_options, logit_normal, squared_norm
from fewstep.path import expand_like, interpolate
from fewstep.teachers.rng import RngState


@dataclass
class SCMConfig:
    _target_: str = "fewstep.objectives.scm.SCM"
    target_step_count: int = 1
    time_mu: float = -1.0
    time_sigma: float = 1.4
    tangent_norm_c: float = 0.1
    warmup_steps: int = 1000
    cond_dropout: float = 0.0
    allow_diff2flow: bool = False


class SCM(Objective):
    """sCM loss in flow form (module docstring). Times ``t = sigmoid(N(time_mu, time_sigma))``: sCM's
    log-normal ``tan(s) = σ/σ_d`` is exactly a logit-normal flow time for unit-scale data."""

    needs_time_pair = False  # F = f(x_t, t, 0): the target time is always 0, a vanilla model suffices
    name = "scm"
    config_schema = SCMConfig

    @classmethod
    def check_config(cls, cfg) -> None:
        """Ranges of the sCM options (SPEC §11); the tiny nets' time features must be unscaled."""
        obj = cfg.objective
        check_time_options(obj)
        check_range("objective.tangent_norm_c", obj.tangent_norm_c, 0, None, hint=" (0 = no normalisation)")
        check_range("objective.warmup_steps", obj.warmup_steps, 0, None, hint=" (0 = no warm-up)")
        if cfg.model.get("time_scale", 1.0) != 1.0:  # the tiny nets' time features (default 1000)
            warnings.warn(
                f"objective=scm with model.time_scale={cfg.model.time_scale}: dF/dt scales with it and sCM's tangent "
                "explodes once the warm-up ramps in (measured on digits: 1-NFE FD 171 vs 2.55 with 1); "
                "pass model.time_scale=1 (docs/objectives.md)",
                stacklevel=3,
            )

    def __init__(
        self,
        target_step_count: int = 1,
        time_mu: float = -1.0,
        time_sigma: float = 1.4,
        tangent_norm_c: float = 0.1,
        warmup_steps: int = 1000,
        cond_dropout: float = 0.0,
        allow_diff2flow: bool = False,
    ):
        self.target_step_count = int(target_step_count)
        self.time_mu = float(time_mu)
        self.time_sigma = float(time_sigma)
        self.tangent_norm_c = float(tangent_norm_c)
        self.warmup_steps = int(warmup_steps)
        self.cond_dropout = float(cond_dropout)
        self.allow_diff2flow = bool(allow_diff2flow)

    def warmup(self, step: int) -> float:
        """Weight of the ``t·dF/dt`` term: linear from 0 to 1 over ``warmup_steps`` (1 without warm-up)."""
        return 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)

    def tangent(self, F: torch.Tensor, dFdt: torch.Tensor, v: torch.Tensor, t: torch.Tensor, ratio: float):
        """``(ĝ/(‖ĝ‖ + c), ‖ĝ‖)`` with ``ĝ = v − F − ratio·t·dF/dt`` (no grad, float32 or wider)."""
        dtype = wide_dtype(v.dtype)
        F, dFdt, v = F.detach().to(dtype), dFdt.to(dtype), v.to(dtype)
        g = v - F - ratio * expand_like(t, v).to(dtype) * dFdt
        norm = squared_norm(g).sqrt()
        if self.tangent_norm_c <= 0:
            return g, norm
        return g / expand_like(norm + self.tangent_norm_c, g), norm

    def loss(self, student, teacher, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        x, cond = batch.x, batch.cond
        b = x.shape[0]
        counter = EvalCounter(batch=b)
        if self.cond_dropout > 0:
            cond = cond_where(torch.rand(b).to(x.device) < self.cond_dropout, batch.null_cond, cond)
        t = logit_normal(b, self.time_mu, self.time_sigma, x)
        tt = torch.zeros_like(t)
        z = torch.randn_like(x)
        x_t, v = interpolate(x, z, t), z - x
        rng = RngState.capture()  # the JVP pass replays the grad pass's dropout masks
        counter.add("student", b, grad=True)
        F = student(x_t, t, tt, cond)
        counter.add("jvp", b, grad=False)
        _, dFdt = time_derivative(student, x_t, t, tt, cond, v, rng=rng, objective=f"objective={self.name}")
        ratio = self.warmup(step)
        g, g_norm = self.tangent(F, dFdt, v, t, ratio)
        per_sample = squared_norm(F.to(g.dtype) - (F.detach().to(g.dtype) + g))
        loss = per_sample.mean()
        logs = {
            "loss/main": loss.detach(),
            "loss/tangent_norm": g_norm.mean(),
            "loss/warmup": ratio,
            **counter.logs(),
            "times": (t.detach(), tt),
        }
        return loss, logs
