"""OpenUni (OpenUni-L-512, wusize/OpenUni) as a fewstep model family: SANA trained on a frozen Qwen2 text path.

The generator is SANA-1.6B-512px (``SanaTransformer2DModel``, DC-AE latents). Its ``encoder_hidden_states`` do not
come from Gemma-2 but from InternVL3-2B's language model (a Qwen2 LM) read through learnable queries:

1. the prompt in the chat template ``PROMPT_TEMPLATE`` (``Generate an image: {prompt}``; the empty prompt is the
   reference's unconditional text ``Generate an image.``), tokenised with the special tokens and right-padded;
2. the token embeddings followed by ``num_queries`` (256) learnable meta-queries, attention mask = the prompt's
   mask then ones, ``position_ids = cumsum(mask) − 1`` (clamped at 0), through the LM's base ``Qwen2Model``;
3. the last ``num_queries`` hidden states → the connector (6 pre-norm transformer layers, 1536 wide, FFN 8960,
   24 heads, gelu-tanh: transformers' ``SiglipEncoder``) → ``projector = Linear(1536 → caption_channels 2304)``;
4. SANA with those ``(B, 256, 2304)`` embeddings and an all-ones mask.

Only the DiT (+ the TwinFlow time-pair embeddings) trains; steps 1–3 are frozen, so ``fewstep.precompute`` caches
their output per prompt and training never runs the LM. In fewstep:

* :class:`OpenUniConditioner` (meta-queries, connector, projector; a diffusers ``ModelMixin`` so pipelines save
  and load it; its parameter names are the reference checkpoint's, ``connector.layers.N...``);
* :class:`OpenUniPipeline` (``tokenizer``, ``text_encoder`` = ``Qwen2Model``, ``conditioner``, ``transformer``,
  ``vae``, ``scheduler``): ``encode_prompt`` and a ``__call__`` that runs diffusers' ``SanaPipeline`` denoising
  loop on the embeddings, as the reference's ``generate`` does. ``import fewstep`` makes it
  ``diffusers.OpenUniPipeline`` (:func:`fewstep.export.code.register_pipeline_classes`), so
  ``DiffusionPipeline.from_pretrained`` resolves folders whose ``_class_name`` is ``OpenUniPipeline``;
* :class:`OpenUniModel` (``model=openuni``, ``model=openuni_lora``) — the SANA family's model
  (:class:`fewstep.models.sana.SanaModel`, zero-initialised ``time_embed_2`` analogue) with OpenUni's LoRA targets;
* :class:`OpenUniFamily` — SANA's DC-AE latents, the conditioner's embeddings as the cached text condition.

``python -m fewstep.convert_openuni`` turns the reference checkpoint into an ``OpenUniPipeline`` folder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from fewstep.models.family import PretrainedNotFound, TwinFlowTransformerMixin
from fewstep.models.sana import SanaFamily, SanaModel

PROMPT_TEMPLATE = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n<img>"
GENERATION = "Generate an image: {prompt}"
UNCONDITIONAL = "Generate an image."  # the reference's CFG prompt, used for the empty prompt ""
# the reference's LoRA targets (inclusionAI/TwinFlow openuni_lora_*) that exist in SanaTransformer2DModel
DEFAULT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "time_embed.linear", "timestep_embedder.linear_1",
    "timestep_embedder.linear_2",
)  # fmt: skip
CONVERT_HINT = (
    "OpenUni has no diffusers repo: convert the reference checkpoint first (python -m fewstep.convert_openuni "
    "checkpoint=openuni_l_internvl3_2b_sana_1_6b_512_hf_blip3o60k.pth out=DIR) and give model.pretrained=DIR"
)


def instruction(prompt: str) -> str:
    """The user turn for ``prompt``: ``Generate an image: {prompt}``, or ``Generate an image.`` for ``""``."""
    text = prompt.strip()
    return GENERATION.format(prompt=text) if text else UNCONDITIONAL


def chat_text(prompt: str) -> str:
    """The full text the LM reads for ``prompt`` (template, instruction and the ``<img>`` start token)."""
    return PROMPT_TEMPLATE.format(instruction=instruction(prompt))


class OpenUniConditioner(ModelMixin, ConfigMixin):
    """Meta-queries, connector and projector: LM hidden states of the queries → SANA caption embeddings.

    ``meta_queries`` (num_queries × hidden_size), ``connector`` (a transformers ``SiglipEncoder``: per layer
    ``self_attn.{q,k,v,out}_proj``, ``layer_norm1``, ``mlp.fc1/fc2``, ``layer_norm2``, pre-norm residuals, no final
    norm) and ``projector`` (hidden_size → caption_channels; the reference's ``enc_proj``). The connector is as
    wide as the LM (``hidden_size``), as ``enc_proj`` requires."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        num_queries: int = 256,
        hidden_size: int = 1536,
        intermediate_size: int = 8960,
        num_layers: int = 6,
        num_attention_heads: int = 24,
        caption_channels: int = 2304,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        from transformers import SiglipVisionConfig
        from transformers.models.siglip.modeling_siglip import SiglipEncoder

        if hidden_size % num_attention_heads:
            raise ValueError(f"num_attention_heads={num_attention_heads} does not divide hidden_size={hidden_size}")
        connector = SiglipVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_attention_heads,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            attention_dropout=0.0,
        )
        connector._attn_implementation = "sdpa"
        self.meta_queries = nn.Parameter(torch.randn(num_queries, hidden_size) / math.sqrt(hidden_size))
        self.connector = SiglipEncoder(connector)
        self.projector = nn.Linear(hidden_size, caption_channels)

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        """``(B, num_queries, hidden_size)`` LM states of the queries → ``(B, num_queries, caption_channels)``."""
        states = query_states.to(self.projector.weight.dtype)
        return self.projector(self.connector(states).last_hidden_state)

    def encode(self, text_encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """SANA caption embeddings of right-padded prompts: the LM (``Qwen2Model``) on the token embeddings followed
        by the meta-queries, positions from the cumulative mask, then connector and projector."""
        tokens = text_encoder.get_input_embeddings()(input_ids)
        batch, n = tokens.shape[0], self.config.num_queries
        queries = self.meta_queries.to(tokens.dtype)[None].expand(batch, n, -1)
        mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, n, dtype=torch.bool)], dim=1)
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
        out = text_encoder(
            inputs_embeds=torch.cat([tokens, queries], dim=1),
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return self(out.last_hidden_state[:, -n:])


class OpenUniPipeline(DiffusionPipeline, SanaLoraLoaderMixin):
    """OpenUni text-to-image: ``encode_prompt`` (tokenizer → ``text_encoder`` → ``conditioner``) and SANA's
    denoising loop (``SanaPipeline`` with the embeddings; ``vae`` decodes). The transformer may be the vanilla
    ``SanaTransformer2DModel`` or fewstep's ``SanaTwinFlowTransformer2DModel``, which then reads its target time
    from a ``TwinFlowScheduler``. The prompt ``""`` is the unconditional ``Generate an image.``."""

    model_cpu_offload_seq = "text_encoder->conditioner->transformer->vae"

    def __init__(self, tokenizer, text_encoder, conditioner, transformer, vae, scheduler):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            conditioner=conditioner,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
        )

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of the prompts' chat texts: special tokens added, right-padded with the
        tokenizer's pad id, mask 1 on real tokens."""
        ids = [self.tokenizer.encode(chat_text(p), add_special_tokens=True) for p in prompts]
        longest = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return input_ids, mask

    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | list[str], device: torch.device | None = None, num_images_per_prompt: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds (B·n, num_queries, caption_channels), prompt_attention_mask (all ones))``; ``""`` is
        the unconditional prompt ``Generate an image.``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        input_ids, mask = self.tokenize(prompts)
        embeds = self.conditioner.encode(self.text_encoder, input_ids.to(device), mask.to(device))
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 0.0,
        height: int = 512,
        width: int = 512,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate from ``prompt`` (or ``prompt_embeds``). ``guidance_scale > 1`` applies classifier-free
        guidance against ``negative_prompt`` (default: the unconditional ``Generate an image.``; the reference
        samples with 4.5 over 20 DPM-Solver steps). ``num_inference_steps`` defaults to the scheduler's
        ``default_num_inference_steps`` (``TwinFlowScheduler``) or 20. Returns SANA's pipeline output."""
        from diffusers import SanaPipeline

        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give prompt or prompt_embeds")
            prompt_embeds, _ = self.encode_prompt(prompt)
        cfg = guidance_scale > 1.0
        if cfg and negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * prompt_embeds.shape[0] if isinstance(negative, str) else list(negative)
            negative_prompt_embeds, _ = self.encode_prompt(negatives)
        if num_inference_steps is None:
            num_inference_steps = int(getattr(self.scheduler.config, "default_num_inference_steps", None) or 20)
        if isinstance(self.transformer, TwinFlowTransformerMixin):  # the scheduler of this call, not a swapped-out one
            timed = hasattr(self.scheduler, "current_target_time")
            self.transformer.use_scheduler_target_time(self.scheduler if timed else None)
        sana = SanaPipeline(
            tokenizer=None, text_encoder=None, vae=self.vae, transformer=self.transformer, scheduler=self.scheduler
        )
        sana.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))

        def ones(embeds):
            return None if embeds is None else torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

        return sana(
            prompt=None,
            negative_prompt=None,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=ones(prompt_embeds),
            negative_prompt_embeds=negative_prompt_embeds if cfg else None,
            negative_prompt_attention_mask=ones(negative_prompt_embeds) if cfg else None,
            output_type=output_type,
            return_dict=return_dict,
            use_resolution_binning=False,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            complex_human_instruction=None,
        )


