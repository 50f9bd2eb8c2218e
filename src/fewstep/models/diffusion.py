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
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from fewstep.models.diff2flow import (
    alphas_cumprod_from_scheduler_config,
    bridged_velocity,
    diffusion_timestep_from_flow_time,
    flow_time_range,
)
from fewstep.models.family import (
    Family,
    PretrainedNotFound,
    add_lora,
    chunked_no_grad,
    dtype_kwargs,
    load_error,
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
    ):
        super().__init__()
        if prediction_type not in DIFFUSION_PREDICTIONS:
            raise ValueError(
                f"model.prediction_type={prediction_type!r}: a diffusion UNet predicts 'epsilon' or 'v_prediction'"
            )
        from diffusers import UNet2DConditionModel

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
        found = _scheduler_config(source, sub, revision) if schedule_from_pretrained else None
        if found is not None:
            keys = (*schedule, "trained_betas", "rescale_betas_zero_snr")
            schedule.update({k: found[k] for k in keys if found.get(k) is not None})
            theirs = found.get("prediction_type")
            if theirs in DIFFUSION_PREDICTIONS and theirs != prediction_type:
                raise ValueError(
                    f"model.prediction_type={prediction_type} but {pretrained}'s scheduler says {theirs}; "
                    f"set model.prediction_type={theirs}"
                )
        self.alphas_cumprod = alphas_cumprod_from_scheduler_config(schedule)  # float64, not a buffer
        self.max_time = flow_time_range(self.alphas_cumprod)[1]
        if prediction_type == "epsilon" and self.max_time >= 1.0:
            raise ValueError(
                f"model.pretrained={pretrained}: a zero terminal SNR schedule (rescale_betas_zero_snr) has no x0 from "
                "epsilon at the last step; such models predict v (model.prediction_type=v_prediction)"
            )
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
            base = unet.time_embedding
            self.target_embedding = copy.deepcopy(base)
            nn.init.zeros_(self.target_embedding.linear_2.weight)
            if self.target_embedding.linear_2.bias is not None:
                nn.init.zeros_(self.target_embedding.linear_2.bias)
            ref = base.linear_2.weight
            self.sign_embedding = nn.Embedding(2, ref.shape[0], device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.sign_embedding.weight)
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

    def _add_time_pair_embedding(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self._times is None:
            return output
        t, tt = self._times
        n = output.shape[0]
        t = t.reshape(-1).float().expand(n)
        tt = tt.reshape(-1).float().expand(n)
        k_tt = diffusion_timestep_from_flow_time(tt.abs().clamp(max=self.max_time), self.alphas_cumprod).float()
        weight_dtype = self.target_embedding.linear_1.weight.dtype
        target = self.target_embedding(self.unet.time_proj(k_tt).to(weight_dtype))
        extra = target * (t - tt).to(target.dtype)[:, None] + self.sign_embedding((t < 0).long()).to(target.dtype)
        return output + extra.to(output.dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        return chunked_no_grad(self._forward, self.no_grad_chunk, x_t, t, tt, cond)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond) -> torch.Tensor:
        if isinstance(cond, dict):
            if "prompt_embeds" not in cond:
                raise TypeError("diffusion UNets take cond={'prompt_embeds': (B, L, D)} (data=latents)")
            context = cond["prompt_embeds"]
        else:
            context = cond
        context = context.to(device=x_t.device, dtype=self.weight_dtype)

        def predict(x_diff: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.unet(
                x_diff.to(self.weight_dtype), timestep.float(), encoder_hidden_states=context, return_dict=False
            )[0]

        if self.time_pair:
            self._times = (t, tt)
        try:
            return bridged_velocity(predict, x_t, t, self.alphas_cumprod, self.prediction_type, self.max_time)
        finally:
            self._times = None


class SD15Family(Family):
    """Stable Diffusion 1.x/2.x pipelines (precompute and ``data=latents``; no fewstep export)."""

    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"


FAMILY = SD15Family()
