"""Diffusion models (epsilon / v-prediction) seen as flow models through the diff2flow bridge (SPEC §5).

``model=sd15``: a diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x) whose every call speaks
flow: flow time ``t`` → the continuous diffusion timestep whose σ matches (the scheduler's ``alphas_cumprod``
interpolated), ``x_diff = (√ᾱ + √(1 − ᾱ))·x_flow``, prediction → ``x̂0`` and ``ε̂`` → velocity ``ε̂ − x̂0``
(:func:`fewstep.models.diff2flow.bridged_velocity`). Student, teacher, adversarial and sampling passes all go
through this one ``forward``, so nothing bypasses the bridge. ``validate`` refuses the family unless
``diff2flow.enabled=true`` and ``objective.allow_diff2flow=true``.

With ``time_pair=True`` the UNet's time embedding gets the TwinFlow extras, as for SD3: a forward hook on
``unet.time_embedding`` adds ``target_embedding(proj(k(tt)))·(t − tt) + sign_embedding[t < 0]``, where
``target_embedding`` copies the UNet's ``TimestepEmbedding`` with a zero output layer and the sign table is
zero, so at step 0 the model equals the pretrained one. ``cond = {"prompt_embeds"}`` (other keys ignored).

Export (``python -m fewstep.export``): the UNet (LoRA merged) as :class:`TwinFlowUNet2DConditionModel` (the same
embeddings, config ``time_pair`` and the training ``diffusion_schedule``) in a ``StableDiffusionPipeline`` with a
diff2flow ``TwinFlowScheduler`` (the model's ``prediction_type`` and beta schedule): the scheduler maps the flow
state to the diffusion state, the UNet predicts epsilon / v, the scheduler steps in flow space, so the pipeline
samples as ``fewstep.sample``.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from fewstep.models.diff2flow import (
    alphas_cumprod_from_scheduler_config,
    bridged_velocity,
    diffusion_timestep_from_flow_time,
    flow_time_from_alpha_bar,
    flow_time_range,
)
from fewstep.models.family import (
    Family,
    PretrainedNotFound,
    add_lora,
    chunked_no_grad,
    dtype_kwargs,
    load_error,
    merged_state_dict,
    parse_dtype,
    resolve_pretrained,
)

DIFFUSION_PREDICTIONS = ("epsilon", "v_prediction")


def _scheduler_config(source: str, subfolder: str | None, revision: str | None) -> dict | None:
    """The pipeline's ``scheduler/scheduler_config.json`` when there is one (None for a bare UNet folder)."""
    if subfolder is None:  # a bare UNet folder: no scheduler beside it
        return None
    local = Path(source)
    if local.is_dir():
        path = local / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text()) if path.exists() else None
    try:
        from diffusers import DDPMScheduler

        return dict(DDPMScheduler.load_config(source, subfolder="scheduler", revision=revision))
    except (OSError, ValueError):
        return None


def zero_target_embedding(time_embedding: nn.Module) -> nn.Module:
    """A copy of the UNet's ``TimestepEmbedding`` whose output layer is zero (the TwinFlow target-time term)."""
    target = copy.deepcopy(time_embedding)
    nn.init.zeros_(target.linear_2.weight)
    if target.linear_2.bias is not None:
        nn.init.zeros_(target.linear_2.bias)
    return target


