"""``precompute text=online``: the shards hold latents and captions only, and ``data=latents`` encodes the
captions with the pipeline's text encoders as it reads. Batches equal the cached path's up to the encoders'
batch numerics (1e-5 here, float32 on the CPU; a cache in bf16 embeddings differs by its rounding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fewstep.data.latents import LatentData
from fewstep.data.shards import CAPTIONS
from fewstep.precompute import main as precompute_main

from helpers import FAST, compose

FAMILIES = {"sd3": (16, 8), "qwenimage": (16, 200)}  # image side, max_sequence_length


def write_images(folder: Path, side: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, caption in enumerate(["a cat", "the digit seven", "a red fox in the snow", "x", "a bowl of ramen", "b"]):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"img{n}.png")
        (folder / f"img{n}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def caches(request, tmp_path_factory):
    family = request.param
    side, length = FAMILIES[family]
    root = tmp_path_factory.mktemp(family)
    if family == "sd3":
        from helpers.tiny_sd3 import save_tiny_sd3_pipeline

        pipe = save_tiny_sd3_pipeline(root / "pipe")
    else:
        from helpers.tiny_families import save_tiny_pipeline

        pipe = save_tiny_pipeline(family, root / "pipe")
    images = write_images(root / "images", side)
    common = [f"pretrained={pipe}", f"images={images}", f"resolution={side}", "batch_size=2", "progress=false",
              f"max_sequence_length={length}", "shard_size=4", "device=cpu"]  # fmt: skip
    out = {}
    for name, extra in {"cached": ["embeds_dtype=float32"], "bf16": [], "online": ["text=online"]}.items():
        precompute_main([*common, f"out={root / name}", *extra])
        out[name] = root / name
    return family, pipe, out


def test_online_shards_hold_latents_and_captions_only(caches):
    _, _, out = caches
    manifest = json.loads((out["online"] / "manifest.json").read_text())
    assert manifest["text"] == "online" and manifest["cond_shapes"]
    files = []
    for entry in manifest["shards"]:
        with safe_open(str(out["online"] / entry["file"]), "pt") as f:
            assert list(f.keys()) == ["latents"]
            captions = json.loads(f.metadata()[CAPTIONS])
        assert len(captions) == entry["count"]
        files += [(name, caption) for name, caption in zip(entry["files"], captions, strict=True)]
    assert ("img1.png", "the digit seven") in files and len(files) == 6
    cached = json.loads((out["cached"] / "manifest.json").read_text())["summary"]["bytes_per_sample"]
    assert manifest["summary"]["bytes_per_sample"] < cached / 2  # the embeddings are most of a cached sample


def test_online_batches_equal_the_cached_ones(caches):
    family, _, out = caches
    items = torch.tensor([5, 0, 3, 1])
    cached = LatentData(str(out["cached"])).read(items)
    online_data = LatentData(str(out["online"]))
    online = online_data.read(items)
    assert torch.equal(cached[0], online[0])  # the same latents
    assert sorted(cached[1]) == sorted(online[1]) == sorted(online_data.cond_shapes)
    for key in cached[1]:
        assert cached[1][key].shape == online[1][key].shape
        assert (cached[1][key] - online[1][key]).abs().max().item() < 1e-5, key
    bf16 = LatentData(str(out["bf16"])).read(items)[1]  # the default cache: embeddings rounded to bf16
    for key in bf16:
        assert torch.allclose(bf16[key], online[1][key], rtol=2**-8, atol=1e-6), key
    nulls = LatentData(str(out["bf16"])).null_cond(2), online_data.null_cond(2)  # encoded once, by precompute
    assert all(torch.equal(nulls[0][k], nulls[1][k]) for k in nulls[0])


def test_text_online_refuses_what_it_cannot_do(caches, tmp_path):
    _, pipe, _ = caches
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(SystemExit, match="text=online caches no embeddings, and prompts= caches nothing else"):
        precompute_main([f"pretrained={pipe}", f"prompts={prompts}", f"out={tmp_path / 'o'}", "text=online"])
    with pytest.raises(SystemExit, match="text='live' must be cached"):
        precompute_main([f"pretrained={pipe}", f"prompts={prompts}", f"out={tmp_path / 'o'}", "text=live"])


@pytest.mark.slow
def test_a_run_on_an_online_text_cache_trains_like_the_cached_one(caches, tmp_path):
    from safetensors.torch import load_file

    from fewstep.training.loop import train

    family, pipe, out = caches
    model = "sd35" if family == "sd3" else family

    def run(cache, name):
        cfg = compose(["objective=twinflow", "sampler=ucgm", f"model={model}", f"model.pretrained={pipe}",
                       "data=latents", f"data.path={cache}", "data.batch_size=2", "trainer.max_steps=3",
                       "trainer.final_nfe=[1]", "trainer.grid_size=4", "trainer.lr=1e-2", *FAST])  # fmt: skip
        train(cfg, run_dir=tmp_path / name)
        return load_file(str(tmp_path / name / "checkpoints" / "step_0000003" / "model.safetensors"))

    cached, online = run(out["cached"], "cached"), run(out["online"], "online")
    worst = max((cached[k] - online[k]).abs().max().item() for k in cached)
    assert worst < 1e-4  # the encoders' batch numerics, through 3 steps at lr 1e-2