class OpenUniModel(SanaModel):
    """``f(x_t, t, tt, cond)`` over OpenUni's SANA DiT (``model.pretrained`` = a converted ``OpenUniPipeline``
    folder); ``cond = {"prompt_embeds" (B, 256, 2304), "prompt_attention_mask" (ones)}`` from the cache."""

    family = "openuni"
    default_lora_targets = DEFAULT_LORA_TARGETS
    default_pretrained = ""
    pretrained_hint = CONVERT_HINT

    @classmethod
    def load_transformer(cls, pretrained, subfolder, revision, dtype):
        try:
            return super().load_transformer(pretrained, subfolder, revision, dtype)
        except PretrainedNotFound as err:
            raise PretrainedNotFound(f"{err}; {CONVERT_HINT}") from err


class OpenUniFamily(SanaFamily):
    """``OpenUniPipeline``: SANA's DC-AE latents; the cached condition is the conditioner's output (num_queries ×
    caption_channels per prompt, all-ones mask), the null prompt ``""`` (= ``Generate an image.``). Prompts are
    not truncated (``max_sequence_length`` does not apply: the embedding is always num_queries long)."""

    name = "openuni"
    pipeline_class = "OpenUniPipeline"
    model_class = OpenUniModel
    text_modules = ("text_encoder", "conditioner")
    max_sequence_length = None  # always num_queries long

    def encode_text(self, pipe, prompts, device, max_sequence_length, options):
        embeds, mask = pipe.encode_prompt(list(prompts), device=device)
        return {"prompt_embeds": embeds.float().cpu(), "prompt_attention_mask": mask.float().cpu()}


FAMILY = OpenUniFamily()
