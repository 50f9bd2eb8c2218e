"""``TwinFlowScheduler``: the UCGM sampler as a diffusers scheduler, for exported pipelines.

    from fewstep import TwinFlowScheduler
    pipe.scheduler = TwinFlowScheduler(num_train_timesteps=1000, prediction_type="flow_matching", shift=1.0)
    image = pipe(prompt, num_inference_steps=2, guidance_scale=0.0).images[0]

It runs the same grid (:func:`~fewstep.samplers.ucgm.ucgm_time_grid`) and the same
step (:class:`~fewstep.samplers.ucgm.UCGMStepper`) as the native
:class:`~fewstep.samplers.ucgm.UCGMSampler` (``sampling_order=1``), so for the same
model, noise and random state both produce the same samples.

**Grid.** ``set_timesteps(n)`` builds the UCGM grid for ``n`` steps; ``.sigmas`` has
``n + 1`` flow times ending in 0 (default ``n = 2``, few style → ``[0.999, 0.6, 0]``)
and ``.timesteps = sigmas[:-1] · num_train_timesteps``. ``shift != 1`` applies SD3's static shift
``t' = s·t / (1 + (s − 1)·t)`` to the grid, as ``FlowMatchEulerDiscreteScheduler`` does (the native sampler takes
the same ``shift``); with ``use_dynamic_shifting=True`` the pipeline's ``mu`` shifts it instead
(``time_shift_type`` exponential ``e^μ / (e^μ + 1/t − 1)`` or linear ``μ / (μ + 1/t − 1)``, as there; a missing
``mu`` raises). A custom grid is followed as diffusers' flow-matching schedulers follow it: ``sigmas=[1.0, 0.5]``
samples at t = 1 and 0.5, then 0 (after the shift, as there; a trailing 0 may be given); ``timesteps=[...]`` are the
model's timesteps as given (flow time ``timestep / num_train_timesteps``, or for diff2flow the flow time of that
diffusion timestep), unshifted. Every UCGM style steps any decreasing grid in (0, 1]; a grid it cannot follow
(not decreasing, outside (0, 1], both ``sigmas`` and ``timesteps``, a length that disagrees with
``num_inference_steps``) raises one ``ValueError`` naming the argument. Flux and Qwen-Image pipelines pass
``sigmas = linspace(1, 1/n, n)`` together with ``mu`` when the user passes no sigmas: that exact grid with a ``mu``
stands for "no custom grid" and the UCGM grid is used (so on those pipelines a custom grid equal to it cannot be
asked for; any other is followed).

**Config from other schedulers.** ``_compatibles`` lists the flow-matching schedulers whose config it takes
(``TwinFlowScheduler.from_config(pipe.scheduler.config)``); a grid setting such a config carries that the model was
not trained with — a ``shift`` other than 1, ``use_dynamic_shifting``, ``shift_terminal``, Karras / exponential /
beta sigmas, ``invert_sigmas``, ``stochastic_sampling`` — is named in one warning (shift and dynamic shifting are
then applied; the others have no UCGM meaning and are ignored). Config values round-trip exactly through
``save_pretrained`` / ``from_pretrained`` (sequences are stored as lists).

**Target time.** TwinFlow models take a second time ``tt`` (where the jump lands).
Pipelines pass only the timestep, so a model wrapper reads it from the scheduler:
``scheduler.current_target_time()`` (flow time in [0, 1]; ``target_timestep`` is the
same × ``num_train_timesteps``) gives ``tt`` for the step about to run — 0 for the
"few" style, ``t_next`` for "any", ``t_cur`` for "mul". A wrapper that has no
scheduler to ask should use ``tt = 0`` for few-step models.

**Precision.** The trajectory is kept in float64 (as the native sampler does): while
the pipeline hands back the latents the scheduler returned, ``step`` continues from
its float64 copy; if the latents were changed in between it starts from them.

**Noise.** With ``stochast_ratio > 0`` each step mixes in fresh noise. ``step_noise="latents"`` (default) keys it
on the trajectory's initial latents (the ``sample`` of its first ``step``), row by row
(:mod:`fewstep.samplers.step_noise`; a ``generator`` passed to ``step`` is not used): a pipeline's ``generator=``
then fixes the whole trajectory, a batch made with a generator list equals the single calls, and the noise follows
each element through Qwen-Image's token packing, so the pipeline equals the native sampler with
``step_noise="latents"`` (what ``fewstep.sample`` and ``fewstep.eval`` use) for the same initial noise.
``step_noise="generator"`` draws from ``step``'s ``generator``, else the CPU global RNG (pipelines never pass one:
seed with ``torch.manual_seed``), as earlier versions did.

**diff2flow.** ``prediction_type="epsilon" | "v_prediction"`` runs a diffusion model
on the flow grid (SPEC §5): ``.timesteps`` are the diffusion timesteps whose
``σ(ᾱ)`` match the flow times, ``scale_model_input`` maps the flow state to the
diffusion state ``(√ᾱ + √(1 − ᾱ))·x``, and ``step`` converts the prediction into a flow
velocity with :func:`fewstep.models.diff2flow.diffusion_to_flow_velocity`. Flow times above the schedule's
noisiest ``σ(ᾱ_{T−1})`` (the grid starts at 0.999) use that noise level in both maps, matching the last timestep
the model is fed there, exactly as the model-side bridge (``bridged_velocity``) does. The tensor
``scale_model_input`` returns carries the step's flow times as ``fewstep_flow_times = (t, tt)``: a TwinFlow UNet
(:class:`fewstep.models.diffusion.TwinFlowUNet2DConditionModel`) reads them there, since its diffusion timestep
carries neither ``tt`` nor a ``t`` above that noisiest σ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from fewstep.models.diff2flow import (
    PREDICTION_TYPES,
    alpha_bar_from_flow_time,
    diffusion_timestep_from_flow_time,
    diffusion_to_flow_velocity,
    flow_time_from_alpha_bar,
    flow_time_range,
    flow_to_diffusion_state,
    make_alphas_cumprod,
)
from fewstep.path import expand_like, full_time
from fewstep.samplers.step_noise import LatentKeyedNoise
from fewstep.samplers.ucgm import (
    UCGMStepper,
    check_step_noise,
    check_style,
    default_rfba_gap_steps,
    shift_time,
    state_dtype,
    target_time,
    ucgm_time_grid,
)

logger = logging.getLogger(__name__)

TIME_SHIFT_TYPES = ("exponential", "linear")
# grid settings of diffusers' flow-matching configs: (key, the value that leaves the grid alone)
FOREIGN_GRID_KEYS = (
    ("shift_terminal", None),
    ("use_karras_sigmas", False),
    ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False),
    ("invert_sigmas", False),
    ("stochastic_sampling", False),
)


def _is_placeholder(sigmas: Sequence[float]) -> bool:
    """Whether ``sigmas`` is the ``linspace(1, 1/n, n)`` Flux / Qwen-Image pass when the user passes none."""
    values = np.asarray(sigmas.cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64).reshape(-1)
    n = values.size
    return n >= 1 and np.allclose(values, np.linspace(1.0, 1.0 / n, n), rtol=0.0, atol=1e-7)


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


@dataclass
class TwinFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next time; ``pred_original_sample``: the data estimate x̂ of this step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class TwinFlowScheduler(SchedulerMixin, ConfigMixin):
    """UCGM few/any/multi-step scheduler for TwinFlow / RCGM models (see the module docstring)."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        prediction_type: str = "flow_matching",
        shift: float = 1.0,
        sampling_style: str = "few",
        stochast_ratio: float | str = 1.0,
        extrapol_ratio: float = 0.0,
        time_dist_ctrl: Sequence[float] = (1.0, 1.0, 1.0),
        rfba_gap_steps: Sequence[float] | None = None,
        default_num_inference_steps: int = 2,
        step_noise: str = "latents",
        # diff2flow (prediction_type epsilon / v_prediction): the diffusion model's beta schedule
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        trained_betas: Sequence[float] | None = None,
        # read by pipelines (SD3 / Flux / QwenImage) to compute mu; with use_dynamic_shifting, mu shifts the grid
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}.")
        check_style(sampling_style, key="sampling_style")
        if len(tuple(time_dist_ctrl)) != 3:
            raise ValueError(f"time_dist_ctrl must be 3 numbers [a, b, c], got {time_dist_ctrl}.")
        if rfba_gap_steps is not None and len(tuple(rfba_gap_steps)) != 2:
            raise ValueError(f"rfba_gap_steps must be 2 numbers [g0, g1], got {rfba_gap_steps}.")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}.")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(
                f"time_shift_type={time_shift_type!r} is unknown; use one of {', '.join(TIME_SHIFT_TYPES)}."
            )
        check_step_noise(step_noise)
        # sequences as lists: the config then equals itself after save_pretrained / from_pretrained (JSON lists)
        self.register_to_config(
            time_dist_ctrl=_floats(time_dist_ctrl),
            rfba_gap_steps=_floats(rfba_gap_steps),
            trained_betas=_floats(trained_betas),
        )
        UCGMStepper(stochast_ratio, extrapol_ratio)  # validates stochast_ratio
        self.alphas_cumprod: torch.Tensor | None = None
        self._max_time = 1.0
        if prediction_type != "flow_matching":
            self.alphas_cumprod = make_alphas_cumprod(
                num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas
            )
            # the noisiest flow time the diffusion model knows: the state maps use it above (as the model-side
            # bridge, fewstep.models.diff2flow.bridged_velocity, does), matching the clamped timestep it is fed
            self._max_time = flow_time_range(self.alphas_cumprod)[1]
        self._step_index: int | None = None
        self._begin_index: int | None = None
        # mu comes with the pipeline's call; until then the dynamic shift is the identity (e^0 = 1, linear mu = 1)
        neutral_mu = (0.0 if time_shift_type == "exponential" else 1.0) if use_dynamic_shifting else None
        self.set_timesteps(default_num_inference_steps, mu=neutral_mu)

    # ------------------------------------------------------------------ grid

    @property
    def shift(self) -> float:
        return float(self.config.shift)

    @property
    def step_index(self) -> int | None:
        """Index of the step about to run (None before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Set the first step's index (pipelines call this before the loop)."""
        self._begin_index = begin_index

    def gaps(self, num_inference_steps: int) -> tuple[float, float]:
        gaps = self.config.rfba_gap_steps
        if gaps is None:
            return default_rfba_gap_steps(self.config.sampling_style, num_inference_steps)
        return (float(gaps[0]), float(gaps[1]))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
        **kwargs,
    ) -> None:
        """The grid for ``num_inference_steps`` steps: the UCGM grid, or a custom ``sigmas`` / ``timesteps`` grid,
        shifted by ``shift`` or (``use_dynamic_shifting``) by ``mu`` (see the module docstring)."""
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError(
                "TwinFlowScheduler has use_dynamic_shifting=True: set_timesteps needs mu (pipelines pass it; "
                "or build the scheduler with use_dynamic_shifting=False)."
            )
        if sigmas is not None and timesteps is not None:
            raise ValueError("TwinFlowScheduler takes sigmas or timesteps, not both: the grid is one set of times.")
        if sigmas is not None and mu is not None and _is_placeholder(sigmas):
            # Flux / Qwen-Image pass linspace(1, 1/n, n) and mu when the user passes no sigmas: the UCGM grid, n steps
            num_inference_steps = len(sigmas) if num_inference_steps is None else num_inference_steps
            sigmas = None
        custom = None
        if sigmas is not None:
            custom = self._shifted(self._custom_times(sigmas, "sigmas"), mu)
        elif timesteps is not None:
            custom = self._custom_times(timesteps, "timesteps", scale=True)
        if custom is not None:
            given = len(custom) - 1
            if num_inference_steps is not None and int(num_inference_steps) != given:
                name = "sigmas" if sigmas is not None else "timesteps"
                raise ValueError(
                    f"TwinFlowScheduler: num_inference_steps={num_inference_steps} but {given} {name}; "
                    "pass one of them, or both of one length."
                )
            n, grid = given, custom
        else:
            n = self.config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
            n = int(n)
            if n < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {n}.")
            grid = ucgm_time_grid(n, self.gaps(n), self.config.time_dist_ctrl, sampling_order=1, shift=1.0)
            grid = self._shifted(grid, mu)
        self.num_inference_steps = n
        self.sigmas = grid  # float64, CPU, n + 1 values ending in 0
        self._grid = grid.tolist()
        if timesteps is not None:
            ts = torch.as_tensor(np.asarray(timesteps, dtype=np.float64)[:n])
        elif self.alphas_cumprod is None:
            ts = grid[:-1] * self.config.num_train_timesteps
        else:
            ts = diffusion_timestep_from_flow_time(grid[:-1], self.alphas_cumprod)
        self.timesteps = ts.to(device=device, dtype=torch.float32)
        self._stepper = UCGMStepper(self.config.stochast_ratio, self.config.extrapol_ratio)
        self._state: torch.Tensor | None = None
        self._noise: LatentKeyedNoise | None = None
        self._step_index = None
        self._begin_index = None

    def _custom_times(self, values: Sequence[float], name: str, scale: bool = False) -> torch.Tensor:
        """A custom grid as flow times ending in 0 (float64), or one ValueError naming what it cannot follow."""
        raw = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).reshape(-1)
        times = torch.as_tensor(raw)
        if scale:
            times = (
                times / self.config.num_train_timesteps
                if self.alphas_cumprod is None
                else torch.where(times > 0, self._timesteps_to_times(times), torch.zeros_like(times))
            )
        if times.numel() > 1 and times[-1] == 0:
            times = times[:-1]  # the final 0 given explicitly
        shown = ", ".join(f"{v:g}" for v in raw.tolist()[:8]) + (", ..." if raw.size > 8 else "")
        problem = None
        if times.numel() < 1:
            problem = "it is empty"
        elif not bool(torch.isfinite(times).all()) or bool((times <= 0).any()) or bool((times > 1).any()):
            bound = f"(0, {self.config.num_train_timesteps}]" if scale else "(0, 1]"
            problem = f"every value but a final 0 must lie in {bound}"
        elif bool((times[1:] >= times[:-1]).any()):
            problem = "its values must decrease strictly"
        if problem is not None:
            raise ValueError(f"TwinFlowScheduler cannot follow {name}=[{shown}]: {problem}.")
        return torch.cat([times, torch.zeros(1, dtype=torch.float64)])

    def _shifted(self, grid: torch.Tensor, mu: float | None) -> torch.Tensor:
        """``grid`` (ending in 0) under the static shift, or under ``mu`` with ``use_dynamic_shifting``."""
        if not self.config.use_dynamic_shifting:
            return shift_time(grid, self.shift)
        t = grid[:-1]
        odds = 1.0 / t - 1.0
        if self.config.time_shift_type == "exponential":
            shifted = math.exp(mu) / (math.exp(mu) + odds)
        else:
            shifted = mu / (mu + odds)
        return torch.cat([shifted, grid[-1:]])

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """``ConfigMixin.from_config``; a config of another scheduler class whose grid settings differ from what
        TwinFlow models sample with is named in one warning (see the module docstring)."""
        result = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        source = dict(config or {})
        origin = source.get("_class_name") or (cls.__name__ if "sampling_style" in source else "another scheduler's")
        if origin != cls.__name__:
            changed = []
            if "shift" not in kwargs and float(source.get("shift", 1.0)) != 1.0:
                changed.append(f"shift={source['shift']} (applied)")
            if "use_dynamic_shifting" not in kwargs and source.get("use_dynamic_shifting"):
                changed.append("use_dynamic_shifting=True (mu applied)")
            changed += [
                f"{key}={source[key]!r} (ignored)"
                for key, neutral in FOREIGN_GRID_KEYS
                if key not in kwargs and source.get(key, neutral) not in (neutral, None, False, 0, 0.0)
            ]
            if changed:
                logger.warning(
                    "TwinFlowScheduler.from_config(%s config): %s; a TwinFlow model samples on the grid of its run "
                    "(an export's own scheduler config, shift=1.0 unless the run's sampler set one): pass shift=1.0, "
                    "use_dynamic_shifting=False to sample on it.",
                    origin,
                    ", ".join(changed),
                )
        return result

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in the schedule (nearest, so a float round-trip still finds it)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, device=schedule.device, dtype=schedule.dtype).reshape(-1)[0]
        return int((schedule - timestep).abs().argmin().item())

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _current_index(self) -> int:
        idx = self._step_index if self._step_index is not None else (self._begin_index or 0)
        return min(idx, self.num_inference_steps - 1)

    def current_time(self) -> float:
        """Flow time ``t`` of the step about to run."""
        return self._grid[self._current_index()]

    def current_target_time(self) -> float:
        """Target time ``tt`` (flow time, [0, 1]) of the step about to run: 0 for the few style."""
        i = self._current_index()
        return target_time(self.config.sampling_style, self._grid[i], self._grid[i + 1])

    @property
    def target_timestep(self) -> float:
        """``current_target_time() · num_train_timesteps``."""
        return self.current_target_time() * self.config.num_train_timesteps

    def _index_of(self, timestep: float | torch.Tensor | None) -> int:
        """Grid index of a schedule timestep (the current step's when this is mid-loop or None)."""
        if timestep is None or self._step_index is not None:
            return self._current_index()
        return self.index_for_timestep(timestep)

    def _timesteps_to_times(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample flow times of arbitrary (training-style) timesteps, float64."""
        timesteps = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        if self.alphas_cumprod is None:
            return timesteps / self.config.num_train_timesteps
        table = self.alphas_cumprod.to(timesteps.device)
        k = timesteps.clamp(0, table.numel() - 1)
        lo = k.floor().long().clamp(max=table.numel() - 2)
        frac = k - lo
        alpha_bar = table[lo] * (1 - frac) + table[lo + 1] * frac
        return flow_time_from_alpha_bar(alpha_bar)

    # ------------------------------------------------------------------ pipeline hooks

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity for flow models; the flow → diffusion state map ``(√ᾱ + √(1 − ᾱ))·x`` for epsilon / v models."""
        if self.alphas_cumprod is None:
            return sample
        i = self._index_of(timestep)
        t, tt = self._grid[i], target_time(self.config.sampling_style, self._grid[i], self._grid[i + 1])
        alpha_bar = alpha_bar_from_flow_time(torch.tensor(min(t, self._max_time), dtype=torch.float64))
        scaled = flow_to_diffusion_state(sample, alpha_bar).to(sample.dtype)
        # the step's flow times travel with the input, for a TwinFlow UNet's time-pair embedding
        # (fewstep.models.diffusion.TwinFlowUNet2DConditionModel): a diffusion timestep carries neither tt nor a t
        # above the schedule's noisiest σ
        scaled.fewstep_flow_times = (t, tt)
        return scaled

    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward process at schedule timestep(s): ``t·noise + (1 − t)·sample`` (img2img / inpainting)."""
        if noise is None:
            noise = torch.randn_like(sample)
        timestep = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timestep]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * timestep.numel()
        t = torch.tensor([self._grid[i] for i in idx], dtype=torch.float64, device=sample.device)
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        tb = expand_like(t, sample)
        return tb * noise + (1 - tb) * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Training-style noising at any timesteps (flow: ``t = timestep / num_train_timesteps``)."""
        t = self._timesteps_to_times(timesteps).to(original_samples.device)
        if t.numel() == 1:
            t = t.expand(original_samples.shape[0])
        tb = expand_like(t, original_samples)
        return tb * noise + (1 - tb) * original_samples

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> TwinFlowSchedulerOutput | tuple:
        """One UCGM step from the current time to the next; ``model_output`` is the model's prediction at
        ``scale_model_input(sample)`` (a flow velocity, or epsilon / v per ``prediction_type``)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(
                f"TwinFlowScheduler.step called {i + 1} times for {self.num_inference_steps} steps; "
                "call set_timesteps again before a new trajectory."
            )
        t_cur, t_next = self._grid[i], self._grid[i + 1]
        work = state_dtype(sample.device)
        if (
            self._state is not None
            and self._state.shape == sample.shape
            and self._state.device == sample.device
            and torch.equal(self._state.to(sample.dtype), sample)
        ):
            x = self._state
        else:
            x = sample.to(work)
        velocity = model_output.to(work)
        if self.alphas_cumprod is not None:
            alpha_bar = alpha_bar_from_flow_time(full_time(min(t_cur, self._max_time), x.shape[0], x))
            velocity = diffusion_to_flow_velocity(
                velocity, flow_to_diffusion_state(x, alpha_bar), alpha_bar, self.config.prediction_type
            )
        if self.config.step_noise == "latents":
            if self._noise is None or self._noise.shape != tuple(x.shape):
                self._noise = LatentKeyedNoise(x)  # keyed on the trajectory's first state: the initial latents
            generator = self._noise
        x_next, x_hat, _ = self._stepper.step(i, x, velocity, t_cur, t_next, generator)
        self._state = x_next
        self._step_index = i + 1
        prev_sample, pred_original = x_next.to(sample.dtype), x_hat.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original)
        return TwinFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
