"""Precompute at scale: images decoded in worker processes give the same cache; images added to the folder go to
new shards and the old ones are not encoded again; a precompute launched on 2 processes writes the cache 1 process
writes, tensor for tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fewstep.data.latents import LatentData
from fewstep.precompute import main as precompute_main

SQUARE, WIDE = (16, 16), (20, 15)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def write_images(folder: Path, names: list[str], seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n, name in enumerate(names):
        w, h = SQUARE if n % 3 else WIDE
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo number {name}")
    return folder


def args(pretrained, images, out, *extra):
    return [f"pretrained={pretrained}", f"images={images}", f"out={out}", "resolution=16", "batch_size=2",
            "max_sequence_length=8", "progress=false", "shard_size=2", "device=cpu", *extra]  # fmt: skip


def shard_tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {e["file"]: load_file(str(out / e["file"])) for e in manifest["shards"]}


def same_cache(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [(e["file"], e["files"], e["bytes"]) for e in ma["shards"]] == [
        (e["file"], e["files"], e["bytes"]) for e in mb["shards"]
    ]
    assert ma["summary"] == mb["summary"]
    ta, tb = shard_tensors(a), shard_tensors(b)
    for file in ta:
        assert ta[file].keys() == tb[file].keys()
        assert all(torch.equal(ta[file][k], tb[file][k]) for k in ta[file]), file
    for small in ("null.safetensors", "validation.safetensors"):
        la, lb = load_file(str(a / small)), load_file(str(b / small))
        assert all(torch.equal(la[k], lb[k]) for k in la)


def test_images_decoded_in_worker_processes_give_the_same_cache(pretrained, tmp_path):
    images = write_images(tmp_path / "images", [f"img{n}" for n in range(7)])
    precompute_main(args(pretrained, images, tmp_path / "inline", "workers=0"))
    precompute_main(args(pretrained, images, tmp_path / "workers", "workers=2"))
    same_cache(tmp_path / "inline", tmp_path / "workers")
    with pytest.raises(SystemExit, match="workers=-1 must be auto or a number of image-decoding processes"):
        precompute_main(args(pretrained, images, tmp_path / "x", "workers=-1"))


def test_images_added_to_the_folder_go_to_new_shards_and_old_shards_are_kept(pretrained, tmp_path):
    images = write_images(tmp_path / "images", ["b", "d", "f", "h", "j", "l"])
    out = tmp_path / "cache"
    first = precompute_main(args(pretrained, images, out))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").glob("*.safetensors")}
    placed = {e["file"]: e["files"] for e in first["shards"]}
    write_images(images, ["a", "e", "k"], seed=1)  # sorted among the old names: a plan from scratch would move them
    again = precompute_main(args(pretrained, images, out))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").glob("*.safetensors")}
    assert all(after[name] == before[name] for name in before)  # not one old shard written again
    entries = {e["file"]: e["files"] for e in again["shards"]}
    assert all(entries[file] == files for file, files in placed.items())  # each old image where it was
    new = [e for e in again["shards"] if e["file"] not in placed]
    assert sorted(f for e in new for f in e["files"]) == ["a.png", "e.png", "k.png"]
    assert min(int(Path(e["file"]).stem.split("_")[1]) for e in new) == len(placed)  # numbered after the old ones
    assert again["summary"]["encoded"] == 9 and again["summary"]["shards_resumed"] == len(placed)
    fresh = tmp_path / "fresh"  # every new shard holds what a cache of the same images holds for those images
    precompute_main(args(pretrained, images, fresh))
    data, straight = LatentData(str(out)), LatentData(str(fresh))

    def rows(d):
        return {f: d.read(torch.tensor([i]))[0] for i, f in enumerate(f for e in d.shards for f in e["files"])}

    a, b = rows(data), rows(straight)  # encoded in other batches: equal up to the encoders' batch numerics
    assert a.keys() == b.keys() and max((a[f] - b[f]).abs().max().item() for f in a) < 1e-5
    os.remove(images / "d.png")  # an image removed: its shard's other image moves to a new shard
    third = precompute_main(args(pretrained, images, out))
    assert third["summary"]["encoded"] == 8 and all("d.png" not in e["files"] for e in third["shards"])


@pytest.mark.slow
def test_two_processes_write_the_cache_one_process_writes(pretrained, tmp_path):
    images = write_images(tmp_path / "images", [f"img{n}" for n in range(9)])
    precompute_main(args(pretrained, images, tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
              "-m", "fewstep.precompute", *args(pretrained, images, tmp_path / "two")]  # fmt: skip
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    same_cache(tmp_path / "one", tmp_path / "two")
    sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / "two" / "shards").glob("*.json"))]
    assert [s["process"] for s in sidecars] == [n % 2 for n in range(len(sidecars))]  # shard n: process n mod 2
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["summary"]["shards"] >= 4  # both processes had shards to encode
