"""TwinFlow (self-adversarial flows) and RCGM, SPEC §2.

One class serves both: ``objective=rcgm`` is TwinFlow with the adversarial
branch off (no ``adv`` group, no rectify term). Every teacher pass runs only on
the rows whose targets are used, and paired passes (teacher cond/uncond,
rectify fake/real) are single batched forwards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fewstep.config.checks import ConfigError, choice
from fewstep.data.base import Batch, cond_cat, cond_select, cond_where
from fewstep.objectives.base import (
    EvalCounter,
    LossConfig,
    Objective,
    call_rows,
    guidance_passes,
    has_active_dropout,
    make_distance,
    sample_time,
    time_weight,
    wide,
)
from fewstep.path import interpolate, reconstruct
from fewstep.teachers.rng import RngState

GROUPS = ("e2e", "mul", "any", "adv")


def partition_sizes(batch_size: int, probs: Mapping[str, float]) -> dict[str, int]:
    """Split a batch into the e2e/mul/any/adv groups in that order.

    Group boundaries are the rounded cumulative shares, so sizes always add up
    to the batch and a zero-probability group is always empty. A batch smaller
    than the number of active groups leaves some of them empty (handled: every
    pass below skips empty groups).
    """
    weights = [max(float(probs.get(k, 0.0)), 0.0) for k in GROUPS]
    total = sum(weights)
    if total <= 0:
        raise ValueError("objective.probs are all zero; give at least one of e2e/mul/any/adv a positive share")
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w
        bounds.append(int(math.floor(batch_size * acc / total + 0.5)))
    bounds[-1] = batch_size
    return {k: bounds[i + 1] - bounds[i] for i, k in enumerate(GROUPS)}


@dataclass
class ProbsConfig:
    e2e: float = 1.0
    mul: float = 1.0
    any: float = 1.0
    adv: float = 1.0


@dataclass
class TwinFlowConfig:
    _target_: str = "fewstep.objectives.twinflow.TwinFlow"
    target_step_count: int = 2
    estimate_order: int = 2
    enhanced_ratio: float = 0.5
    enhanced_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    delta_t: float = 0.01
    target_clamp: float = 1.0
    consistency_ratio: float = 1.0
    time_dist: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    probs: ProbsConfig = field(default_factory=ProbsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    time_weighting: str = "tan"
    dist_match_coef: float = 0.5
    real_velocity: bool = False
    real_velocity_weight: float = 1.0
    adversarial: bool = True
    null_condition: str = "null"
    cond_dropout: float = 0.0
    allow_diff2flow: bool = False
    image_free: bool = False  # SPEC §10: data = the student's own one-step samples; needs a frozen teacher


class TwinFlow(Objective):
    """TwinFlow / RCGM loss. Parameter names follow the seed minus ``twinflow_``."""

    needs_time_pair = True
    name = "twinflow"  # objective=rcgm too: the same class and schema with the adversarial branch off
    config_schema = TwinFlowConfig

    @classmethod
    def check_config(cls, cfg) -> None:
        """Ranges of the TwinFlow / RCGM options; image-free training's frozen teacher (SPEC §2, §10)."""
        obj = cfg.objective
        if obj.estimate_order < 1:
            raise ConfigError(f"objective.estimate_order={obj.estimate_order} must be >= 1 (2 is the paper default)")
        if not 0.0 < obj.delta_t <= 0.5:
            raise ConfigError(f"objective.delta_t={obj.delta_t} must lie in (0, 0.5] (0.01 is the default)")
        if obj.target_clamp <= 0:
            raise ConfigError(f"objective.target_clamp={obj.target_clamp} must be > 0 (1.0 is the default)")
        if not 1 <= obj.target_step_count <= 8:
            raise ConfigError(
                f"objective.target_step_count={obj.target_step_count} must lie in [1, 8] (1-4 recommended)"
            )
        probs = obj.probs
        if any(v < 0 for v in probs.values()) or sum(probs.values()) <= 0:
            raise ConfigError(
                f"objective.probs={dict(probs)} "
                "must be >= 0 with a positive sum, e.g. {e2e: 1, mul: 1, any: 1, adv: 1}"
            )
        lo, hi = obj.enhanced_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"objective.enhanced_range={list(obj.enhanced_range)} must satisfy 0 <= lo < hi <= 1")
        if len(obj.time_dist) != 3:
            raise ConfigError(f"objective.time_dist={list(obj.time_dist)} must be [a, b, c] for t ~ Beta(a, b)*c")
        a, b, c = obj.time_dist
        if not (a > 0 and b > 0 and 0 < c <= 1):
            raise ConfigError(
                f"objective.time_dist={list(obj.time_dist)} must have a, b > 0 and 0 < c <= 1 "
                "(t ~ Beta(a, b)*c must stay in [0, 1]; [1, 1, 1] is the default)"
            )
        if not 0.0 <= obj.consistency_ratio <= 1.0:
            raise ConfigError(
                f"objective.consistency_ratio={obj.consistency_ratio} must lie in [0, 1] "
                "(tt = t - u*r*t must stay in [0, t]; 1.0 is the default)"
            )
        if obj.get("image_free", False):
            cls.check_image_free(cfg)
        active = sum(1 for k, v in probs.items() if v > 0 and (k != "adv" or obj.adversarial))
        if 1 <= cfg.data.batch_size < active:  # (below 1: refused further down)
            warnings.warn(
                f"data.batch_size={cfg.data.batch_size} is smaller than the {active} active objective.probs groups: "
                "some groups will be empty in every step",
                stacklevel=3,
            )

    @classmethod
    def check_image_free(cls, cfg) -> None:
        """``objective.image_free=true`` (SPEC §10) allows exactly the frozen teachers: ``teacher=frozen`` or
        ``teacher=ema teacher.decay=1.0`` (the reference pairs it with EMA 1.0). A moving teacher would chase the
        student's own samples with no data behind them; the guided velocity needs ``enhanced_ratio != 0``."""
        teacher = cfg.teacher
        target = str(teacher.get("_target_", ""))
        frozen = target.endswith("FrozenTeacher") or (target.endswith("EMATeacher") and teacher.get("decay") == 1.0)
        if not frozen:
            raise ConfigError(
                f"objective.image_free=true needs a frozen teacher (got {choice(cfg, 'teacher')}): "
                "use teacher=frozen or teacher=ema teacher.decay=1.0"
            )
        if cfg.objective.enhanced_ratio == 0:
            raise ConfigError(
                "objective.image_free=true needs objective.enhanced_ratio != 0: its target is the frozen teacher's "
                "guided velocity f_T(null) + w*(f_T(c) - f_T(null)), w = enhanced_ratio (the reference uses 4.0)"
            )

    def __init__(
        self,
        target_step_count: int = 2,
        estimate_order: int = 2,
        enhanced_ratio: float = 0.5,
        enhanced_range: tuple[float, float] = (0.0, 1.0),
        delta_t: float = 0.01,
        target_clamp: float = 1.0,
        consistency_ratio: float = 1.0,
        time_dist: tuple[float, float, float] = (1.0, 1.0, 1.0),
        probs: Mapping[str, float] | None = None,
        loss: Mapping | None = None,
        time_weighting: str = "tan",
        dist_match_coef: float = 0.5,
        real_velocity: bool = False,
        real_velocity_weight: float = 1.0,
        adversarial: bool = True,
        null_condition: str = "null",
        cond_dropout: float = 0.0,
        allow_diff2flow: bool = False,
        image_free: bool = False,
    ):
        self.target_step_count = int(target_step_count)
        self.estimate_order = int(estimate_order)
        self.enhanced_ratio = float(enhanced_ratio)
        self.enhanced_range = (float(enhanced_range[0]), float(enhanced_range[1]))
        self.delta_t = float(delta_t)
        self.target_clamp = float(target_clamp)
        self.consistency_ratio = float(consistency_ratio)
        self.time_dist = tuple(float(v) for v in time_dist)
        probs = dict(probs or {"e2e": 1.0, "mul": 1.0, "any": 1.0, "adv": 1.0})
        self.adversarial = bool(adversarial)
        if not self.adversarial:
            probs["adv"] = 0.0
        self.probs = probs
        self.distance = make_distance(dict(loss) if loss is not None else {"type": "barron", "alpha": 1.0, "c": 1e-3})
        self.time_weighting = time_weighting
        self.dist_match_coef = float(dist_match_coef)
        self.real_velocity = bool(real_velocity)
        self.real_velocity_weight = float(real_velocity_weight)
        if null_condition not in ("null", "shuffled"):
            raise ValueError(f"objective.null_condition={null_condition!r} is unknown; use 'null' or 'shuffled'")
        self.null_condition = null_condition
        self.cond_dropout = float(cond_dropout)
        self.allow_diff2flow = bool(allow_diff2flow)
        self.image_free = bool(image_free)
        if self.image_free and self.enhanced_ratio == 0:
            raise ValueError(
                "objective.image_free=true needs objective.enhanced_ratio != 0 (its target is the frozen teacher's "
                "guided velocity f_T(null) + w*(f_T(c) - f_T(null)); the reference uses 4.0)"
            )
        time_weight(torch.zeros(1), torch.zeros(1), time_weighting)  # validate the name early

    # -- building blocks -------------------------------------------------------------------------

    def _call(self, counter: EvalCounter, name: str, model, x_t, t, tt, cond, grad: bool = False) -> torch.Tensor:
        counter.add(name, x_t.shape[0], grad)
        return model(x_t, t, tt, cond)

    def sample_inputs(self, student, batch: Batch, counter: EvalCounter) -> dict:
        """Times, groups, (fake) data and the noised inputs of one step (all without grad)."""
        x, cond, null = batch.x, batch.cond, batch.null_cond
        b, device = x.shape[0], x.device
        if self.cond_dropout > 0:
            cond = cond_where(torch.rand(b, device=device) < self.cond_dropout, null, cond)
        uncond = cond_select(cond, torch.randperm(b, device=device)) if self.null_condition == "shuffled" else null
        t = sample_time(b, self.time_dist, x)
        z = torch.randn_like(x)
        r = self.consistency_ratio
        tt = t - torch.rand_like(t) * r * t  # any-step target time
        tt_mul = t - torch.rand_like(t) * t * min(0.05, r)  # near-instant (multi-step) target time
        sizes = partition_sizes(b, self.probs)
        masks, start = {}, 0
        for k in GROUPS:
            m = torch.zeros(b, dtype=torch.bool, device=device)
            m[start : start + sizes[k]] = True
            masks[k] = m
            start += sizes[k]
        t = torch.where(masks["e2e"], torch.ones_like(t), t)
        tt = torch.where(masks["e2e"], torch.zeros_like(tt), torch.where(masks["mul"], tt_mul, tt))
        adv = masks["adv"]
        if self.image_free and sizes["adv"] < b:
            # Image-free (SPEC §10): every row's data is the model's own one-step sample; only the shape (and
            # dtype) of ``batch.x`` is used. Adversarial rows draw their own sample below, so they are skipped.
            real = ~adv
            n = b - sizes["adv"]
            z_gen = torch.randn_like(x[real])
            ones = torch.ones(n, device=device, dtype=t.dtype)
            F_gen = self._call(counter, "image_free_generate", student, z_gen, ones, 0 * ones, cond_select(cond, real))
            x = x.clone()
            x[real] = reconstruct(z_gen, wide(F_gen), ones)[0].to(x.dtype)
        if sizes["adv"] > 0:
            # Adversarial rows: the model's own one-step samples become the data, on negative time.
            z_fake = torch.randn_like(x[adv])
            ones = torch.ones(sizes["adv"], device=device, dtype=t.dtype)
            F_fake = self._call(counter, "adv_generate", student, z_fake, ones, 0 * ones, cond_select(cond, adv))
            x = x.clone()
            x[adv] = reconstruct(z_fake, wide(F_fake), ones)[0].to(x.dtype)
            t = torch.where(adv, -t, t)
            tt = torch.where(adv, t, tt)
        x_t = interpolate(x, z, t)
        return dict(x=x, z=z, x_t=x_t, v=wide(z - x), t=t, tt=tt, masks=masks, cond=cond, uncond=uncond)

    @torch.no_grad()
    def enhance_target(
        self, teacher_model, inp: dict, target: torch.Tensor, rng: RngState, counter: EvalCounter, paired=False
    ):
        """``v ← v + w·(f_T(c) − f_T(∅))`` at ``(x_t, t, t)`` on non-adv rows with t in the range, both teacher
        passes from the captured RNG state (:func:`guidance_passes`: one batched forward of those rows, or with
        ``paired``, active dropout, two whole-batch forwards that draw the student pass's masks row for row, as the
        reference runs them). Image-free (SPEC §10), the target on those rows is the teacher's guided velocity
        itself, ``f_T(∅) + w·(f_T(c) − f_T(∅))`` (``v = z − x̂`` of a self-generated ``x̂`` carries no data)."""
        t = inp["t"]
        lo, hi = self.enhanced_range
        rows = (~inp["masks"]["adv"]) & (t > lo) & (t < hi)
        if self.enhanced_ratio == 0:
            return
        x_t, cond, uncond = inp["x_t"], inp["cond"], inp["uncond"]
        outs = guidance_passes(teacher_model, counter, "teacher_enhance", x_t, t, t, cond, uncond, rows, rng, paired)
        if outs is None:
            return
        f_cond, f_uncond = wide(outs[0]), wide(outs[1])
        guidance = self.enhanced_ratio * (f_cond - f_uncond)
        if self.image_free:
            target[rows] = (f_uncond + guidance).to(target.dtype)
        else:
            target[rows] += guidance

    @torch.no_grad()
    def rollout_integral(self, teacher_model, x_m, t_m, tt, cond, rng: RngState, counter: EvalCounter):
        """Roll the teacher from ``t_m`` to ``tt`` in N equal sub-steps; return ``S = Σ F_i·(s_i − s_{i+1})``."""
        n = self.estimate_order
        x, total = x_m, torch.zeros_like(wide(x_m))
        for i in range(n):
            s_cur = t_m + (tt - t_m) * (i / n)
            s_next = t_m + (tt - t_m) * ((i + 1) / n)
            rng.restore()
            F_i = wide(self._call(counter, "teacher_rollout", teacher_model, x, s_cur, s_next, cond))
            x_hat, z_hat = reconstruct(wide(x), F_i, s_cur)
            x = interpolate(x_hat, z_hat, s_next).to(x_m.dtype)
            total += F_i * (s_cur - s_next).reshape(-1, *([1] * (F_i.ndim - 1)))
        return total

    @torch.no_grad()
    def rcgm_target(
        self, teacher_model, F: torch.Tensor, inp: dict, v: torch.Tensor, rng, counter, paired=False
    ) -> torch.Tensor:
        """RCGM target ``y = sg(F) − clamp(r, −κ, κ)`` (SPEC §2 steps 1–4) for every row.

        Rows with ``t − δ ≤ tt`` have a zero-length rollout (``t_m = tt``), so their integral is
        exactly 0 and the teacher is not run on them, unless ``paired`` (active dropout): the rollout then
        runs on the whole batch, as the reference does, so each row draws the student pass's dropout masks."""
        t, tt, delta = inp["t"], inp["tt"], self.delta_t
        F = wide(F.detach())
        integral = torch.zeros_like(F)
        rows = (~inp["masks"]["adv"]) & (t - delta > tt)
        run = call_rows(rows)
        if run is not None:
            if paired:
                run = torch.ones_like(rows)
            x_m = inp["x_t"][run] - delta * v[run].to(inp["x_t"].dtype)  # step 1
            t_m = torch.maximum(t[run] - delta, tt[run])
            part = self.rollout_integral(teacher_model, x_m, t_m, tt[run], cond_select(inp["cond"], run), rng, counter)
            integral[rows] = part[rows[run]]  # without a stand-in row under FSDP (call_rows)
        gap = (t - tt).reshape(-1, *([1] * (F.ndim - 1)))
        far = gap >= delta
        safe_gap = torch.where(gap == 0, torch.ones_like(gap), gap)
        near_integral = torch.where(gap == 0, torch.zeros_like(integral), integral / safe_gap)
        residual = torch.where(far, (gap * F - integral) / delta - v, F - near_integral - v)  # step 3
        return F - residual.clamp(-self.target_clamp, self.target_clamp)  # step 4

    @torch.no_grad()
    def rectify_delta(self, student, x_fake: torch.Tensor, cond, counter: EvalCounter) -> torch.Tensor:
        """``clamp(f(x_t', −t, −t) − f(x_t', t, t), ±1)`` on the detached one-step outputs (fake and
        real passes batched into one forward)."""
        n = x_fake.shape[0]
        t = sample_time(n, (1.0, 1.0, 1.0), x_fake)
        x_t = interpolate(x_fake, torch.randn_like(x_fake), t)
        signed = torch.cat([-t, t])
        out = self._call(counter, "rectify", student, torch.cat([x_t, x_t]), signed, signed, cond_cat(cond, cond))
        out = wide(out)
        return (out[:n] - out[n:]).clamp(-1.0, 1.0)

    # -- the loss ----------------------------------------------------------------------------------

    def loss(self, student, teacher, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        counter = EvalCounter(batch=len(batch))
        with torch.no_grad():
            inp = self.sample_inputs(student, batch, counter)
        t, tt, masks = inp["t"], inp["tt"], inp["masks"]
        rng = RngState.capture()
        F = self._call(counter, "student", student, inp["x_t"], t, tt, inp["cond"], grad=True)
        after_student = RngState.capture()

        target = inp["v"].clone()
        teacher_model = teacher.model
        paired = has_active_dropout(student)
        self.enhance_target(teacher_model, inp, target, rng, counter, paired=paired)
        if self.estimate_order >= 1 and self.consistency_ratio != 0:
            # Image-free runs have a frozen teacher (checked in fewstep.config.validate); like the reference, whose
            # EMA-1.0 runs roll out the live model, the RCGM rollout then uses the student's current weights.
            rollout_model = student if self.image_free else teacher_model
            rcgm = self.rcgm_target(rollout_model, F, inp, target, rng, counter, paired=paired)
            non_adv = ~masks["adv"]
            target[non_adv] = rcgm[non_adv]
        after_student.restore()  # teacher passes are RNG-neutral for what follows

        weight = time_weight(t, tt, self.time_weighting).masked_fill(masks["adv"], 1.0)
        per_sample = self.distance(F, target)
        main = (per_sample * weight).mean()
        logs = {"loss/main": main.detach()}
        for k in GROUPS:
            if masks[k].any():
                logs[f"loss/{k}"] = per_sample[masks[k]].detach().mean()
        total = main

        e2e = masks["e2e"]
        if self.adversarial and self.dist_match_coef != 0 and e2e.any():
            F_e2e = F[e2e]
            x_fake = reconstruct(inp["x_t"][e2e], F_e2e.detach(), t[e2e])[0]
            delta = self.rectify_delta(student, x_fake, cond_select(inp["cond"], e2e), counter)
            rectify = self.distance(F_e2e, (wide(F_e2e.detach()) - delta)).mean()
            total = total + self.dist_match_coef * rectify
            logs["loss/rectify"] = rectify.detach()

        if self.real_velocity:
            rows = ~masks["adv"]
            if rows.any():
                x_t, tr = inp["x_t"][rows], t[rows]
                F_real = self._call(
                    counter, "real_velocity", student, x_t, tr, tr, cond_select(inp["cond"], rows), True
                )
                real = self.distance(F_real, inp["v"][rows]).mean()
                total = total + self.real_velocity_weight * real
                logs["loss/real_velocity"] = real.detach()

        logs.update(counter.logs())
        logs["times"] = (t.detach(), tt.detach())
        return total, logs


class RCGM(TwinFlow):
    """RCGM: TwinFlow without the adversarial branch (no ``adv`` group, no rectify term)."""

    def __init__(self, **kwargs):
        kwargs["adversarial"] = False
        super().__init__(**kwargs)
