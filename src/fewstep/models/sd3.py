"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``) as a fewstep model ``f(x_t, t, tt, cond)``.

``SD3Model`` (``model=sd35`` full fine-tune, ``model=sd35_lora`` with a peft LoRA adapter) loads the
transformer from a hub id or a local folder and calls diffusers' own forward with ``timestep = |t|·1000``
and ``cond = {"prompt_embeds", "pooled_prompt_embeds"}`` (SPEC §4).

With ``time_pair=True`` (objectives that need the target time and the sign: TwinFlow, RCGM) the
transformer's ``time_text_embed`` is replaced by :class:`TwinFlowTimeTextEmbedding`, a subclass that keeps
the original sub-modules (same state-dict keys) and adds

    ``temb + target_embedder(|tt|·1000, pooled)·(t − tt) + sign_embedding[t < 0]``

(the reference's ``aux_time_embed``; ``target_embedder`` has the architecture of the time-text embedder).
Both extras start at exactly zero (``target_embedder``'s output layers and the 2-row sign table are
zero-initialised), so at step 0 the model equals the pretrained one. The per-call signed times reach the
embedding through its ``time_pair_times`` attribute, set by the caller around the transformer's forward.
``time_pair=False`` leaves the transformer untouched (no extra modules). The family-independent parts
(loading, LoRA, the embedding's zero-init, export) live in :mod:`fewstep.models.family`.

:class:`SD3TwinFlowTransformer2DModel` is the same transformer as a diffusers class whose config carries
``time_pair``: exported pipelines save it, and ``StableDiffusion3Pipeline.from_pretrained`` restores it
(after ``import fewstep.models.sd3``; diffusers resolves the library name ``fewstep.models.sd3`` from
``sys.modules``). Inside a pipeline, which passes only ``timestep``, the target time is
``target_timestep`` if given, else ``target_time_source.current_target_time()`` (e.g. the
``TwinFlowScheduler``), else ``config.default_target_time`` (0: the few-step jump).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' loader finds the base class here

from fewstep.models.family import (  # noqa: F401 - PretrainedNotFound, resolve_pretrained: public here too
    DiffusersFamilyModel,
    Family,
    PretrainedNotFound,
    TimePairEmbedding,
    TwinFlowTransformerMixin,
    cond_tensors,
    resolve_pretrained,
)

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")


class TwinFlowTimeTextEmbedding(TimePairEmbedding, CombinedTimestepTextProjEmbeddings):
    """SD3's time-text embedder plus the target-time term and the sign embedding (module docstring).

    Keeps the original ``time_proj`` / ``timestep_embedder`` / ``text_embedder`` (so pretrained keys are
    unchanged) and adds ``target_embedder`` (same architecture, output layers zero) and ``sign_embedding``
    (2 rows, zero; row 1 = negative time, the fake trajectory)."""

    zero_layers = ("timestep_embedder.linear_2", "text_embedder.linear_2")
    timestep_scale = float(NUM_TRAIN_TIMESTEPS)

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        temb = super().forward(timestep, pooled_projection)
        t, tt = self.signed_times(timestep, temb.shape[0], temb.device)
        weight_dtype = self.target_weight_dtype()
        target = self.target_embedder(tt.abs() * NUM_TRAIN_TIMESTEPS, pooled_projection.to(weight_dtype))
        extra = self.scaled_target(target, t, tt) + self.sign(t, target.dtype)
        return temb + extra.to(temb.dtype)


class SD3TwinFlowTransformer2DModel(TwinFlowTransformerMixin, SD3Transformer2DModel):
    """``SD3Transformer2DModel`` whose config records the TwinFlow embeddings (``time_pair``), so
    ``save_pretrained`` / ``from_pretrained`` round-trip them. Accepts ``target_timestep`` (× 1000, like
    ``timestep``) in ``forward``; see :class:`~fewstep.models.family.TwinFlowTransformerMixin`."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        time_pair: bool = True,
        default_target_time: float = 0.0,
    ):
        super().__init__(
            sample_size,
            patch_size,
            in_channels,
            num_layers,
            attention_head_dim,
            num_attention_heads,
            joint_attention_dim,
            caption_projection_dim,
            pooled_projection_dim,
            out_channels,
            pos_embed_max_size,
            dual_attention_layers,
            qk_norm,
        )
        self.init_time_pair(TwinFlowTimeTextEmbedding, time_pair, default_target_time)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
        target_timestep: torch.Tensor | float | None = None,
    ):
        with self.pipeline_times(timestep, target_timestep, hidden_states.shape[0], hidden_states.device):
            return super().forward(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                block_controlnet_hidden_states=block_controlnet_hidden_states,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=return_dict,
                skip_layers=skip_layers,
            )


class SD3Model(DiffusersFamilyModel):
    """``f(x_t, t, tt, cond) -> velocity`` over a diffusers SD3 transformer (see the module docstring and
    :class:`~fewstep.models.family.DiffusersFamilyModel`)."""

    family = "sd3"
    transformer_class = SD3Transformer2DModel
    export_class = SD3TwinFlowTransformer2DModel
    time_embed_attr = "time_text_embed"
    time_embed_class = TwinFlowTimeTextEmbedding
    default_lora_targets = DEFAULT_LORA_TARGETS
    default_pretrained = "stabilityai/stable-diffusion-3.5-medium"

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        prompt_embeds, pooled = cond_tensors(
            cond, ("prompt_embeds", "pooled_prompt_embeds"), "SD3", x_t.device, self.weight_dtype
        )
        return self.transformer(
            hidden_states=x_t.to(self.weight_dtype),
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=t.abs().float() * NUM_TRAIN_TIMESTEPS,
            return_dict=False,
        )[0]


class SD3Family(Family):
    """SD3 pipelines: two CLIPs + T5 through ``encode_prompt`` (prompt and pooled embeddings)."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    model_class = SD3Model
    max_sequence_length = 256  # StableDiffusion3Pipeline.__call__: T5 tokens (after CLIP's 77)

    def encode_text(self, pipe, prompts, device, max_sequence_length, options):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}


FAMILY = SD3Family()
