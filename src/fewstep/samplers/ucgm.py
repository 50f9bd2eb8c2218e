"""UCGM sampler (Unified Continuous Generative Models, arXiv:2505.07447), as TwinFlow samples.

Everything the native :class:`UCGMSampler` and the diffusers ``TwinFlowScheduler``
(:mod:`fewstep.samplers.scheduler`) have in common lives here, once:

* :func:`ucgm_time_grid` — the time grid (SPEC §3): ``u = linspace(g0, 1 − g1, n)``
  (one extra point when ``g1 == 0``, then the last point dropped), warped by the
  Kumaraswamy map ``(1 − (1 − u^a)^b)^c``, times ``t = 1 − u`` and a final 0;
* :func:`target_time` — the second ("target") time ``tt`` the model is called with;
* :func:`ucgm_update` — ``x ← (1 − t_next)·x̂ + t_next·(√(1 − s)·ẑ + √s·ε)``;
* :class:`UCGMStepper` — one trajectory's first-order step: reconstruction,
  extrapolation buffer and noise draws. The sampler and the scheduler both drive it,
  so they produce the same samples from the same velocities.

Time conventions are those of :mod:`fewstep.path`: ``x_t = t·z + (1 − t)·x``, ``t = 1``
is noise, ``x̂ = x_t − t·F``, ``ẑ = x_t + (1 − t)·F``.

Behaviour relative to the reference ``sampling_loop`` (inclusionAI/TwinFlow):

* the state is float64 and each model call gets it cast to the noise dtype, as there;
* extrapolation (``extrapol_ratio = e > 0``) is applied from the third step on
  (step index ≥ 2), against the previous step's *unextrapolated* x̂, ẑ, and not on
  the final jump to t = 0, whose raw x̂ is the sample (the reference returns the
  last raw x̂ of its trajectory);
* the "SDE" stochasticity rule ``s = clamp(2·|t_next − t_cur|·t_cur / t_next², 0, 1)``
  is evaluated at every step (the reference evaluates it once, at the first step,
  because it overwrites its own argument);
* the Heun correction (``sampling_order=2``) calls the model at ``x_next, t_next``
  with target time ``target_time(style, t_next, t_next)`` (the reference passes no
  target time there and would fail), and is skipped on the last step, so
  ``NFE = 2·n − 1`` with ``n = (steps + 1) // 2`` grid steps (the reference also
  corrects the last step when ``g1 == 0``);
* noise is drawn in float32 from ``generator`` (on the generator's device; the CPU
  global RNG when ``generator`` is None), then moved to the state's device — so a
  seeded CPU generator (what ``fewstep.training.outputs`` passes) gives the same noise whatever
  device and dtype the state has; samples on CPU and GPU then differ only by the model's
  arithmetic on each device. No noise is drawn when ``s == 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fewstep.path import full_time, reconstruct
from fewstep.samplers.step_noise import LatentKeyedNoise

Style = Literal["few", "any", "mul"]
STYLES: tuple[str, ...] = ("few", "any", "mul")
StochastRatio = float | str  # a number in [0, 1] or "SDE"

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


# --------------------------------------------------------------------------- grid


def check_style(style: str, key: str = "sampler.style") -> str:
    if style not in STYLES:
        raise ValueError(f"{key}={style!r} is unknown; use one of {', '.join(STYLES)}")
    return style


def default_rfba_gap_steps(style: str, steps: int) -> tuple[float, float]:
    """Reference grid gaps ``(g0, g1)`` per style and NFE.

    few: ``(0.001, 0.6)`` for ≤ 2 steps, ``(0.001, 0.5)`` for more; any: ``(0.001, 0.5)``;
    mul: ``(0.001, 0.0)`` (the grid then reaches t = 1 − 0.001 … 0 evenly).
    """
    check_style(style)
    if style == "few":
        return (0.001, 0.6) if steps <= 2 else (0.001, 0.5)
    if style == "any":
        return (0.001, 0.5)
    return (0.001, 0.0)


def grid_steps(steps: int, sampling_order: int = 1) -> int:
    """Number of grid intervals for ``steps``: ``steps``, or ``(steps + 1) // 2`` with Heun."""
    if sampling_order not in (1, 2):
        raise ValueError(f"sampling_order must be 1 (Euler-like) or 2 (Heun), got {sampling_order}.")
    if int(steps) < 1:
        raise ValueError(f"The number of sampling steps must be >= 1, got {steps}.")
    return (int(steps) + 1) // 2 if sampling_order == 2 else int(steps)


