"""precompute on the tiny offline SD3 pipeline: the upscaling warning, a cache larger than the transformer takes
(refused before the weights load) and image+caption sources from the ``datasets`` library."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fewstep.config.validate import ConfigError, validate
from fewstep.precompute import main as precompute_main

from helpers import FAST, compose

MAX_SEQ = 8


@pytest.fixture(scope="module")
def small_pos_embed_pipeline(tmp_path_factory):
    """The tiny SD3 pipeline whose transformer takes latents of at most 8x8 (patch 1)."""
    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", transformer_kwargs={"pos_embed_max_size": 8})


def write_images(folder, sizes: list[int]):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, side in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a cat number {i}")
    return folder


def precompute_args(pretrained, out, *extra):
    return [f"pretrained={pretrained}", f"out={out}", "batch_size=2", f"max_sequence_length={MAX_SEQ}",
            "embeds_dtype=float32", "progress=false", "buckets=false", *extra]  # fmt: skip


@pytest.mark.slow
def test_upscaled_images_are_counted_in_one_warning_and_the_oversized_cache_is_refused(
    small_pos_embed_pipeline, tmp_path, caplog
):
    images = write_images(tmp_path / "images", [8, 8, 16, 4, 16])
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="fewstep.precompute"):
        manifest = precompute_main(
            precompute_args(small_pos_embed_pipeline, cache, f"images={images}", "resolution=16")
        )
    warnings = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert warnings == [
        "precompute: 3 of 5 images are smaller than resolution=16 and are upscaled (up to 4.00x, e.g. img3.png); "
        "give larger images or a lower resolution= for sharper latents"
    ]
    assert manifest["summary"]["upscaled"] == 3 and manifest["summary"]["latent_buckets"] == {"4x16x16": 5}
    # the VAE keeps the size (scale 1), the transformer takes 8 at most: refused before any weight loads
    over = ["model=sd35", f"model.pretrained={small_pos_embed_pipeline}", "data=latents", f"data.path={cache}"]
    with pytest.raises(ConfigError) as err:
        validate(compose([*over, *FAST]))
    assert str(err.value) == (
        f"data.path={cache} holds latents up to 16 wide/high (1 of 1 latent sizes) but "
        f"model.pretrained={small_pos_embed_pipeline} takes at most 8 (pos_embed_max_size 8 x patch_size 1): "
        "re-run precompute with resolution=8 or lower into a new out dir"
    )
    # as the message says: at resolution=8 it trains (only the 4 px image is still enlarged)
    caplog.clear()
    small = tmp_path / "cache8"
    with caplog.at_level(logging.WARNING, logger="fewstep.precompute"):
        precompute_main(precompute_args(small_pos_embed_pipeline, small, f"images={images}", "resolution=8"))
    warnings = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("precompute: 1 of 5 images are smaller than resolution=8")
    assert json.loads((small / "manifest.json").read_text())["summary"]["upscaled"] == 1
    from fewstep.training.loop import train

    over[-1] = f"data.path={small}"
    summary = train(compose([*over, "data.batch_size=2", "trainer.max_steps=1", "trainer.final_nfe=[1]",
                             "trainer.grid_size=2", *FAST]), run_dir=tmp_path / "run")  # fmt: skip
    assert summary["steps"] == 1


# --------------------------------------------------------------------------- datasets sources


def write_imagefolder(folder, n: int = 5):
    """An imagefolder: PNGs + metadata.jsonl (row 3 without a caption), read by both images= and dataset=."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    meta = []
    for i in range(n):
        side = (8, 12)[i % 2]
        Image.fromarray(rng.integers(0, 255, (side, 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        meta.append({"file_name": f"img{i}.png", "text": None if i == 3 else f"a dog number {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    return folder, meta


def shard_tensors(cache):
    from safetensors.torch import load_file

    manifest = json.loads((cache / "manifest.json").read_text())
    return [(s["files"], load_file(str(cache / s["file"]))) for s in manifest["shards"]]


@pytest.mark.slow
def test_datasets_sources_match_the_folder_cache_and_resume(small_pos_embed_pipeline, tmp_path):
    import datasets
    import torch

    folder, meta = write_imagefolder(tmp_path / "imagefolder")
    # the same rows as parquet and as a save_to_disk (arrow) dataset, captions in a "caption" column
    rows = {"picture": [{"bytes": (folder / m["file_name"]).read_bytes(), "path": None} for m in meta],
            "caption": [m["text"] for m in meta]}  # fmt: skip
    table = datasets.Dataset.from_dict(rows).cast_column("picture", datasets.Image())
    (tmp_path / "parquet").mkdir()
    table.to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    table.save_to_disk(str(tmp_path / "arrow"))

    def run(out, *source):
        return precompute_main(precompute_args(small_pos_embed_pipeline, out, "resolution=8", "buckets=true", *source))

    folder_manifest = run(tmp_path / "c_folder", f"images={folder}")
    assert folder_manifest["summary"]["encoded"] == 4  # metadata.jsonl's null caption is a missing one
    assert [s["file"] for s in folder_manifest["skipped"]] == ["img3.png"]
    expected = shard_tensors(tmp_path / "c_folder")
    columns = ["image_column=picture", "caption_column=caption"]
    sources = {
        "imagefolder": [f"dataset={folder}"],  # datasets' imagefolder builder: image + text columns
        "parquet": [f"dataset={tmp_path / 'parquet'}", *columns],
        "arrow": [f"dataset={tmp_path / 'arrow'}", *columns],
    }
    for name, source in sources.items():
        manifest = run(tmp_path / f"c_{name}", *source)
        assert manifest["summary"]["encoded"] == 4, name
        assert [s["file"] for s in manifest["skipped"]] == ["row 3"], name
        assert manifest["source"]["dataset"] == source[0].split("=", 1)[1]
        got = shard_tensors(tmp_path / f"c_{name}")
        assert [files for files, _ in got] == [[f.replace("img", "row ").removesuffix(".png") for f in files]
                                               for files, _ in expected]  # fmt: skip
        for (_, a), (_, b) in zip(got, expected):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # resumable like the folder path: a finished run resumes every shard; a lost shard is redone, identical
    cache = tmp_path / "c_parquet"
    assert run(cache, *sources["parquet"])["summary"]["shards_resumed"] == len(expected)
    # its tensors zeroed as well: identical afterwards only if the shard was encoded and written again
    from safetensors.torch import load_file, save_file

    tensors = cache / "shards" / "shard_00000.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(tensors)).items()}, str(tensors))
    (cache / "shards" / "shard_00000.json").unlink()
    redo = run(cache, *sources["parquet"])
    assert redo["summary"]["shards_resumed"] == len(expected) - 1
    assert all(torch.equal(a[k], b[k]) for (_, a), (_, b) in zip(shard_tensors(cache), expected) for k in a)


def test_dataset_errors_name_the_fix(tmp_path):
    import datasets

    from fewstep.data.image_datasets import DatasetImages, DatasetSourceError

    datasets.Dataset.from_dict({"img": [b"x"], "text": ["a"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DatasetSourceError, match=r"has no column 'image': set image_column= to one of img, text$"):
        DatasetImages(str(tmp_path / "d"))
    with pytest.raises(DatasetSourceError, match=r"has no column 'caption': set caption_column= to one of img, t"):
        DatasetImages(str(tmp_path / "d"), image_column="img", caption_column="caption")
    with pytest.raises(DatasetSourceError, match=r"could not be opened .*give a hub id, a save_to_disk folder"):
        DatasetImages(str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="give one of images=DIR, dataset=HUB_ID_OR_DIR or prompts=FILE"):
        precompute_main(["pretrained=x", f"out={tmp_path / 'o'}"])


def test_the_default_prompt_length_is_each_family_pipelines_own_and_a_resumed_cache_keeps_it(tmp_path):
    """Without ``max_sequence_length=`` a cache is encoded at the family pipeline's ``__call__`` default (SD3 256
    T5 tokens, SANA 300, Qwen-Image 512; it was 256 for all, truncating prompts the pipelines keep); an explicit
    value wins; a shard encoded at another length is encoded again on resume, not mixed into the cache."""
    import inspect

    from diffusers import QwenImagePipeline, SanaPipeline, StableDiffusion3Pipeline

    from fewstep.models.family import families
    from fewstep.precompute import VERSION1_LAYOUT, Item, Shard, _shard_done, sequence_length

    found = families()
    for name, pipeline, length in [("sd3", StableDiffusion3Pipeline, 256), ("sana", SanaPipeline, 300),
                                   ("qwenimage", QwenImagePipeline, 512)]:  # fmt: skip
        assert inspect.signature(pipeline.__call__).parameters["max_sequence_length"].default == length
        assert (sequence_length(None, found[name]), sequence_length(77, found[name])) == (length, 77)
    assert sequence_length(None, found["openuni"]) is sequence_length(77, found["openuni"]) is None  # fixed length
    shard = Shard("shard_00000", (8, 8), [Item("a.png", "a", (8, 8))])
    info = {"planned": ["a.png"], "size": [8, 8], "count": 0, "files": [], "skipped": [], "max_sequence_length": 256}
    (tmp_path / "shard_00000.json").write_text(json.dumps(info))
    v1, v2 = VERSION1_LAYOUT, {"latents_dtype": "bfloat16", "text_layout": "ragged"}
    assert _shard_done(shard, tmp_path, 256, v1) == info and _shard_done(shard, tmp_path, 512, v1) is None
    assert _shard_done(shard, tmp_path, 256, v2) is None  # a version-1 shard is encoded again for a version-2 cache
    del info["max_sequence_length"]  # a shard written before lengths were recorded: unknown, encoded again, except
    (tmp_path / "shard_00000.json").write_text(json.dumps(info))  # where the length does not apply (OpenUni)
    assert _shard_done(shard, tmp_path, 256, v1) is None and _shard_done(shard, tmp_path, None, v1) == info
    with pytest.raises(SystemExit, match="max_sequence_length=0 must be a positive number of tokens"):
        precompute_main(["pretrained=x", f"out={tmp_path / 'o'}", f"images={tmp_path}", "max_sequence_length=0"])
