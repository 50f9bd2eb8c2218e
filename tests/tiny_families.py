"""Tiny, offline ``SanaPipeline`` and ``QwenImagePipeline`` for tests (nothing is downloaded).

Components are built from small configs with seeded random weights (eval mode, no dropout):
* SANA: a one-layer ``SanaTransformer2DModel`` (4 channels, patch 1, 2 heads of 4), a two-level
  ``AutoencoderDC`` (4 latent channels, factor 2, scaling 0.41407), a one-layer ``Gemma2Model`` (hidden 8) and
  a character-level ``GemmaTokenizer``. Images 32×32 (the pipeline wants multiples of 32) → latents 4×16×16.
* Qwen-Image: a two-layer ``QwenImageTransformer2DModel`` (in 16 = 4 latent channels packed 2×2, out 4,
  3 heads of 16), an ``AutoencoderKLQwenImage`` (z 4, factor 4, non-trivial latents_mean / latents_std), a
  two-layer ``Qwen2_5_VLForConditionalGeneration`` (hidden 16) and a byte-level ``Qwen2Tokenizer`` without
  merges. Images 16×16 → latents 4×4×4 (2×2 tokens).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for c in string.ascii_letters + string.digits + ".,!?'-:;()\"\n":
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    # byte-level BPE without merges: the 256 byte symbols of GPT-2's byte-to-unicode map, one token each
    symbols = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = 0
    table = []
    for b in range(256):
        if b in symbols:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    vocab = {"<|endoftext|>": 0}
    for ch in table:
        vocab[ch] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[])


def build_tiny_sana_pipeline(seed: int = 0, scheduler=None):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16,
            hidden_size=8,
            intermediate_size=16,
            max_position_embeddings=512,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            pad_token_id=0,
            attn_implementation="eager",
        )
    )
    for module in (transformer, vae, text_encoder):
        module.eval()
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_qwenimage_pipeline(seed: int = 0, scheduler=None):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    torch.manual_seed(seed + 2)
    vocab = len(tokenizer) + 8
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=vocab,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 2,
        vision_token_id=vocab - 1,
        image_token_id=vocab - 4,
        video_token_id=vocab - 5,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    for module in (transformer, vae, text_encoder):
        module.eval()
    pipe = QwenImagePipeline(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny ``family`` (sana | qwenimage) pipeline and ``save_pretrained`` it to ``folder``."""
    build = {"sana": build_tiny_sana_pipeline, "qwenimage": build_tiny_qwenimage_pipeline}[family]
    folder = Path(folder)
    build(seed=seed).save_pretrained(folder)
    return folder
