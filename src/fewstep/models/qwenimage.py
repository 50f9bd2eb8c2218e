"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``) as a fewstep model ``f(x_t, t, tt, cond)``.

``QwenImageModel`` (``model=qwenimage`` full fine-tune, ``model=qwenimage_lora``) takes latents ``(B, C, H, W)``
(the normalised ``AutoencoderKLQwenImage`` latents of one frame), packs them 2×2 into ``H/2·W/2`` tokens of
``4C`` channels with ``img_shapes = [[(1, H/2, W/2)]]`` per sample, calls the transformer with ``timestep = |t|``
(its embedder multiplies by 1000) and unpacks the velocity. ``cond = {"prompt_embeds", "prompt_embeds_mask"}``
(Qwen2.5-VL embeddings padded to the cache's ``max_sequence_length`` and their mask): each call trims the padding
columns no row uses and passes ``encoder_hidden_states_mask=None`` when every remaining token is valid, as
``QwenImagePipeline.encode_prompt`` does.

With ``time_pair=True`` the ``time_text_embed`` becomes :class:`QwenImageTimePairEmbedding`:
``temb + target_embedder(|tt|)·(t − tt) + sign_embedding[t < 0]`` with ``target_embedder`` a copy of the
timestep embedder whose output layer is zero and a zero 2-row sign table, so the step-0 model equals the
pretrained one exactly. (The reference's full run copies ``time_text_embed`` into ``time_text_embed_2``
without zeroing, and its LoRA runs feed ``t − tt/2`` as the timestep instead; see docs/families.md.)
:class:`QwenImageTwinFlowTransformer2DModel` is the exportable class (``QwenImagePipeline.from_pretrained``
restores it after ``import fewstep.models.qwenimage``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' loader finds the base class here
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings

from fewstep.models.family import (
    DiffusersFamilyModel,
    Family,
    TimePairEmbedding,
    TwinFlowTransformerMixin,
    cond_tensors,
)

DEFAULT_LORA_TARGETS = (  # the reference's list (SPEC §9)
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    "timestep_embedder.linear_1", "timestep_embedder.linear_2",
)  # fmt: skip


class QwenImageTimePairEmbedding(TimePairEmbedding, QwenTimestepProjEmbeddings):
    """Qwen-Image's timestep embedder plus the target-time copy and the sign table (module docstring)."""

    zero_layers = ("timestep_embedder.linear_2",)
    timestep_scale = 1.0  # the transformer's timestep is t itself; ``time_proj`` multiplies by 1000

    def forward(self, timestep, hidden_states, addition_t_cond=None) -> torch.Tensor:
        temb = super().forward(timestep, hidden_states, addition_t_cond)
        t, tt = self.signed_times(timestep, temb.shape[0], temb.device)
        weight_dtype = self.target_weight_dtype()
        target = self.target_embedder(tt.abs(), hidden_states.new_empty(0, dtype=weight_dtype))
        extra = self.scaled_target(target, t, tt) + self.sign(t, target.dtype)
        return temb + extra.to(temb.dtype)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H/2·W/2, 4C)`` tokens of 2×2 patches (``QwenImagePipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``h × w``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class QwenImageTwinFlowTransformer2DModel(TwinFlowTransformerMixin, QwenImageTransformer2DModel):
    """``QwenImageTransformer2DModel`` whose config records the TwinFlow embeddings (``time_pair``);
    ``forward`` accepts ``target_timestep`` on the 0..1 scale of ``timestep``."""

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        time_pair: bool = True,
        default_target_time: float = 0.0,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
            zero_cond_t=zero_cond_t,
            use_additional_t_cond=use_additional_t_cond,
            use_layer3d_rope=use_layer3d_rope,
        )
        self.init_time_pair(QwenImageTimePairEmbedding, time_pair, default_target_time)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_shapes: list | None = None,
        guidance: torch.Tensor = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        additional_t_cond=None,
        return_dict: bool = True,
        target_timestep: torch.Tensor | float | None = None,
    ):
        with self.pipeline_times(timestep, target_timestep, hidden_states.shape[0], hidden_states.device):
            return super().forward(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                timestep=timestep,
                img_shapes=img_shapes,
                guidance=guidance,
                attention_kwargs=attention_kwargs,
                controlnet_block_samples=controlnet_block_samples,
                additional_t_cond=additional_t_cond,
                return_dict=return_dict,
            )


