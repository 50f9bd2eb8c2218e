"""Tiny, offline ``SanaPipeline``, ``QwenImagePipeline`` and ``OpenUniPipeline`` for tests (nothing is downloaded).

Components are built from small configs with seeded random weights (eval mode, no dropout):
* SANA: a one-layer ``SanaTransformer2DModel`` (4 channels, patch 1, 2 heads of 4), a two-level
  ``AutoencoderDC`` (4 latent channels, factor 2, scaling 0.41407), a one-layer ``Gemma2Model`` (hidden 8) and
  a character-level ``GemmaTokenizer``. Images 32×32 (the pipeline wants multiples of 32) → latents 4×16×16.
* Qwen-Image: a two-layer ``QwenImageTransformer2DModel`` (in 16 = 4 latent channels packed 2×2, out 4,
  3 heads of 16), an ``AutoencoderKLQwenImage`` (z 4, factor 4, non-trivial latents_mean / latents_std), a
  two-layer ``Qwen2_5_VLForConditionalGeneration`` (hidden 16) and a byte-level ``Qwen2Tokenizer`` without
  merges. Images 16×16 → latents 4×4×4 (2×2 tokens).
* OpenUni: the tiny SANA transformer and DC-AE, a two-layer ``Qwen2Model`` (hidden 16) with the byte-level
  tokenizer plus InternVL's chat tokens, and an ``OpenUniConditioner`` (4 meta-queries, a one-layer connector
  16 wide, projector to 8 = the SANA caption channels); :func:`save_openuni_sources` writes what
  ``fewstep.convert_openuni`` reads (InternVL folder, SANA folder, DC-AE, a reference-layout ``.pth``).
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


def tiny_sana_transformer(seed: int = 0):
    """A one-layer ``SanaTransformer2DModel``: 4 channels, patch 1, 2 heads of 4, caption_channels 8."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(
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
    ).eval()


def tiny_dc_ae(seed: int = 0):
    """A two-level ``AutoencoderDC``: 4 latent channels, factor 2, scaling 0.41407."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
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
    ).eval()


def build_tiny_sana_pipeline(seed: int = 0, scheduler=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer()
    transformer = tiny_sana_transformer(seed)
    vae = tiny_dc_ae(seed + 1)
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
    ).eval()
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
    """Build the tiny ``family`` (sana | qwenimage | openuni) pipeline and ``save_pretrained`` it to ``folder``."""
    build = {
        "sana": build_tiny_sana_pipeline,
        "qwenimage": build_tiny_qwenimage_pipeline,
        "openuni": build_tiny_openuni_pipeline,
    }[family]
    folder = Path(folder)
    build(seed=seed).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- OpenUni

OPENUNI_QUERIES = 4


def internvl_tokenizer():
    """The byte-level Qwen2 tokenizer with InternVL's chat tokens (``<|im_start|>``, ``<|im_end|>``, ``<img>``)
    as special tokens, as InternVL3's tokenizer has them."""
    tokenizer = qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<img>"]})
    return tokenizer


def tiny_qwen2_config(vocab_size: int) -> dict:
    """A two-layer Qwen2 LM config (hidden 16), as InternVL's ``llm_config`` holds it."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "attn_implementation": "flash_attention_2",  # InternVL's configs ask for it; fewstep reads with sdpa
    }


def tiny_qwen2(seed: int, vocab_size: int):
    from transformers import Qwen2Config, Qwen2Model

    config = {k: v for k, v in tiny_qwen2_config(vocab_size).items() if k != "attn_implementation"}
    torch.manual_seed(seed)
    return Qwen2Model(Qwen2Config(**config)).eval()


def tiny_conditioner(seed: int = 0):
    """4 meta-queries, a one-layer connector 16 wide (FFN 32, 2 heads), projector to the tiny SANA's 8 channels."""
    from fewstep.models.openuni import OpenUniConditioner

    torch.manual_seed(seed)
    conditioner = OpenUniConditioner(
        num_queries=OPENUNI_QUERIES,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_attention_heads=2,
        caption_channels=8,
    )
    with torch.no_grad():  # visible biases and norm affines (their defaults are 0 / 1)
        for name, p in conditioner.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return conditioner.eval()


