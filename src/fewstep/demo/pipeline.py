"""A tiny ``StableDiffusion3Pipeline`` for the digits demo, built offline: word-level tokenizers over the captions'
words, small random CLIP / T5 text encoders (each caption maps to a fixed embedding), a small ``AutoencoderKL``
trained here on the digit images (:func:`train_vae`, its ``shift_factor`` / ``scaling_factor`` measured on the
training latents as SD3's are), and a random ``SD3Transformer2DModel`` that fewstep then trains.

Sizes (:class:`Sizes`): 16-pixel images, a VAE that downsamples ×2 to 4×8×8 latents, a transformer with patch 2
(16 image tokens), CLIP sequences of 16 tokens and T5 sequences of ``max_sequence_length`` = 8 (24 text tokens).
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.demo.images import vocabulary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("fewstep.demo")

CHARS = string.ascii_lowercase + string.digits


@dataclass
class Sizes:
    """The demo pipeline's shapes (defaults: ``make demo``)."""

    image: int = 16  # pixels per side
    vae_channels: tuple[int, ...] = (16, 32)  # two levels: ×2 down-sampling
    latent_channels: int = 4
    clip_length: int = 16  # CLIP tokens (the pipeline's tokenizer_max_length)
    max_sequence_length: int = 8  # T5 tokens
    text_width: int = 32  # CLIP hidden / projection and T5 d_model
    transformer: dict = field(
        default_factory=lambda: {
            "patch_size": 2,
            "num_layers": 4,
            "attention_head_dim": 16,
            "num_attention_heads": 6,
            "caption_projection_dim": 96,
        }
    )

    @property
    def latent_side(self) -> int:
        return self.image // 2 ** (len(self.vae_channels) - 1)


# --------------------------------------------------------------------------- tokenizers


def write_clip_tokenizer(folder: Path, words: list[str]) -> Path:
    """CLIP BPE files whose merges rebuild each caption word as one token (``seven</w>``); any other lowercase
    word or number falls back to its characters."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(CHARS) + [c + "</w>" for c in CHARS]
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: s e → se, se v → sev, ..., seve n</w> → seven</w>
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            tokens.append(parts[0])
    vocab = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


def write_t5_tokenizer(folder: Path, words: list[str]) -> Path:
    """A T5 Unigram ``tokenizer.json`` that prefers the caption words whole (``▁seven``), characters otherwise."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [("▁", -8.0)] + [(c, -8.0) for c in CHARS]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "extra_ids": 0, "model_max_length": 64}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# --------------------------------------------------------------------------- VAE


def new_vae(sizes: Sizes):
    from diffusers import AutoencoderKL

    levels = len(sizes.vae_channels)
    return AutoencoderKL(
        sample_size=sizes.image,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(sizes.vae_channels),
        layers_per_block=1,
        latent_channels=sizes.latent_channels,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def load_images(folder: Path) -> torch.Tensor:
    """The folder's PNGs (``metadata.jsonl`` order) as (N, 3, H, W) in [-1, 1]."""
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    arrays = []
    for row in rows:
        with Image.open(folder / row["file_name"]) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def train_vae(images: torch.Tensor, sizes: Sizes, steps: int = 1500, batch_size: int = 64, seed: int = 0,
              kl_weight: float = 1e-4, lr: float = 2e-3, progress=None):  # fmt: skip
    """A small ``AutoencoderKL`` trained on ``images`` (N, 3, H, W) in [-1, 1] (reconstruction MSE of a latent
    sample + ``kl_weight`` × KL, AdamW, cosine LR), its ``shift_factor`` / ``scaling_factor`` set to the mean and
    1 / standard deviation of the training latents' means; eval mode. ``progress(step, loss)`` is called every 100
    steps."""
    torch.manual_seed(seed)
    vae = new_vae(sizes)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        rec = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and (step % 100 == 0 or step == steps):
            progress(step, rec.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        recon = torch.cat([vae.decode(means[i : i + 256]).sample for i in range(0, len(means), 256)])
    shift = means.mean().item()
    scale = 1.0 / (means - shift).std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.recon_mse = torch.nn.functional.mse_loss(recon, images).item()
    return vae


# --------------------------------------------------------------------------- pipeline


def build_pipeline(folder: str | Path, vae, sizes: Sizes, seed: int = 0):
    """The tiny ``StableDiffusion3Pipeline`` (``FlowMatchEulerDiscreteScheduler`` with shift 1, float32, eval
    mode) around ``vae``; tokenizer files are written under ``folder / "tokenizer_files"``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    folder = Path(folder)
    words = vocabulary()
    clip_dir = write_clip_tokenizer(folder / "tokenizer_files" / "clip", words)
    t5_dir = write_t5_tokenizer(folder / "tokenizer_files" / "t5", words)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=sizes.clip_length)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=sizes.clip_length)
    tokenizer_3 = T5TokenizerFast.from_pretrained(str(t5_dir))
    width = sizes.text_width
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=sizes.clip_length, projection_dim=width, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    t5_config = T5Config(
        vocab_size=len(tokenizer_3), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    modules = {
        "text_encoder": CLIPTextModelWithProjection(clip_config),
        "text_encoder_2": CLIPTextModelWithProjection(clip_config),
        "text_encoder_3": T5EncoderModel(t5_config),
        "transformer": SD3Transformer2DModel(
            sample_size=sizes.latent_side,
            in_channels=sizes.latent_channels,
            out_channels=sizes.latent_channels,
            joint_attention_dim=width,  # T5's width; the two CLIPs' concatenated states are cropped to it
            pooled_projection_dim=2 * width,
            pos_embed_max_size=max(16, sizes.latent_side),
            **sizes.transformer,
        ),
        "vae": vae,
    }
    tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "tokenizer_3": tokenizer_3}
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), **tokenizers, **{k: m.eval() for k, m in modules.items()}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_base_pipeline(images_dir: str | Path, out: str | Path, sizes: Sizes | None = None, vae_steps: int = 1500,
                        seed: int = 0, say=print) -> Path:  # fmt: skip
    """Train the VAE on the folder's images and save the pipeline (random transformer) to ``out``; skipped when
    ``out/model_index.json`` exists. Records the VAE's reconstruction error in ``out/vae_train.json``."""
    out = Path(out)
    if (out / "model_index.json").exists():
        return out
    sizes = sizes or Sizes()
    images = load_images(Path(images_dir))
    t0 = time.perf_counter()
    vae = train_vae(images, sizes, steps=vae_steps, seed=seed,
                    progress=lambda s, loss: say(f"  vae step {s}/{vae_steps}  recon mse {loss:.4f}"))  # fmt: skip
    pipe = build_pipeline(out.parent / f"{out.name}_files", vae, sizes, seed=seed)
    tmp = out.parent / f"{out.name}.tmp"
    pipe.save_pretrained(tmp)
    record = {"steps": vae_steps, "seconds": time.perf_counter() - t0, "recon_mse": vae.recon_mse,
              "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor}  # fmt: skip
    (tmp / "vae_train.json").write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    return out
