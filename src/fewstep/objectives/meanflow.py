"""MeanFlow (arXiv 2505.13447) in fewstep's conventions (SPEC §11).

The network ``f(x_t, t, tt, c)`` is the *average* velocity over ``[tt, t]``: the jump is
``x_tt = x_t − (t − tt)·f``, so one step from noise is ``x = z − f(z, 1, 0)`` and the UCGM "any" step is
exactly MeanFlow's multi-step sampler. Differentiating ``(t − tt)·f = ∫_tt^t v`` in ``t`` gives the
MeanFlow identity ``f = v − (t − tt)·df/dt`` with ``df/dt = ∂f/∂x·v + ∂f/∂t`` (a JVP along ``(v, 1, 0)``);
the regression target is its right-hand side under stop-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fewstep.config.checks import ConfigError, check_range
from fewstep.data.base import Batch, cond_where
from fewstep.objectives.base import EvalCounter, Objective, guidance_passes, has_active_dropout, wide, wide_dtype
from fewstep.objectives.jvp import time_derivative, unwrap
from fewstep.path import expand_like, interpolate
from fewstep.teachers.rng import RngState


def logit_normal(n: int, mu: float, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """``sigmoid(N(mu, sigma))`` (n,), drawn on the CPU generator then moved to ``like``'s device."""
    return torch.sigmoid(torch.randn(n) * sigma + mu).to(device=like.device, dtype=wide_dtype(like.dtype))


