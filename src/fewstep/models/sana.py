"""SANA (diffusers ``SanaTransformer2DModel``, DC-AE latents, Gemma-2 text) as a fewstep model ``f(x_t, t, tt, cond)``.

``SanaModel`` (``model=sana`` full fine-tune, ``model=sana_lora``) calls the transformer with
``timestep = |t|·1000·timestep_scale`` (the pipeline's scale) and ``cond = {"prompt_embeds",
"prompt_attention_mask"}`` (Gemma-2 embeddings padded to ``max_sequence_length``, and their mask).

The time embedding ``time_embed`` is an ``AdaLayerNormSingle`` returning ``(mod, emb)`` (6·D modulation for the
blocks, D embedding for the output norm). With ``time_pair=True`` it becomes :class:`SanaTimePairEmbedding`:
a second ``AdaLayerNormSingle`` ``target_embedder`` (a copy whose output layers are zero) is evaluated at
``|tt|`` and scaled by ``d = t − tt`` on both outputs, and a 2-row sign table of width 7·D (zero) adds to
both::

    mod + mod2(|tt|)·d + sign[t < 0][:6D],   emb + emb2(|tt|)·d + sign[t < 0][6D:]

(the reference, OpenUni's ``time_embed_2``, uses ``mod + mod2·d`` and ``emb + emb2·d`` from a freshly
initialised module; ours starts at zero, so the step-0 model is the pretrained one exactly).
:class:`SanaTwinFlowTransformer2DModel` is the exportable class (``SanaPipeline.from_pretrained`` restores it
after ``import fewstep.models.sana``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SanaTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' loader finds the base class here
from diffusers.models.normalization import AdaLayerNormSingle

from fewstep.models.family import (
    DiffusersFamilyModel,
    Family,
    TimePairEmbedding,
    TwinFlowTransformerMixin,
    cond_tensors,
)

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SanaTimePairEmbedding(TimePairEmbedding, AdaLayerNormSingle):
    """SANA's ``AdaLayerNormSingle`` plus the target-time copy and the sign table (module docstring)."""

    zero_layers = ("emb.timestep_embedder.linear_2", "linear")

    def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
        mod, emb = super().forward(timestep, added_cond_kwargs, batch_size, hidden_dtype)
        t, tt = self.signed_times(timestep, emb.shape[0], emb.device)
        weight_dtype = self.target_weight_dtype()
        mod2, emb2 = self.target_embedder(
            tt.abs() * self.timestep_scale, added_cond_kwargs, batch_size, hidden_dtype=weight_dtype
        )
        sign = self.sign(t, mod2.dtype)
        width = emb.shape[-1]
        mod = mod + (self.scaled_target(mod2, t, tt) + sign[:, :-width]).to(mod.dtype)
        emb = emb + (self.scaled_target(emb2, t, tt) + sign[:, -width:]).to(emb.dtype)
        return mod, emb


def _time_pair_kwargs(config) -> dict:
    inner = int(config.num_attention_heads) * int(config.attention_head_dim)
    return {"sign_width": 7 * inner, "timestep_scale": NUM_TRAIN_TIMESTEPS * float(config.timestep_scale)}


class SanaTwinFlowTransformer2DModel(TwinFlowTransformerMixin, SanaTransformer2DModel):
    """``SanaTransformer2DModel`` whose config records the TwinFlow embeddings (``time_pair``); ``forward``
    accepts ``target_timestep`` on the scale of ``timestep``."""

    time_embed_attr = "time_embed"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int | None = 32,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 32,
        patch_size: int = 1,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
        time_pair: bool = True,
        default_target_time: float = 0.0,
    ):
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            num_cross_attention_heads=num_cross_attention_heads,
            cross_attention_head_dim=cross_attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            caption_channels=caption_channels,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            guidance_embeds=guidance_embeds,
            guidance_embeds_scale=guidance_embeds_scale,
            qk_norm=qk_norm,
            timestep_scale=timestep_scale,
        )
        self.init_time_pair(SanaTimePairEmbedding, time_pair, default_target_time, **_time_pair_kwargs(self.config))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: tuple[torch.Tensor] | None = None,
        return_dict: bool = True,
        target_timestep: torch.Tensor | float | None = None,
    ):
        with self.pipeline_times(timestep, target_timestep, hidden_states.shape[0], hidden_states.device):
            return super().forward(
                hidden_states,
                encoder_hidden_states,
                timestep,
                guidance=guidance,
                encoder_attention_mask=encoder_attention_mask,
                attention_mask=attention_mask,
                attention_kwargs=attention_kwargs,
                controlnet_block_samples=controlnet_block_samples,
                return_dict=return_dict,
            )


