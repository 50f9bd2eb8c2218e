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
and ``.timesteps = sigmas[:-1] · num_train_timesteps``. Pipelines that pass
``sigmas`` (Flux, QwenImage) or ``mu`` (dynamic shifting) or ``timesteps`` only set the
*number* of steps: the scheduler's own UCGM grid wins and their values are ignored.
``shift != 1`` applies SD3's static shift ``t' = s·t / (1 + (s − 1)·t)`` to the grid,
as ``FlowMatchEulerDiscreteScheduler`` does (the native sampler takes the same ``shift``).

**Target time.** TwinFlow models take a second time ``tt`` (where the jump lands).
Pipelines pass only the timestep, so a model wrapper reads it from the scheduler:
``scheduler.current_target_time()`` (flow time in [0, 1]; ``target_timestep`` is the
same × ``num_train_timesteps``) gives ``tt`` for the step about to run — 0 for the
"few" style, ``t_next`` for "any", ``t_cur`` for "mul". A wrapper that has no
scheduler to ask should use ``tt = 0`` for few-step models.

**Precision.** The trajectory is kept in float64 (as the native sampler does): while
the pipeline hands back the latents the scheduler returned, ``step`` continues from
its float64 copy; if the latents were changed in between it starts from them.

**Noise.** With ``stochast_ratio > 0`` each step draws noise from ``generator`` (or the
CPU global RNG: pipelines call ``step`` without a generator, so seed with
``torch.manual_seed``).

**diff2flow.** ``prediction_type="epsilon" | "v_prediction"`` runs a diffusion model
on the flow grid (SPEC §5): ``.timesteps`` are the diffusion timesteps whose
``σ(ᾱ)`` match the flow times, ``scale_model_input`` maps the flow state to the
diffusion state ``(√ᾱ + √(1 − ᾱ))·x``, and ``step`` converts the prediction into a flow
velocity with :func:`fewstep.models.diff2flow.diffusion_to_flow_velocity`. Flow times above the schedule's
noisiest ``σ(ᾱ_{T−1})`` (the grid starts at 0.999) use that noise level in both maps, matching the last timestep
the model is fed there, exactly as the model-side bridge (``bridged_velocity``) does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

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
from fewstep.samplers.ucgm import (
    UCGMStepper,
    check_style,
    default_rfba_gap_steps,
    state_dtype,
    target_time,
    ucgm_time_grid,
)

logger = logging.getLogger(__name__)


@dataclass
class TwinFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next time; ``pred_original_sample``: the data estimate x̂ of this step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class TwinFlowScheduler(SchedulerMixin, ConfigMixin):
    """UCGM few/any/multi-step scheduler for TwinFlow / RCGM models (see the module docstring)."""

    _compatibles: list = []
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
        # diff2flow (prediction_type epsilon / v_prediction): the diffusion model's beta schedule
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        trained_betas: Sequence[float] | None = None,
        # read by pipelines (SD3 / Flux / QwenImage); dynamic shifting is not applied (the UCGM grid wins)
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
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
        self.set_timesteps(default_num_inference_steps)

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
        """Build the UCGM grid for ``num_inference_steps`` steps (else ``len(sigmas)`` / ``len(timesteps)``,
        else ``default_num_inference_steps``). Values of ``sigmas``, ``timesteps`` and ``mu`` are ignored."""
        n = num_inference_steps
        if n is None and sigmas is not None:
            n = len(sigmas)
        if n is None and timesteps is not None:
            n = len(timesteps)
        if n is None:
            n = self.config.default_num_inference_steps
        n = int(n)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}.")
        if sigmas is not None or timesteps is not None or mu is not None:
            logger.debug("TwinFlowScheduler: custom sigmas/timesteps/mu ignored; using the UCGM grid for %d steps.", n)
        grid = ucgm_time_grid(n, self.gaps(n), self.config.time_dist_ctrl, sampling_order=1, shift=self.shift)
        self.num_inference_steps = n
        self.sigmas = grid  # float64, CPU, n + 1 values ending in 0
        self._grid = grid.tolist()
        if self.alphas_cumprod is None:
            ts = grid[:-1] * self.config.num_train_timesteps
        else:
            ts = diffusion_timestep_from_flow_time(grid[:-1], self.alphas_cumprod)
        self.timesteps = ts.to(device=device, dtype=torch.float32)
        self._stepper = UCGMStepper(self.config.stochast_ratio, self.config.extrapol_ratio)
        self._state: torch.Tensor | None = None
        self._step_index = None
        self._begin_index = None

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

    def _time_of(self, timestep: float | torch.Tensor | None) -> float:
        """Flow time of a schedule timestep (the current step's when this is mid-loop or None)."""
        if timestep is None or self._step_index is not None:
            return self.current_time()
        return self._grid[self.index_for_timestep(timestep)]

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
        time = min(self._time_of(timestep), self._max_time)
        alpha_bar = alpha_bar_from_flow_time(torch.tensor(time, dtype=torch.float64))
        return flow_to_diffusion_state(sample, alpha_bar).to(sample.dtype)

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
        x_next, x_hat, _ = self._stepper.step(i, x, velocity, t_cur, t_next, generator)
        self._state = x_next
        self._step_index = i + 1
        prev_sample, pred_original = x_next.to(sample.dtype), x_hat.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original)
        return TwinFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
