"""Sharded checkpoints under FSDP (``trainer.distributed=fsdp``, torch.distributed.checkpoint): each rank writes its
own shards, no gather on rank 0; resume is bit-exact, reshards to another process count, a kill -9 in the middle of
a save leaves the previous checkpoint loadable, and export/sampling read the shards directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.training import checkpoint as ckpt_io
from fewstep.training.sharded_checkpoint import whole_tensors

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")]

HANG_ENV = "FEWSTEP_TEST_HANG_SAVE_AT"  # the step whose sharded save hangs after writing its shards
SITE = Path(__file__).resolve().parent / "hang_site"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from models.test_families import SIDE, run_precompute

    from helpers.tiny_families import save_tiny_pipeline

    root = tmp_path_factory.mktemp("qwen_dcp")
    pretrained = save_tiny_pipeline("qwenimage", root / "pipe")
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(1)  # wider than the tiny pipeline's (3 M parameters): shard files large beside their headers
    QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(32, 16, 16),
    ).save_pretrained(pretrained / "transformer")  # fmt: skip
    images = root / "images"
    images.mkdir()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    meta = []
    for i in range(6):
        side = SIDE["qwenimage"]
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        meta.append({"file_name": f"img{i}.png", "text": f"a red cat number {i}"})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    run_precompute("qwenimage", pretrained, images, root / "cache")
    return pretrained, root / "cache"


def launch(qwen, run, *extra, processes=2, env=None, wait=True):
    pretrained, cache = qwen
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fewstep",
        "objective=twinflow", "sampler=ucgm", "model=qwenimage", f"model.pretrained={pretrained}", "data=latents",
        f"data.path={cache}", "data.batch_size=1", "trainer.lr=1e-2", "trainer.lr_schedule=constant",
        "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.final_nfe=[1]", "trainer.grid_size=4",
        "trainer.sample_every=1000", "trainer.evaluate=false", "trainer.baseline_steps=0", "logger=none",
        "trainer.distributed=fsdp", "trainer.keep_last=5", f"hydra.run.dir={run}", *extra,
    ]  # fmt: skip
    from helpers.faults import subprocess_env

    environ = subprocess_env(**(env or {}))
    if env and HANG_ENV in env:
        environ["PYTHONPATH"] = os.pathsep.join([str(SITE), environ["PYTHONPATH"]])
    if not wait:
        return subprocess.Popen(cmd, cwd=run.parent, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    proc = subprocess.run(cmd, cwd=run.parent, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def step_dir(run, step):
    return run / "checkpoints" / f"step_{step:07d}"


def weights(ckpt) -> dict:
    return {**whole_tensors(ckpt, "model"), **{f"ema/{k}": v for k, v in whole_tensors(ckpt, "teacher.shadow").items()}}


def state_bytes(ckpt) -> int:
    """Bytes of every tensor a sharded checkpoint holds (from its metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    return sum(m.size.numel() * torch.empty((), dtype=m.properties.dtype).element_size()
               for m in meta.values() if isinstance(m, TensorStorageMetadata))  # fmt: skip


def moments(ckpt) -> dict:
    return whole_tensors(ckpt, "optimizer.state")


def test_each_rank_writes_its_shards_and_a_resume_is_bit_exact_on_2_and_3_processes(qwen, tmp_path):
    straight = launch(qwen, tmp_path / "straight", "trainer.max_steps=4", "trainer.grad_accum=3")
    ckpt = step_dir(straight, 2)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "dcp" and not (ckpt / "model.safetensors").exists()
    shards = {name: size for name, size in state["files"].items() if name.endswith(".distcp")}
    assert sorted(shards) == ["dcp/__0_0.distcp", "dcp/__1_0.distcp"]
    total = state_bytes(ckpt)
    assert total > 40e6  # weights, EMA and both AdamW moments of 3 M parameters in fp32
    for size in shards.values():  # each rank writes half of them
        assert 0.45 * total < size < 0.55 * total, (size, total)

    # 2 processes: resume=auto from step 2 to 4 equals the straight run bit for bit
    split = tmp_path / "split"
    import shutil

    shutil.copytree(ckpt, step_dir(split, 2))
    launch(qwen, split, "trainer.max_steps=4", "trainer.grad_accum=3", "trainer.resume=auto")
    summary = json.loads((split / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"], summary["num_processes"]) == (2, 4, 2)
    a, b = weights(step_dir(straight, 4)), weights(step_dir(split, 4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = moments(step_dir(straight, 4)), moments(step_dir(split, 4))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert max((a[k] - weights(ckpt)[k]).abs().max().item() for k in a) > 1e-3  # steps 3-4 moved the weights

    # 3 processes, grad_accum 2: the same 6 data slots per step, resharded on load (2 shards -> 3)
    three = tmp_path / "three"
    shutil.copytree(ckpt, step_dir(three, 2))
    launch(qwen, three, "trainer.max_steps=4", "trainer.grad_accum=2", "trainer.resume=auto", processes=3)
    summary = json.loads((three / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"], summary["num_processes"]) == (2, 4, 3)
    assert len(summary["params_per_process"]) == 3
    state3 = json.loads((step_dir(three, 4) / "state.json").read_text())
    assert sorted(n for n in state3["files"] if n.endswith(".distcp")) == [f"dcp/__{r}_0.distcp" for r in range(3)]
    c = weights(step_dir(three, 4))
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-5  # the same math, another reduction order


def test_export_and_sampling_read_the_shards_as_an_unsharded_run_would(qwen, tmp_path):
    from fewstep.export.pipeline import load_run_model

    live = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc returns freed large blocks at once: RSS follows live memory
    sharded = launch(qwen, tmp_path / "sharded", "trainer.max_steps=2", env=live)
    full = launch(qwen, tmp_path / "full", "trainer.max_steps=2", "trainer.checkpoint_format=full", env=live)
    assert json.loads((step_dir(full, 2) / "state.json").read_text()).get("format") is None
    ema = load_file(str(step_dir(full, 2) / "teacher.safetensors"))
    assert all(torch.equal(ema[k], v) for k, v in whole_tensors(step_dir(sharded, 2), "teacher.shadow").items())
    # rank 0's host memory during its saves: the full format gathers the whole state there, the sharded one does not
    state_mb = state_bytes(step_dir(sharded, 2)) / 2**20
    rise = {
        run.name: json.loads((run / "summary.json").read_text())["checkpoint_host_growth_mb"] for run in (sharded, full)
    }
    print(f"state {state_mb:.1f} MB; RSS rise during saves per rank (MB): {rise}")
    # (measured: state 74 MB; full: rank 0 +35.2 MB, the AdamW moments it gathers at once; sharded: +2.5 and +1.7)
    assert rise["full"][0] > 0.4 * state_mb and max(rise["sharded"]) < 0.1 * state_mb
    # a background save (trainer.async_checkpoint) snapshots the step it was asked for while training goes on
    background = launch(qwen, tmp_path / "async", "trainer.max_steps=4", "trainer.async_checkpoint=true")
    a, b = weights(step_dir(background, 2)), weights(step_dir(sharded, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(
        torch.equal(x, y)
        for x, y in zip(moments(step_dir(background, 2)).values(), moments(step_dir(sharded, 2)).values())
    )
    assert ckpt_io.latest_valid(background / "checkpoints") == step_dir(background, 4)
    from fewstep.training.runs import load_run  # what fewstep.sample and fewstep.eval load

    for run in (sharded, full):
        loaded = load_run(run, device="cpu")
        assert loaded.step == 2 and all(torch.equal(loaded.teacher.shadow[k], ema[k]) for k in ema), run.name
        _, model, *_ = load_run_model(run, None, "ema")
        state = model.state_dict()
        assert all(torch.equal(state[k], ema[k]) for k in ema), run.name


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(qwen, tmp_path):
    run = tmp_path / "killed"
    proc = launch(qwen, run, "trainer.max_steps=6", env={HANG_ENV: "4"}, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run / "checkpoints").glob(".tmp_step_0000004_*/dcp/.metadata")):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    time.sleep(1.0)
    # every process of the launch (torchrun starts each rank in a session of its own): all name the run dir
    subprocess.run(["pkill", "-9", "-f", f"hydra.run.dir={run}"], check=False)
    proc.wait()
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", f"hydra.run.dir={run}"], capture_output=True).returncode == 0:
        assert time.time() < deadline, "the killed ranks are still running"
        time.sleep(0.2)
    assert [p.name for p in ckpt_io.list_checkpoints(run / "checkpoints")] == ["step_0000002"]
    assert ckpt_io.latest_valid(run / "checkpoints") == step_dir(run, 2)
    launch(qwen, run, "trainer.max_steps=4", "trainer.resume=auto")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"]) == (2, 4)
    assert not list((run / "checkpoints").glob(".tmp_*"))  # the killed save's folder is cleaned up