def squared_norm(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖delta‖²`` (sum over every non-batch dim), (B,), float32 or wider."""
    return wide(delta).pow(2).flatten(1).sum(dim=1)


def adaptive_weight(per_sample: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """MeanFlow's adaptive loss weight ``1 / sg(L + c)^p`` (p = 0: plain L2)."""
    if p == 0:
        return torch.ones_like(per_sample)
    return 1.0 / (per_sample.detach() + c).pow(p)


def check_time_options(obj) -> None:
    """The ranges MeanFlow and sCM share (SPEC §11): the sampling step count and the logit-normal time spread."""
    check_range("objective.target_step_count", obj.target_step_count, 1, 8, hint=" (1-4 recommended)")
    check_range("objective.time_sigma", obj.time_sigma, 0, None, lo_open=True)


@dataclass
class MeanFlowConfig:
    _target_: str = "fewstep.objectives.meanflow.MeanFlow"
    target_step_count: int = 1
    time_mu: float = -0.4
    time_sigma: float = 1.0
    equal_time_ratio: float = 0.75
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    guidance_scale: float = 1.0
    guidance_mix: float = 0.0
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    cond_dropout: float = 0.0
    allow_diff2flow: bool = False


class MeanFlow(Objective):
    """MeanFlow loss ``w·‖f(x_t, t, tt, c) − sg(ṽ − (t − tt)·df/dt)‖²`` with ``w = 1/sg(L + c)^p``.

    ``ṽ`` is ``v = z − x``, or with CFG-in-training (``guidance_scale`` ω ≠ 1 or ``guidance_mix`` κ ≠ 0) on
    rows with ``t`` in ``guidance_interval`` that kept their condition:
    ``ṽ = ω·v + κ·f(x_t, t, t, c) + (1 − ω − κ)·f(x_t, t, t, ∅)`` (no-grad passes of the network, one
    batched forward). Condition dropout trains the null condition those passes need.
    """

    needs_time_pair = True
    name = "meanflow"
    config_schema = MeanFlowConfig

    @classmethod
    def check_config(cls, cfg) -> None:
        """Ranges of the MeanFlow options; CFG-in-training needs condition dropout (SPEC §11)."""
        obj = cfg.objective
        check_time_options(obj)
        check_range("objective.equal_time_ratio", obj.equal_time_ratio, 0, 1)
        check_range("objective.adaptive_p", obj.adaptive_p, 0, None)
        check_range("objective.adaptive_c", obj.adaptive_c, 0, None, lo_open=True)
        hint = " (1 = no CFG-in-training)"
        check_range("objective.guidance_scale", obj.guidance_scale, 0, None, lo_open=True, hint=hint)
        check_range("objective.guidance_mix", obj.guidance_mix, 0, 1, hi_open=True)
        interval = list(obj.guidance_interval)
        if len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0:
            raise ConfigError(f"objective.guidance_interval={interval} must be [lo, hi] with 0 <= lo < hi <= 1")
        if (obj.guidance_scale != 1 or obj.guidance_mix != 0) and obj.cond_dropout <= 0:
            raise ConfigError(
                f"objective.guidance_scale={obj.guidance_scale} / guidance_mix={obj.guidance_mix} use the null "
                "condition: set objective.cond_dropout > 0 (e.g. 0.1) so the network learns it"
            )

    def __init__(
        self,
        target_step_count: int = 1,
        time_mu: float = -0.4,
        time_sigma: float = 1.0,
        equal_time_ratio: float = 0.75,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        guidance_scale: float = 1.0,
        guidance_mix: float = 0.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        cond_dropout: float = 0.0,
        allow_diff2flow: bool = False,
    ):
        self.target_step_count = int(target_step_count)
        self.time_mu = float(time_mu)
        self.time_sigma = float(time_sigma)
        self.equal_time_ratio = float(equal_time_ratio)
        self.adaptive_p = float(adaptive_p)
        self.adaptive_c = float(adaptive_c)
        self.guidance_scale = float(guidance_scale)
        self.guidance_mix = float(guidance_mix)
        self.guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        self.cond_dropout = float(cond_dropout)
        self.allow_diff2flow = bool(allow_diff2flow)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0 or self.guidance_mix != 0.0

    # -- inputs --------------------------------------------------------------------------------

    def sample_times(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A logit-normal pair sorted so ``tt ≤ t``; ``tt = t`` on ``equal_time_ratio`` of the rows."""
        a = logit_normal(n, self.time_mu, self.time_sigma, like)
        b = logit_normal(n, self.time_mu, self.time_sigma, like)
        t, tt = torch.maximum(a, b), torch.minimum(a, b)
        equal = torch.rand(n).to(like.device) < self.equal_time_ratio
        return t, torch.where(equal, t, tt)

    def sample_inputs(self, batch: Batch) -> dict:
        x, cond = batch.x, batch.cond
        b = x.shape[0]
        dropped = torch.zeros(b, dtype=torch.bool, device=x.device)
        if self.cond_dropout > 0:
            dropped = torch.rand(b).to(x.device) < self.cond_dropout
            cond = cond_where(dropped, batch.null_cond, cond)
        t, tt = self.sample_times(b, x)
        z = torch.randn_like(x)
        return dict(x_t=interpolate(x, z, t), t=t, tt=tt, v=(z - x), cond=cond, null=batch.null_cond, dropped=dropped)

    @torch.no_grad()
    def guided_velocity(
        self, model, inp: dict, counter: EvalCounter, rng: RngState | None = None, paired: bool = False
    ) -> torch.Tensor:
        """``ṽ`` (class docstring) on guided rows, ``v`` elsewhere. The cond and null passes start from ``rng``
        (the state the grad pass and the JVP replay), on the whole batch when ``paired`` (active dropout), so
        ``ṽ`` and ``df/dt`` are of one function: :func:`guidance_passes`."""
        v, t = inp["v"], inp["t"]
        lo, hi = self.guidance_interval
        rows = (~inp["dropped"]) & (t >= lo) & (t <= hi)
        if not self.guided:
            return v
        outs = guidance_passes(unwrap(model), counter, "guidance", inp["x_t"], t, t, inp["cond"], inp["null"], rows,
                               rng, paired)  # fmt: skip
        if outs is None:
            return v
        f_cond, f_null = outs[0].to(v.dtype), outs[1].to(v.dtype)
        w, k = self.guidance_scale, self.guidance_mix
        v = v.clone()
        v[rows] = w * v[rows] + k * f_cond + (1 - w - k) * f_null
        return v

    # -- target and loss -----------------------------------------------------------------------

    def average_velocity_target(self, model, x_t, t, tt, cond, v, rng: RngState | None = None) -> torch.Tensor:
        """``sg(v − (t − tt)·df/dt)`` with ``df/dt`` the JVP along ``(v, 1, 0)`` (float32 or wider)."""
        _, dudt = time_derivative(model, x_t, t, tt, cond, v, rng=rng, objective=f"objective={self.name}")
        dtype = wide_dtype(v.dtype)
        gap, dudt = t.to(dtype) - tt.to(dtype), dudt.to(dtype)  # widened first: t − tt of bf16 times is not bf16
        return (v.to(dtype) - expand_like(gap, dudt) * dudt).detach()

    def per_sample_loss(self, F: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w·L, L)`` per sample with ``L = ‖F − target‖²``."""
        raw = squared_norm(F.to(target.dtype) - target)
        return adaptive_weight(raw, self.adaptive_p, self.adaptive_c) * raw, raw

    def loss(self, student, teacher, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        counter = EvalCounter(batch=len(batch))
        with torch.no_grad():
            inp = self.sample_inputs(batch)
        # The guidance passes, the grad pass and the JVP all draw their dropout masks from this one state.
        rng = RngState.capture()
        v = self.guided_velocity(student, inp, counter, rng, paired=has_active_dropout(student))
        rng.restore()
        x_t, t, tt, cond = inp["x_t"], inp["t"], inp["tt"], inp["cond"]
        counter.add("student", x_t.shape[0], grad=True)
        F = student(x_t, t, tt, cond)
        counter.add("jvp", x_t.shape[0], grad=False)
        target = self.average_velocity_target(student, x_t, t, tt, cond, v, rng)
        weighted, raw = self.per_sample_loss(F, target)
        loss = weighted.mean()
        logs = {
            "loss/main": loss.detach(),
            "loss/mse": (raw.detach() / F[0].numel()).mean(),
            **counter.logs(),
            "times": (t.detach(), tt.detach()),
        }
        return loss, logs