def kumaraswamy_warp(u: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """The Kumaraswamy-CDF warp ``(1 − (1 − u^a)^b)^c`` of ``u ∈ [0, 1]`` (identity at a = b = c = 1)."""
    return (1 - (1 - u**a) ** b) ** c


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style resolution shift ``t' = s·t / (1 + (s − 1)·t)`` (identity at ``s = 1``)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def ucgm_time_grid(
    steps: int,
    rfba_gap_steps: Sequence[float] = (0.0, 0.0),
    time_dist_ctrl: Sequence[float] = (1.0, 1.0, 1.0),
    sampling_order: int = 1,
    shift: float = 1.0,
) -> torch.Tensor:
    """Sampling times, float64 on CPU, from ~1 down to a final 0 (``n + 1`` values for ``n`` grid steps).

    ``n = grid_steps(steps, sampling_order)``; ``u = linspace(g0, 1 − g1, n)`` (with
    ``g1 == 0``: ``linspace(g0, 1, n + 1)`` minus its last point, so t never reaches 0
    before the end); ``t = 1 − kumaraswamy_warp(u)``, then an optional SD3 ``shift``,
    then 0 appended. Example: 2 steps, gaps (0.001, 0.6) → ``[0.999, 0.6, 0.0]``.
    """
    n = grid_steps(steps, sampling_order)
    g0, g1 = (float(g) for g in rfba_gap_steps)
    a, b, c = (float(v) for v in time_dist_ctrl)
    if g1 == 0.0:
        u = torch.linspace(g0, 1.0, n + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(g0, 1.0 - g1, n, dtype=torch.float64)
    t = shift_time(1 - kumaraswamy_warp(u, a, b, c), shift)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def target_time(style: str, t_cur: float, t_next: float) -> float:
    """The target time ``tt`` of a step: 0 ("few"), ``t_next`` ("any") or ``t_cur`` ("mul")."""
    check_style(style)
    if style == "few":
        return 0.0
    if style == "any":
        return float(t_next)
    return float(t_cur)


# --------------------------------------------------------------------------- update


def resolve_stochast_ratio(stochast_ratio: StochastRatio, t_cur: float | None, t_next: float) -> float:
    """The stochasticity ``s`` of a step; ``"SDE"`` means ``clamp(2·|t_next − t_cur|·t_cur / t_next², 0, 1)``."""
    if isinstance(stochast_ratio, str):
        if stochast_ratio.upper() != "SDE":
            raise ValueError(f"stochast_ratio must be a number in [0, 1] or 'SDE', got {stochast_ratio!r}.")
        if t_cur is None:
            raise ValueError("The 'SDE' stochast_ratio rule needs t_cur.")
        if t_next <= 0.0:
            return 1.0
        return min(max(2.0 * abs(t_next - t_cur) * t_cur / (t_next * t_next), 0.0), 1.0)
    s = float(stochast_ratio)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"stochast_ratio must lie in [0, 1] (or be 'SDE'), got {s}.")
    return s