def trim_text(embeds: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the padding columns no row uses; the mask becomes None when every remaining token is valid."""
    if mask is None:
        return embeds, None
    valid = mask.bool()
    used = valid.any(0)
    length = int(used.nonzero().max()) + 1 if used.any() else 1
    embeds, valid = embeds[:, :length], valid[:, :length]
    return embeds, (None if bool(valid.all()) else valid.to(embeds.dtype))


class QwenImageModel(DiffusersFamilyModel):
    """``f(x_t, t, tt, cond) -> velocity`` over a diffusers Qwen-Image transformer (see the module docstring)."""

    family = "qwenimage"
    transformer_class = QwenImageTransformer2DModel
    export_class = QwenImageTwinFlowTransformer2DModel
    time_embed_attr = "time_text_embed"
    time_embed_class = QwenImageTimePairEmbedding
    default_lora_targets = DEFAULT_LORA_TARGETS
    default_pretrained = "Qwen/Qwen-Image"
    # The last block's text stream (attn.to_add_out, txt_mlp and their LoRA adapters) is computed and dropped: only
    # image tokens reach the output, so those parameters get no gradient and DDP must look for unused ones.
    ddp_find_unused_parameters = True

    @staticmethod
    def data_channels(config) -> int:
        return int(config.in_channels) // (int(config.patch_size) ** 2)

    def time_pair_kwargs(self, transformer) -> dict:
        config = transformer.config
        if config.get("zero_cond_t") or config.get("use_additional_t_cond"):
            raise ValueError(
                f"model.pretrained={self.pretrained}: zero_cond_t / use_additional_t_cond transformers (Qwen-Image "
                "edit variants) are not supported; use the text-to-image Qwen-Image transformer"
            )
        return {}

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        embeds, mask = cond_tensors(
            cond, ("prompt_embeds",), "Qwen-Image", x_t.device, self.weight_dtype, optional=("prompt_embeds_mask",)
        )
        embeds, mask = trim_text(embeds, mask)
        b, _, h, w = x_t.shape
        out = self.transformer(
            hidden_states=pack_latents(x_t.to(self.weight_dtype)),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            timestep=t.abs().to(self.weight_dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


class QwenImageFamily(Family):
    """``QwenImagePipeline``: ``AutoencoderKLQwenImage`` (5-D, one frame) latents normalised per channel with the
    VAE config's ``latents_mean`` / ``latents_std``; Qwen2.5-VL embeddings (its chat template) padded to
    ``max_sequence_length`` with their mask. The default null prompt is the reference's "Generate an image."."""

    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    model_class = QwenImageModel
    default_null_prompt = "Generate an image."
    max_sequence_length = 512  # QwenImagePipeline.__call__ (its encode_prompt alone defaults to 1024)

    def vae_info(self, vae) -> dict:
        return {"latents_mean": list(vae.config.latents_mean), "latents_std": list(vae.config.latents_std)}

    def vae_scale(self, vae) -> int:
        return 2 ** len(vae.temperal_downsample)

    @staticmethod
    def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        latents = vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, std = self._stats(vae, latents)
        return (latents - mean) / std

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(vae, latents)
        return vae.decode((latents * std + mean)[:, :, None], return_dict=False)[0][:, :, 0]

    def guided_velocity(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """``QwenImagePipeline``'s true CFG: ``comb = v_u + g·(v_c − v_u)`` rescaled to the conditional prediction's
        norm, ``comb·‖v_c‖/‖comb‖``, the norms taken per packed 2×2 token over its 4·C channels (the pipeline's
        ``dim=-1`` of ``(B, tokens, 4C)``). Sampling only: training targets use plain linear guidance."""
        h, w = v_cond.shape[-2:]
        comb = pack_latents(super().guided_velocity(v_cond, v_uncond, scale))
        cond_norm = torch.linalg.vector_norm(pack_latents(v_cond), dim=-1, keepdim=True)
        return unpack_latents(comb * (cond_norm / torch.linalg.vector_norm(comb, dim=-1, keepdim=True)), h, w)

    def pipeline_guidance(self, scale: float) -> dict:
        """``QwenImagePipeline`` guides by true CFG, which needs a negative prompt (the run's null prompt by
        default) and applies above 1 only."""
        return {"true_cfg_scale": float(scale), "negative_prompt": self.default_null_prompt}

    def encode_text(self, pipe, prompts, device, max_sequence_length, options):
        embeds, mask = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, max_sequence_length=max_sequence_length
        )
        n, length, width = embeds.shape
        if mask is None:
            mask = torch.ones(n, length, device=embeds.device)
        padded = embeds.new_zeros(n, max_sequence_length, width)
        padded[:, :length] = embeds
        padded_mask = torch.zeros(n, max_sequence_length)
        padded_mask[:, :length] = mask.float().cpu()
        return {"prompt_embeds": padded.float().cpu(), "prompt_embeds_mask": padded_mask}


FAMILY = QwenImageFamily()