class SanaModel(DiffusersFamilyModel):
    """``f(x_t, t, tt, cond) -> velocity`` over a diffusers SANA transformer (see the module docstring)."""

    family = "sana"
    transformer_class = SanaTransformer2DModel
    export_class = SanaTwinFlowTransformer2DModel
    time_embed_attr = "time_embed"
    time_embed_class = SanaTimePairEmbedding
    default_lora_targets = DEFAULT_LORA_TARGETS
    default_pretrained = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"

    def time_pair_kwargs(self, transformer) -> dict:
        if not isinstance(transformer.time_embed, AdaLayerNormSingle):
            raise ValueError(
                f"model.pretrained={self.pretrained}: its time embedding is {type(transformer.time_embed).__name__} "
                "(guidance-embedding SANA, e.g. SANA-Sprint); fewstep's SANA family needs AdaLayerNormSingle"
            )
        return _time_pair_kwargs(transformer.config)

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        embeds, mask = cond_tensors(
            cond, ("prompt_embeds",), "SANA", x_t.device, self.weight_dtype, optional=("prompt_attention_mask",)
        )
        scale = NUM_TRAIN_TIMESTEPS * float(self.transformer.config.timestep_scale)
        return self.transformer(
            hidden_states=x_t.to(self.weight_dtype),
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=t.abs().float() * scale,
            return_dict=False,
        )[0]


class SanaFamily(Family):
    """``SanaPipeline``: ``AutoencoderDC`` latents ``latent·scaling_factor`` (no shift), Gemma-2 embeddings
    padded to ``max_sequence_length`` with their attention mask. ``complex_human_instruction``: ``default``
    (the pipeline's own instruction prefix), ``none``, or a file with one instruction line per line."""

    name = "sana"
    pipeline_class = "SanaPipeline"
    model_class = SanaModel
    max_sequence_length = 300  # SanaPipeline.__call__

    def vae_info(self, vae) -> dict:
        return {"scaling_factor": float(vae.config.scaling_factor), "shift_factor": 0.0}

    def vae_scale(self, vae) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent * float(vae.config.scaling_factor)

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents / float(vae.config.scaling_factor), return_dict=False)[0]

    def encode_text(self, pipe, prompts, device, max_sequence_length, options):
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=device,
            max_sequence_length=max_sequence_length,
            complex_human_instruction=instruction_lines(pipe, options.get("complex_human_instruction", "default")),
        )
        return {"prompt_embeds": embeds.float().cpu(), "prompt_attention_mask": mask.float().cpu()}

    def encode_null(self, pipe, prompt, device, max_sequence_length, options):
        """``SanaPipeline`` encodes its negative prompt without ``complex_human_instruction`` (the prompts get it)."""
        no_instruction = {**options, "complex_human_instruction": "none"}
        return self.encode_text(pipe, [prompt], device, max_sequence_length, no_instruction)


def instruction_lines(pipe, option) -> list[str] | None:
    """The ``complex_human_instruction`` argument for ``option`` (see :class:`SanaFamily`)."""
    import inspect
    from pathlib import Path

    text = "none" if option is None else str(option)
    if text.lower() in ("none", "false", ""):
        return None
    if text.lower() == "default":
        return inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    path = Path(text).expanduser()  # precompute has checked that it exists
    return path.read_text().splitlines()


FAMILY = SanaFamily()