def ucgm_update(
    x_cur: torch.Tensor,
    x_hat: torch.Tensor,
    z_hat: torch.Tensor,
    t_next: float,
    stochast_ratio: StochastRatio,
    noise: torch.Tensor | None,
    t_cur: float | None = None,
) -> torch.Tensor:
    """One UCGM transport: ``x ← (1 − t_next)·x̂ + t_next·(√(1 − s)·ẑ + √s·ε)``.

    ``stochast_ratio`` is ``s`` or ``"SDE"`` (then ``t_cur`` is required, see
    :func:`resolve_stochast_ratio`). ``noise`` (ε) may be None only when ``s == 0``.
    ``x_cur`` only fixes the result's dtype and device.
    """
    s = resolve_stochast_ratio(stochast_ratio, t_cur, t_next)
    x_hat, z_hat = x_hat.to(x_cur), z_hat.to(x_cur)
    if s > 0.0:
        if noise is None:
            raise ValueError(f"ucgm_update with stochast_ratio {s} > 0 needs noise.")
        z_part = math.sqrt(1.0 - s) * z_hat + math.sqrt(s) * noise.to(x_cur)
    else:
        z_part = z_hat
    return (1.0 - t_next) * x_hat + t_next * z_part


def heun_correction(
    x_cur: torch.Tensor, z_hat: torch.Tensor, z_hat_next: torch.Tensor, t_cur: float, t_next: float
) -> torch.Tensor:
    """Second-order (Heun) step in the noise parametrisation.

    With ``z̄ = ½(ẑ + ẑ')`` and ``x̄ = (x_cur − t_cur·z̄)/(1 − t_cur)``: ``x_next = (1 − t_next)·x̄ + t_next·z̄``.
    """
    ratio = (1.0 - t_next) / (1.0 - t_cur)
    return ratio * x_cur + (t_next - ratio * t_cur) * (0.5 * z_hat + 0.5 * z_hat_next)


STEP_NOISE: tuple[str, ...] = ("generator", "latents")


def check_step_noise(step_noise: str, key: str = "step_noise") -> str:
    if step_noise not in STEP_NOISE:
        raise ValueError(f"{key}={step_noise!r} is unknown; use one of {', '.join(STEP_NOISE)}")
    return step_noise


def state_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sampler state, float32 where the device has no float64 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def draw_noise(like: torch.Tensor, generator: torch.Generator | None = None, index: int = 0) -> torch.Tensor:
    """Standard normal noise shaped like ``like``: drawn in float32 on the generator's device (CPU for the
    global RNG), then moved to ``like``'s device and dtype. A ``generator`` with a ``draw(index, like)`` method
    (:class:`~fewstep.samplers.step_noise.LatentKeyedNoise`) gives step ``index``'s noise itself."""
    if hasattr(generator, "draw"):
        return generator.draw(index, like)
    device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    return eps.to(device=like.device, dtype=like.dtype)