def build_tiny_openuni_pipeline(seed: int = 0, scheduler=None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.models.openuni import OpenUniPipeline

    tokenizer = internvl_tokenizer()
    pipe = OpenUniPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_qwen2(seed + 2, len(tokenizer)),
        conditioner=tiny_conditioner(seed + 3),
        transformer=tiny_sana_transformer(seed),
        vae=tiny_dc_ae(seed + 1),
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_openuni_sources(root: str | os.PathLike, seed: int = 0, transformer=True, lmm=False, wrap=False) -> dict:
    """What ``fewstep.convert_openuni`` reads, tiny and offline, under ``root``: an InternVL folder (``config.json``
    with ``llm_config``, ``model.safetensors`` with ``language_model.model.*`` plus vision / ``mlp1`` / lm_head
    weights, the tokenizer), a SANA pipeline folder, a bare DC-AE folder and the reference checkpoint
    ``openuni.pth`` (``meta_queries``, ``connector.*``, ``projector.*``; with ``transformer`` a fine-tuned DiT
    ``transformer.*`` other than the SANA folder's, with ``lmm`` an LM ``lmm.language_model.model.*`` other than
    InternVL's; ``wrap`` saves ``{"state_dict": {"module." + key: ...}}``). Returns the paths and the modules
    the weights came from."""
    import json

    from safetensors.torch import save_file

    root = Path(root)
    tokenizer = internvl_tokenizer()
    vocab = len(tokenizer)
    internvl = root / "internvl"
    internvl.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(internvl)
    llm = tiny_qwen2(seed + 2, vocab)
    (internvl / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["InternVLChatModel"],
                "model_type": "internvl_chat",
                "llm_config": tiny_qwen2_config(vocab),
                "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 8},
            }
        )
    )
    weights = {f"language_model.model.{k}": v.contiguous() for k, v in llm.state_dict().items()}
    weights["language_model.lm_head.weight"] = torch.randn(vocab, 16)
    weights["vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 2, 2)
    weights["mlp1.1.weight"] = torch.randn(16, 8)
    save_file(weights, str(internvl / "model.safetensors"))

    sana_pipe = build_tiny_sana_pipeline(seed)
    sana = root / "sana"
    sana_pipe.save_pretrained(sana)
    vae_dir = root / "dc_ae"
    tiny_dc_ae(seed + 1).save_pretrained(vae_dir)

    conditioner = tiny_conditioner(seed + 3)
    state = {k: v.clone() for k, v in conditioner.state_dict().items()}
    dit = tiny_sana_transformer(seed + 20) if transformer else sana_pipe.transformer
    if transformer:
        state.update({f"transformer.{k}": v.clone() for k, v in dit.state_dict().items()})
    lm = tiny_qwen2(seed + 30, vocab) if lmm else llm
    if lmm:
        state.update({f"lmm.language_model.model.{k}": v.clone() for k, v in lm.state_dict().items()})
        state["lmm.language_model.lm_head.weight"] = torch.randn(vocab, 16)
        state["lmm.vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 2, 2)
    if wrap:
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "meta": {"iter": 1000}}
    checkpoint = root / "openuni.pth"
    torch.save(state, checkpoint)
    return {
        "checkpoint": checkpoint,
        "internvl": internvl,
        "sana": sana,
        "vae": vae_dir,
        "conditioner": conditioner,
        "transformer": dit,
        "llm": lm,
        "tokenizer": tokenizer,
    }


def trained_twinflow_sana(transformer, seed: int = 0):
    """``transformer`` (a ``SanaTransformer2DModel``) as fewstep's exportable ``SanaTwinFlowTransformer2DModel`` whose
    target-time embedding looks trained (normal weights, std 0.3; at init it is zero and the target time would not
    matter), in eval mode."""
    from fewstep.models.sana import SanaTwinFlowTransformer2DModel

    twin = SanaTwinFlowTransformer2DModel.from_config({**transformer.config, "time_pair": True})
    twin.load_state_dict(transformer.state_dict(), strict=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in twin.time_embed.target_embedder.parameters():
            p.normal_(0, 0.3)
    return twin.eval()
