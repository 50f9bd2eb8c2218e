"""A tiny, offline ``StableDiffusion3Pipeline`` for tests (nothing is downloaded).

``build_tiny_sd3_pipeline(tmp_path)`` builds every component from small configs:
two ``CLIPTextModelWithProjection`` (hidden 32, projection 32), a ``T5EncoderModel``
(d_model 32), tokenizers from in-memory vocabularies written to ``tmp_path``
(CLIP BPE ``vocab.json`` / ``merges.txt``, T5 Unigram ``tokenizer.json``), a
one-level ``AutoencoderKL`` (4 latent channels, scale factor 1) and a one-layer
``SD3Transformer2DModel`` (patch 1, 4 heads of 8). Weights are random but seeded,
all modules are in eval mode and dropout-free, so a pipeline call is deterministic.
Use ``height = width = 16`` (latents 4×16×16) and a small ``max_sequence_length``.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CLIP_MAX_LENGTH = 77


def _write_clip_tokenizer(folder: Path) -> Path:
    """A character-level CLIP BPE vocabulary (no merges): every word splits into its letters."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens += chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def _write_t5_tokenizer(folder: Path) -> Path:
    """A character-level T5 Unigram tokenizer (``tokenizer.json``): pad 0, eos 1, unk 2, ``▁``, then letters."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "extra_ids": 0, "model_max_length": 512}
        )
    )
    return folder


def build_tiny_sd3_pipeline(
    tmp_path: str | os.PathLike, seed: int = 0, scheduler=None, transformer_kwargs: dict | None = None
):
    """Return a tiny random ``StableDiffusion3Pipeline`` on CPU in float32 (eval mode).

    ``scheduler`` defaults to diffusers' ``FlowMatchEulerDiscreteScheduler()``;
    tokenizer files go to ``tmp_path / "tiny_sd3_tokenizers"``. ``transformer_kwargs`` override the
    transformer's config (e.g. ``num_layers``, ``num_attention_heads``, ``patch_size`` for a bigger one).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    root = Path(tmp_path) / "tiny_sd3_tokenizers"
    clip_dir = _write_clip_tokenizer(root / "clip")
    t5_dir = _write_t5_tokenizer(root / "t5")
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=CLIP_MAX_LENGTH)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=CLIP_MAX_LENGTH)
    tokenizer_3 = T5TokenizerFast.from_pretrained(str(t5_dir))

    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_3),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id,
    )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 2)
    text_encoder_3 = T5EncoderModel(t5_config)
    torch.manual_seed(seed + 3)
    transformer_config = dict(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,  # T5 d_model (CLIP embeddings are padded / cropped to it)
        pooled_projection_dim=64,  # 2 × CLIP projection_dim
        out_channels=4,
    )
    transformer_config.update(transformer_kwargs or {})
    transformer = SD3Transformer2DModel(**transformer_config)
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    for module in (text_encoder, text_encoder_2, text_encoder_3, transformer, vae):
        module.eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd3_pipeline(folder: str | os.PathLike, seed: int = 0, transformer_kwargs: dict | None = None) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``folder`` (a local "pretrained" for
    ``model.pretrained`` / ``pretrained=``); returns the folder."""
    folder = Path(folder)
    pipe = build_tiny_sd3_pipeline(
        folder.parent / f"{folder.name}_build", seed=seed, transformer_kwargs=transformer_kwargs
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_unet(sample_size: int = 8, cross_attention_dim: int = 16):
    """A tiny SD1.5-style ``UNet2DConditionModel`` (4 latent channels, two blocks) for diff2flow tests."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def save_captioned_images(folder: str | os.PathLike, n: int = 4, side: int = 16, caption: str = "a photo number {i}"):
    """``n`` random ``side``-pixel PNGs ``img{i}.png``, each with a ``.txt`` caption, for precompute; the folder."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption.format(i=i))
    return folder
