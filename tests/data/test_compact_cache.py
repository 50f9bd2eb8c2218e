"""The compact latent cache (version 2, ``fewstep.data.shards``): masked text embeddings stored with their valid
tokens only, latents in bf16 by default. Batches read from it equal the padded (version-1 layout) cache's, tensor
for tensor; a cache written by version 1 still loads and reads the same numbers; the bytes per sample are the
formula the docs scale to the real widths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.data.latents import LatentData
from fewstep.data.shards import TOKENS
from fewstep.precompute import main as precompute_main

V1_FIXTURE = Path(__file__).parents[1] / "fixtures" / "latent_cache_v1"  # written by the version-1 precompute
CAPTIONS = ["a cat", "the digit seven written by hand", "a red fox sitting in fresh snow at dawn", "x",
            "a bowl of ramen", "a lighthouse on a cliff at sunset, oil painting, dramatic clouds"]  # fmt: skip


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The tiny Qwen-Image pipeline the version-1 fixture was written with (seed 0)."""
    from helpers.tiny_families import save_tiny_pipeline

    return save_tiny_pipeline("qwenimage", tmp_path_factory.mktemp("qwen") / "pipe", seed=0)


def precompute(pretrained, images, out, *extra, resolution=16, max_sequence_length=200):
    precompute_main(
        [f"pretrained={pretrained}", f"images={images}", f"out={out}", f"resolution={resolution}", "batch_size=2",
         f"max_sequence_length={max_sequence_length}", "progress=false", "shard_size=4", *extra]
    )  # fmt: skip
    return out


def all_batches(path, epochs=2):
    data = LatentData(str(path), batch_size=2)
    stream = data.batches(seed=3)
    return data, [next(stream) for _ in range(3 * epochs)]  # 6 items, batches of 2: 3 per epoch


@pytest.fixture(scope="module")
def caches(qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    images = V1_FIXTURE / "images"
    return {
        "padded": precompute(qwen, images, root / "padded", "text_layout=padded", "latents_dtype=float32"),
        "ragged32": precompute(qwen, images, root / "ragged32", "latents_dtype=float32"),
        "default": precompute(qwen, images, root / "default"),
    }


def test_ragged_batches_equal_the_padded_caches_tensor_for_tensor(caches):
    _, padded = all_batches(caches["padded"])
    data, ragged = all_batches(caches["ragged32"])
    assert data.manifest["version"] == 2 and data.manifest["text_layout"] == "ragged"
    for a, b in zip(padded, ragged, strict=True):
        assert torch.equal(a.x, b.x)
        assert sorted(a.cond) == sorted(b.cond) == ["prompt_embeds", "prompt_embeds_mask"]
        for key in a.cond:
            assert a.cond[key].dtype == b.cond[key].dtype == torch.float32
            assert torch.equal(a.cond[key], b.cond[key]), key
            assert torch.equal(a.null_cond[key], b.null_cond[key])
    lengths = padded[0].cond["prompt_embeds_mask"].sum(1)
    assert lengths.max() < 200 and len(set(lengths.tolist())) == 2  # real padding, rows of different lengths
    _, default = all_batches(caches["default"])  # bf16 latents: the padded cache's rounded to bf16, nothing else
    for a, b in zip(padded, default, strict=True):
        assert torch.equal(a.x.bfloat16().float(), b.x) and not torch.equal(a.x, b.x)
        assert all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)