class UCGMStepper:
    """First-order UCGM steps of one trajectory (state in float64).

    Holds what persists between steps: the previous raw x̂, ẑ for extrapolation.
    ``step(i, x_cur, F, t_cur, t_next)`` returns ``(x_next, x_hat, z_hat)``, where
    x̂, ẑ are the (extrapolated) reconstructions used in the update.
    """

    def __init__(self, stochast_ratio: StochastRatio = 1.0, extrapol_ratio: float = 0.0):
        resolve_stochast_ratio(stochast_ratio, 1.0, 0.5)  # validate early
        self.stochast_ratio = stochast_ratio
        self.extrapol_ratio = float(extrapol_ratio)
        self.reset()

    def reset(self) -> None:
        self._prev_x_hat: torch.Tensor | None = None
        self._prev_z_hat: torch.Tensor | None = None

    def extrapolate(self, index: int, x_hat: torch.Tensor, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x̂ += e·(x̂ − x̂_prev)``, ``ẑ += e·(ẑ − ẑ_prev)`` from step index 2 on (reference rule)."""
        e = self.extrapol_ratio
        if e <= 0.0:
            return x_hat, z_hat
        prev_x, prev_z = self._prev_x_hat, self._prev_z_hat
        self._prev_x_hat, self._prev_z_hat = x_hat, z_hat
        if index >= 2 and prev_x is not None:
            return x_hat + e * (x_hat - prev_x), z_hat + e * (z_hat - prev_z)
        return x_hat, z_hat

    def step(
        self,
        index: int,
        x_cur: torch.Tensor,
        velocity: torch.Tensor,
        t_cur: float,
        t_next: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        velocity = velocity.to(x_cur)
        x_hat, z_hat = reconstruct(x_cur, velocity, full_time(t_cur, x_cur.shape[0], x_cur))
        if t_next > 0.0:  # the final jump to t = 0 returns the raw x̂, as the reference's trajectory does
            x_hat, z_hat = self.extrapolate(index, x_hat, z_hat)
        s = resolve_stochast_ratio(self.stochast_ratio, t_cur, t_next)
        noise = draw_noise(x_cur, generator, index) if s > 0.0 else None
        x_next = ucgm_update(x_cur, x_hat, z_hat, t_next, s, noise)
        return x_next, x_hat, z_hat


# --------------------------------------------------------------------------- presets and sampler


@dataclass(frozen=True)
class UCGMPreset:
    style: str
    stochast_ratio: StochastRatio
    extrapol_ratio: float
    sampling_order: int
    time_dist_ctrl: tuple[float, float, float]
    rfba_gap_steps: tuple[float, float] | None  # None: per-NFE defaults
    steps: int  # the step count the preset was tuned for (used when sample(steps=None))


PRESETS: dict[str, UCGMPreset] = {
    # 1–2 NFE: gaps (0.001, 0.6) at ≤ 2 steps, (0.001, 0.5) at 4 (reference inference.py)
    "few_step": UCGMPreset("few", 1.0, 0.0, 1, (1.0, 1.0, 1.0), None, 2),
    "any_step": UCGMPreset("any", 0.0, 0.0, 1, (1.0, 1.0, 1.0), (0.001, 0.5), 4),
    "multi_step": UCGMPreset("mul", 0.0, 0.0, 1, (1.17, 0.8, 1.1), (0.001, 0.0), 30),
}

_KNOB_DEFAULTS: dict[str, Any] = {
    "style": "few",
    "stochast_ratio": 1.0,
    "extrapol_ratio": 0.0,
    "sampling_order": 1,
    "time_dist_ctrl": (1.0, 1.0, 1.0),
    "rfba_gap_steps": None,
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class UCGMSampler:
    """Native UCGM sampler for few-step (TwinFlow / RCGM) models.

    ``model(x_t, t, tt, cond)`` takes (B,) signed time tensors and returns a flow
    velocity shaped like ``x_t``. ``preset`` ("few_step", "any_step", "multi_step")
    sets the knobs; a knob passed with a value other than its constructor default
    overrides the preset. ``rfba_gap_steps=None`` picks the per-NFE defaults of
    :func:`default_rfba_gap_steps`. ``guidance_scale`` must be 0: few-step models
    have CFG baked in. ``shift`` (default 1 = none) applies the SD3 resolution
    shift to the grid, matching a ``TwinFlowScheduler`` configured with it. ``step_noise`` is where the
    noise of stochastic steps comes from: ``"generator"`` (default) draws it from ``sample``'s ``generator``
    (the CPU global RNG when None, as the reference loop does); ``"latents"`` keys it on each row's initial
    noise (:mod:`fewstep.samplers.step_noise`), as an exported pipeline's ``TwinFlowScheduler`` does, so a
    sample depends only on its own starting noise and equals the pipeline's.
    """

    def __init__(
        self,
        style: str = "few",
        stochast_ratio: StochastRatio = 1.0,
        extrapol_ratio: float = 0.0,
        sampling_order: int = 1,
        time_dist_ctrl: Sequence[float] = (1.0, 1.0, 1.0),
        rfba_gap_steps: Sequence[float] | None = None,
        guidance_scale: float = 0.0,
        preset: str | None = None,
        shift: float = 1.0,
        step_noise: str = "generator",
    ):
        if guidance_scale != 0.0:
            raise ValueError(
                f"UCGMSampler needs guidance_scale=0 (got {guidance_scale}): few-step models have CFG baked in; "
                "use EulerSampler for CFG sampling of a multi-step model."
            )
        knobs = {
            "style": style,
            "stochast_ratio": stochast_ratio,
            "extrapol_ratio": extrapol_ratio,
            "sampling_order": sampling_order,
            "time_dist_ctrl": time_dist_ctrl,
            "rfba_gap_steps": rfba_gap_steps,
        }
        self.default_steps = 2
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"Unknown UCGM preset {preset!r}: use one of {', '.join(PRESETS)}.")
            p = PRESETS[preset]
            self.default_steps = p.steps
            for name, default in _KNOB_DEFAULTS.items():
                if _same(knobs[name], default):
                    knobs[name] = getattr(p, name)
        self.preset = preset
        self.style = check_style(knobs["style"])
        self.stochast_ratio = knobs["stochast_ratio"]
        resolve_stochast_ratio(self.stochast_ratio, 1.0, 0.5)
        self.extrapol_ratio = float(knobs["extrapol_ratio"])
        self.sampling_order = int(knobs["sampling_order"])
        grid_steps(1, self.sampling_order)
        self.time_dist_ctrl = tuple(float(v) for v in knobs["time_dist_ctrl"])
        if len(self.time_dist_ctrl) != 3:
            raise ValueError(f"time_dist_ctrl must be 3 numbers [a, b, c], got {knobs['time_dist_ctrl']}.")
        gaps = knobs["rfba_gap_steps"]
        self.rfba_gap_steps = None if gaps is None else tuple(float(g) for g in gaps)
        if self.rfba_gap_steps is not None and len(self.rfba_gap_steps) != 2:
            raise ValueError(f"rfba_gap_steps must be 2 numbers [g0, g1], got {gaps}.")
        self.guidance_scale = 0.0
        self.shift = float(shift)
        self.step_noise = check_step_noise(step_noise, key="sampler.step_noise")

    def gaps(self, steps: int) -> tuple[float, float]:
        return self.rfba_gap_steps if self.rfba_gap_steps is not None else default_rfba_gap_steps(self.style, steps)

    def time_grid(self, steps: int) -> torch.Tensor:
        """The float64 times this sampler visits for ``steps`` (ending in 0)."""
        return ucgm_time_grid(steps, self.gaps(steps), self.time_dist_ctrl, self.sampling_order, self.shift)

    def nfe(self, steps: int) -> int:
        """Model calls for ``steps``: ``n`` (first order) or ``2·n − 1`` (Heun, last step uncorrected)."""
        n = grid_steps(steps, self.sampling_order)
        return n if self.sampling_order == 1 else 2 * n - 1

    @torch.no_grad()
    def sample(
        self,
        model: VelocityModel,
        noise: torch.Tensor,
        cond: Any,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        null_cond: Any = None,
    ) -> torch.Tensor:
        """Integrate from ``noise`` (t = 1) to data (t = 0); ``null_cond`` is accepted and ignored."""
        steps = self.default_steps if steps is None else int(steps)
        grid = self.time_grid(steps).tolist()
        n = len(grid) - 1
        in_dtype, batch = noise.dtype, noise.shape[0]
        x = noise.to(state_dtype(noise.device))
        if self.step_noise == "latents":
            generator = LatentKeyedNoise(noise)
        stepper = UCGMStepper(self.stochast_ratio, self.extrapol_ratio)

        def call(x_state: torch.Tensor, t: float, tt: float) -> torch.Tensor:
            x_in = x_state.to(in_dtype)
            return model(x_in, full_time(t, batch, x_in), full_time(tt, batch, x_in), cond)

        for i in range(n):
            t_cur, t_next = grid[i], grid[i + 1]
            velocity = call(x, t_cur, target_time(self.style, t_cur, t_next))
            x_next, _, z_hat = stepper.step(i, x, velocity, t_cur, t_next, generator)
            if self.sampling_order == 2 and i < n - 1:
                velocity_next = call(x_next, t_next, target_time(self.style, t_next, t_next))
                _, z_hat_next = reconstruct(x_next, velocity_next.to(x), full_time(t_next, batch, x))
                x_next = heun_correction(x, z_hat, z_hat_next, t_cur, t_next)
            x = x_next
        return x.to(in_dtype)