def zero_sign_embedding(time_embedding: nn.Module) -> nn.Embedding:
    """The 2-row sign table (row 1: negative time), zero."""
    ref = time_embedding.linear_2.weight
    sign = nn.Embedding(2, ref.shape[0], device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(sign.weight)
    return sign


def time_pair_term(
    unet, target_embedding, sign_embedding, t, tt, alphas_cumprod, max_time: float, n: int
) -> torch.Tensor:
    """``target_embedding(proj(k(|tt|)))·(t − tt) + sign_embedding[t < 0]`` for ``n`` rows (``t``, ``tt``: flow
    times, scalars or rows; ``k``: the diffusion timestep whose σ matches, |tt| clamped to ``max_time``)."""
    t = torch.as_tensor(t).reshape(-1).float().expand(n)
    tt = torch.as_tensor(tt, device=t.device).reshape(-1).float().expand(n)
    k_tt = diffusion_timestep_from_flow_time(tt.abs().clamp(max=max_time), alphas_cumprod).float()
    weight_dtype = target_embedding.linear_1.weight.dtype
    target = target_embedding(unet.time_proj(k_tt).to(weight_dtype))
    return target * (t - tt).to(target.dtype)[:, None] + sign_embedding((t < 0).long()).to(target.dtype)


def _unet_init_with(extra: dict):
    """``__init__`` for a ``UNet2DConditionModel`` subclass with ``extra`` config keys (defaults) after the UNet's:
    the UNet's decorated ``__init__`` registers its own keys, these are registered beside them, and the signature
    lists all of them (what ``from_config`` passes on)."""
    base = inspect.signature(UNet2DConditionModel.__init__)
    params = list(base.parameters.values()) + [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in extra.items()
    ]

    def __init__(self, *args, **kwargs):
        own = {k: kwargs.pop(k, v) for k, v in extra.items()}
        UNet2DConditionModel.__init__(self, *args, **kwargs)
        self.register_to_config(**own)
        self._init_extras(**own)

    __init__.__signature__ = base.replace(parameters=params)
    return __init__


class TwinFlowUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` with the TwinFlow target-time / sign embeddings (``target_embedding``,
    ``sign_embedding``: the keys of :class:`DiffusionUNetModel`), added to its time embedding in ``forward``. Its
    config records them (``time_pair``, ``default_target_time``) and the training schedule (``diffusion_schedule``:
    the diffusers beta-schedule keys), so ``save_pretrained`` / ``from_pretrained`` round-trip it.

    In a pipeline, the flow times ``(t, tt)`` of the step come with the input: ``TwinFlowScheduler.scale_model_input``
    marks the tensor it returns with them (``fewstep_flow_times``), and the pipeline hands that tensor to the UNet.
    An unmarked input (another scheduler) gets ``t`` = the flow time of ``timestep`` and ``tt`` =
    ``config.default_target_time`` (0: the few-step jump)."""

    __init__ = _unet_init_with({"time_pair": True, "default_target_time": 0.0, "diffusion_schedule": None})

    def _init_extras(self, time_pair: bool, default_target_time: float, diffusion_schedule: dict | None) -> None:
        self.alphas_cumprod = alphas_cumprod_from_scheduler_config(dict(diffusion_schedule or {}))
        self.max_time = flow_time_range(self.alphas_cumprod)[1]
        self._times = None
        if time_pair:
            self.target_embedding = zero_target_embedding(self.time_embedding)
            self.sign_embedding = zero_sign_embedding(self.time_embedding)
            self.time_embedding.register_forward_hook(self._add_time_pair_embedding)

    def flow_time_of_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ of a (continuous) diffusion timestep: the schedule's σ table interpolated."""
        table = flow_time_from_alpha_bar(self.alphas_cumprod)
        k = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu().clamp(0, table.numel() - 1)
        lo = k.floor().long().clamp(max=table.numel() - 2)
        return table[lo] + (k - lo) * (table[lo + 1] - table[lo])

    def _add_time_pair_embedding(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self._times is None:
            return output
        t, tt = self._times
        extra = time_pair_term(
            self, self.target_embedding, self.sign_embedding, t.to(output.device), tt.to(output.device),
            self.alphas_cumprod, self.max_time, output.shape[0],
        )  # fmt: skip
        return output + extra.to(output.dtype)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        if self.config.time_pair:
            times = getattr(sample, "fewstep_flow_times", None)
            if times is None:
                t = self.flow_time_of_timestep(timestep)
                times = (t, torch.full_like(t, float(self.config.default_target_time)))
            self._times = tuple(torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in times)
        try:
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        finally:
            self._times = None


class DiffusionUNetModel(nn.Module):
    """``f(x_t, t, tt, cond) -> flow velocity`` over an epsilon / v-prediction ``UNet2DConditionModel``."""

    family = "sd15"

    def __init__(
        self,
        pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        subfolder: str | None = None,
        revision: str | None = None,
        prediction_type: str = "epsilon",
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        lora: dict | None = None,
        no_grad_chunk: int = 0,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        schedule_from_pretrained: bool = True,
        data_shape: list[int] | tuple[int, ...] | None = None,
        num_classes: int = 0,
        time_pair: bool = False,
        random_init: bool = False,
        architecture: str | None = None,
        num_layers: int | None = None,
    ):
        super().__init__()
        if prediction_type not in DIFFUSION_PREDICTIONS:
            raise ValueError(
                f"model.prediction_type={prediction_type!r}: a diffusion UNet predicts 'epsilon' or 'v_prediction'"
            )
        self.prediction_type = prediction_type
        self.no_grad_chunk = int(no_grad_chunk)
        self.time_pair = bool(time_pair)
        self.weight_dtype = parse_dtype(dtype)
        lora = dict(lora or {})
        self.lora_enabled = bool(lora.get("enabled", False))
        source, sub = resolve_pretrained(pretrained, "unet", subfolder)
        schedule = {
            "num_train_timesteps": num_train_timesteps,
            "beta_schedule": beta_schedule,
            "beta_start": beta_start,
            "beta_end": beta_end,
        }
        self.random_init = bool(random_init)
        load_schedule = schedule_from_pretrained and not self.random_init
        found = _scheduler_config(source, sub, revision) if load_schedule else None
        if found is not None:
            keys = (*schedule, "trained_betas", "rescale_betas_zero_snr")
            schedule.update({k: found[k] for k in keys if found.get(k) is not None})
            theirs = found.get("prediction_type")
            if theirs in DIFFUSION_PREDICTIONS and theirs != prediction_type:
                raise ValueError(
                    f"model.prediction_type={prediction_type} but {pretrained}'s scheduler says {theirs}; "
                    f"set model.prediction_type={theirs}"
                )
        self.schedule = schedule  # the diffusers beta-schedule keys (what an export's scheduler and UNet record)
        self.alphas_cumprod = alphas_cumprod_from_scheduler_config(schedule)  # float64, not a buffer
        self.max_time = flow_time_range(self.alphas_cumprod)[1]
        if prediction_type == "epsilon" and self.max_time >= 1.0:
            raise ValueError(
                f"model.pretrained={pretrained}: a zero terminal SNR schedule (rescale_betas_zero_snr) has no x0 from "
                "epsilon at the last step; such models predict v (model.prediction_type=v_prediction)"
            )
        if self.random_init:
            unet = self.random_unet(architecture, num_layers, self.weight_dtype)
        else:
            try:
                unet = UNet2DConditionModel.from_pretrained(
                    source, subfolder=sub, revision=revision, **dtype_kwargs(self.weight_dtype)
                )
            except PretrainedNotFound:
                raise
            except (OSError, ValueError) as err:
                raise load_error("model.pretrained", pretrained, err) from err
        if data_shape and int(data_shape[0]) != unet.config.in_channels:
            raise ValueError(
                f"the data has {data_shape[0]}-channel latents but model.pretrained={pretrained} expects "
                f"{unet.config.in_channels}; precompute the cache with the same pretrained model"
            )
        self.unet = unet
        self._times: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.time_pair:
            self.target_embedding = zero_target_embedding(unet.time_embedding)
            self.sign_embedding = zero_sign_embedding(unet.time_embedding)
            unet.time_embedding.register_forward_hook(self._add_time_pair_embedding)
        if self.lora_enabled:
            add_lora(unet, lora, default_targets=("to_q", "to_k", "to_v", "to_out.0"))
            if self.time_pair:
                self.target_embedding.requires_grad_(True)
                self.sign_embedding.requires_grad_(True)
            for p in self.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    @classmethod
    def random_unet(cls, architecture: str | None, num_layers: int | None, dtype: torch.dtype) -> nn.Module:
        """``model.random_init=true``: the shipped UNet architecture ``model.architecture`` (published config, random
        weights, nothing downloaded; the DDPM schedule from the model config) for step-time and memory measurements."""
        from fewstep.models import architectures  # not at the top: an export would copy it (export/code.py)

        if not architecture:
            raise architectures.ArchitectureError(
                f"model.random_init=true needs model.architecture (one of {', '.join(architectures.names())})"
            )
        arch = architectures.load(architecture)
        if arch.class_name != UNet2DConditionModel.__name__ or arch.family != cls.family:
            raise architectures.ArchitectureError(
                f"model.architecture={architecture} is a {arch.family} {arch.class_name}, not the {cls.family} "
                "family's UNet2DConditionModel; pick one of its architectures or another model"
            )
        if num_layers is not None:
            raise architectures.ArchitectureError(
                "model.num_layers reduces a transformer's depth; a UNet is built whole"
            )
        return architectures.random_transformer(architecture, dtype, cls=UNet2DConditionModel)

    def _add_time_pair_embedding(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self._times is None:
            return output
        t, tt = self._times
        extra = time_pair_term(
            self.unet, self.target_embedding, self.sign_embedding, t, tt, self.alphas_cumprod, self.max_time,
            output.shape[0],
        )  # fmt: skip
        return output + extra.to(output.dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        return chunked_no_grad(self._forward, self.no_grad_chunk, x_t, t, tt, cond)

    def added_conditions(self, cond, x_t: torch.Tensor) -> dict:
        """Extra keyword arguments of the UNet call (SDXL: ``added_cond_kwargs``); none for SD 1.x/2.x."""
        return {}

    # -- export (fewstep.export) -----------------------------------------------------------------

    export_class = TwinFlowUNet2DConditionModel

    @property
    def denoiser(self) -> nn.Module:
        """The diffusers network an export writes (and a LoRA export's adapter lives on)."""
        return self.unet

    def has_time_pair(self) -> bool:
        return self.time_pair

    def time_pair_state_dict(self) -> dict[str, torch.Tensor]:
        """The TwinFlow embeddings (keys of :class:`TwinFlowUNet2DConditionModel`)."""
        prefixes = ("target_embedding.", "sign_embedding.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def scheduler_kwargs(self) -> dict:
        """What a ``TwinFlowScheduler`` needs to drive this UNet: its prediction type and training schedule."""
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas")
        return {"prediction_type": self.prediction_type, **{k: self.schedule[k] for k in keys if k in self.schedule}}

    def export_transformer(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A standalone UNet with this model's weights (LoRA merged): :class:`TwinFlowUNet2DConditionModel` with
        the time-pair embeddings, else the vanilla ``UNet2DConditionModel``."""
        config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        state = merged_state_dict(self.unet) if self.lora_enabled else self.unet.state_dict()
        if self.time_pair:
            schedule = {k: v for k, v in self.schedule.items() if v is not None}
            out = TwinFlowUNet2DConditionModel.from_config(
                {**config, "time_pair": True, "diffusion_schedule": schedule}
            )
            state = {**state, **self.time_pair_state_dict()}
        else:
            out = UNet2DConditionModel.from_config(config)
        out.load_state_dict(state, strict=True)
        out = out.to(dtype or self.weight_dtype)
        return out.eval()

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        if isinstance(cond, dict):
            if "prompt_embeds" not in cond:
                raise TypeError("diffusion UNets take cond={'prompt_embeds': (B, L, D)} (data=latents)")
            context = cond["prompt_embeds"]
        else:
            context = cond
        context = context.to(device=x_t.device, dtype=self.weight_dtype)

        extra = self.added_conditions(cond, x_t)

        def predict(x_diff: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.unet(
                x_diff.to(self.weight_dtype),
                timestep.float(),
                encoder_hidden_states=context,
                return_dict=False,
                **extra,
            )[0]

        if self.time_pair:
            self._times = (t, tt)
        try:
            return bridged_velocity(predict, x_t, t, self.alphas_cumprod, self.prediction_type, self.max_time)
        finally:
            self._times = None


class SD15Family(Family):
    """Stable Diffusion 1.x/2.x pipelines: precompute, ``data=latents`` and export (the UNet as
    :class:`TwinFlowUNet2DConditionModel`, sampled by a diff2flow ``TwinFlowScheduler``)."""

    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    model_class = DiffusionUNetModel
    denoiser = "unet"


FAMILY = SD15Family()