def test_a_version1_cache_still_loads_and_reads_the_numbers_it_holds(caches, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(V1_FIXTURE, v1)
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert manifest["version"] == 1 and "cond_shapes" not in manifest and "bytes" not in manifest["shards"][0]
    data, old = all_batches(v1)
    assert data.cond_shapes == {"prompt_embeds": (200, 16), "prompt_embeds_mask": (200,)}  # from the first shard
    _, padded = all_batches(caches["padded"])
    # the same images through today's precompute, padded fp32 layout; equal up to the encoders' numerics (the
    # fixture was encoded in another process, maybe with another torch thread count)
    for a, b in zip(old, padded, strict=True):
        assert torch.allclose(a.x, b.x, atol=1e-5, rtol=0)
        assert all(torch.allclose(a.cond[k], b.cond[k], atol=1e-5, rtol=0) for k in a.cond)
        assert torch.equal(a.cond["prompt_embeds_mask"], b.cond["prompt_embeds_mask"])


def test_a_ragged_shard_holds_the_valid_tokens_only(caches):
    manifest = json.loads((caches["default"] / "manifest.json").read_text())
    padded = json.loads((caches["padded"] / "manifest.json").read_text())
    assert manifest["cond_shapes"] == {"prompt_embeds": [200, 16], "prompt_embeds_mask": [200]}
    from safetensors import safe_open

    total_valid, total_bytes = 0, 0
    for entry in manifest["shards"]:
        with safe_open(str(caches["default"] / entry["file"]), "pt") as f:
            mask, tokens = f.get_tensor("prompt_embeds_mask"), f.get_tensor("prompt_embeds" + TOKENS)
            latents = f.get_tensor("latents")
            assert "prompt_embeds" not in f.keys()
        n = entry["count"]
        assert mask.dtype == torch.bool and mask.shape == (n, 200) and latents.dtype == torch.bfloat16
        assert tokens.shape == (int(mask.sum()), 16) and tokens.dtype == torch.bfloat16
        # the data bytes: valid tokens × width × 2, a byte per mask position, bf16 latents
        data_bytes = tokens.numel() * 2 + n * 200 + latents.numel() * 2
        header = entry["bytes"] - data_bytes
        assert 0 < header < 1024  # the rest is the safetensors header
        total_valid, total_bytes = total_valid + int(mask.sum()), total_bytes + entry["bytes"]
    assert manifest["summary"]["bytes_per_sample"] == round(total_bytes / 6)
    # the padded float32 layout: 200 tokens a row (bf16), a bf16 mask, float32 latents; the ragged one saves the
    # padding's tokens, a byte per mask position and half the latents' bytes (headers aside)
    saved = ((6 * 200 - total_valid) * 16 * 2 + 6 * 200 * 1 + 6 * 4 * 4 * 4 * 2) / 6
    assert abs(padded["summary"]["bytes_per_sample"] - manifest["summary"]["bytes_per_sample"] - saved) < 100
    assert total_valid < 6 * 200


def test_a_storage_option_change_encodes_the_cache_again(qwen, caches, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(caches["padded"], out)
    precompute(qwen, V1_FIXTURE / "images", out)  # the defaults: ragged, bf16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["shards_resumed"] == 0 and manifest["text_layout"] == "ragged"
    _, again = all_batches(out)
    _, default = all_batches(caches["default"])
    assert all(torch.equal(a.x, b.x) for a, b in zip(again, default, strict=True))
    precompute(qwen, V1_FIXTURE / "images", out)  # same options: every shard kept
    assert json.loads((out / "manifest.json").read_text())["summary"]["shards_resumed"] == 2
    with pytest.raises(SystemExit, match="text_layout='sparse' must be ragged"):
        precompute(qwen, V1_FIXTURE / "images", tmp_path / "x", "text_layout=sparse")


def test_sana_ragged_rows_zero_the_masked_tokens_and_the_transformer_output_is_unchanged(tmp_path):
    """SANA's Gemma padding carries values (the pipeline masks it in attention): the ragged cache reads it back
    as zeros, and the transformer's prediction with the mask is the same as with the padded values."""
    from diffusers import SanaTransformer2DModel
    from PIL import Image

    from helpers.tiny_families import save_tiny_pipeline

    pipe = save_tiny_pipeline("sana", tmp_path / "pipe")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i, caption in enumerate(["a cat", "a red fox in snow", "x y", "a very long caption about many things"]):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(caption)
    extra = ["complex_human_instruction=none", "latents_dtype=float32", "resolution=32"]
    padded = precompute(pipe, images, tmp_path / "p", "text_layout=padded", *extra, max_sequence_length=8)
    ragged = precompute(pipe, images, tmp_path / "r", *extra, max_sequence_length=8)
    a = LatentData(str(padded), batch_size=4).read(torch.arange(4))
    b = LatentData(str(ragged), batch_size=4).read(torch.arange(4))
    mask = a[1]["prompt_attention_mask"].bool()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["prompt_attention_mask"], b[1]["prompt_attention_mask"])
    assert 0 < int(mask.sum()) < mask.numel()  # some padding
    assert torch.equal(a[1]["prompt_embeds"][mask], b[1]["prompt_embeds"][mask])
    assert b[1]["prompt_embeds"][~mask].abs().sum() == 0 and a[1]["prompt_embeds"][~mask].abs().sum() > 0
    transformer = SanaTransformer2DModel.from_pretrained(pipe, subfolder="transformer").eval()
    t = torch.full((4,), 500.0)
    with torch.no_grad():
        outputs = [
            transformer(x, encoder_hidden_states=c["prompt_embeds"], encoder_attention_mask=c["prompt_attention_mask"],
                        timestep=t, return_dict=False)[0]
            for x, c in (a, b)
        ]  # fmt: skip
    assert torch.equal(outputs[0], outputs[1])
