"""SDXL (``model=sdxl``, ``model=sdxl_lora``): an epsilon / v ``UNet2DConditionModel`` with added conditions, trained
through the diff2flow bridge exactly as ``model=sd15`` (:mod:`fewstep.models.diffusion`).

The UNet's added conditions are the pooled text embedding (``cond["pooled_prompt_embeds"]``, the second text
encoder's projection, cached by precompute beside ``prompt_embeds``, the two encoders' hidden states concatenated)
and the six size / crop ids ``(original h, w, crop top, left, target h, w)``. Precompute resizes and centre-crops
each image to its bucket, so the ids of a cached item are the bucket's pixel size, uncropped:
``(H, W, 0, 0, H, W)`` with ``H, W`` = the latent size × the VAE's scale factor, computed from the batch's shape
(what ``StableDiffusionXLPipeline`` passes by default for ``height``, ``width``, so an export samples as
``fewstep.sample``). The TwinFlow target-time / sign embeddings sit on the UNet's time embedding, zero-initialised
(step 0 equals the pretrained UNet); LoRA targets the attention projections, the embeddings train too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.models.diffusion import DiffusionUNetModel
from fewstep.models.family import Family


def vae_scale_factor_of(pretrained: str, revision: str | None = None) -> int:
    """``2^(levels − 1)`` of the pipeline's VAE (8 for SDXL; 8 when the folder has no VAE config)."""
    local = Path(pretrained) / "vae" / "config.json"
    try:
        if local.exists():
            config = json.loads(local.read_text())
        else:
            from diffusers import AutoencoderKL

            config = AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision)
    except (OSError, ValueError):
        return 8
    return 2 ** (len(config.get("block_out_channels", [0, 0, 0, 0])) - 1)


class SDXLUNetModel(DiffusionUNetModel):
    """``f(x_t, t, tt, cond) -> flow velocity`` over SDXL's UNet; ``cond = {"prompt_embeds",
    "pooled_prompt_embeds"}``, the size / crop ids from the batch's latent size (module docstring)."""

    family = "sdxl"

    def __init__(
        self,
        pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0",
        vae_scale_factor: int | None = None,
        **kwargs,
    ):
        super().__init__(pretrained=pretrained, **kwargs)
        if self.unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"model.pretrained={pretrained} is not an SDXL UNet (addition_embed_type="
                f"{self.unet.config.addition_embed_type!r}, not 'text_time'): use model=sd15 for SD 1.x/2.x"
            )
        if not vae_scale_factor and self.random_init:
            from fewstep.models import architectures

            vae_scale_factor = architectures.load(kwargs["architecture"]).vae_scale_factor
        self.vae_scale_factor = int(vae_scale_factor or vae_scale_factor_of(pretrained, kwargs.get("revision")))

    def time_ids(self, x_t: torch.Tensor) -> torch.Tensor:
        """``(H, W, 0, 0, H, W)`` per row, ``H, W`` the pixel size of the latents ``x_t``."""
        h, w = (int(n) * self.vae_scale_factor for n in x_t.shape[-2:])
        ids = torch.tensor([h, w, 0, 0, h, w], device=x_t.device, dtype=self.weight_dtype)
        return ids.expand(x_t.shape[0], 6)

    def added_conditions(self, cond, x_t: torch.Tensor) -> dict:
        if not isinstance(cond, dict) or "pooled_prompt_embeds" not in cond:
            raise TypeError(
                "SDXL takes cond={'prompt_embeds': (B, L, D), 'pooled_prompt_embeds': (B, P)} (data=latents from a "
                "cache that fewstep.precompute wrote with an SDXL pipeline)"
            )
        pooled = cond["pooled_prompt_embeds"].to(device=x_t.device, dtype=self.weight_dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(x_t)}}


class SDXLFamily(Family):
    """``StableDiffusionXLPipeline``: both text encoders through ``encode_prompt`` (hidden states and the pooled
    projection); export as for SD 1.x/2.x (``TwinFlowUNet2DConditionModel`` + a diff2flow ``TwinFlowScheduler``)."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    model_class = SDXLUNetModel
    denoiser = "unet"

    def encode_text(self, pipe, prompts, device, max_sequence_length, options):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}


FAMILY = SDXLFamily()
