"""trainer.distributed (fewstep.training.distributed): what FSDP refuses in one line, the strategy helpers on unsharded
tensors (what every DDP and single-process run goes through), and (slow) a JVP objective with gradient
accumulation under 2-process FSDP on CPU equal to DDP. The full Qwen-Image FSDP run is in
tests/models/test_families.py."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.config.validate import ConfigError, validate
from fewstep.training import checkpoint as ckpt_io

from helpers import FAST, compose


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.distributed=zero"], "must be ddp or fsdp"),
        (["model=sd35_lora"], "LoRA trains a few adapter weights"),
        (["objective=dmd2"], "its own networks (fake score, frozen real score) are not sharded"),
        (["trainer.mixed_precision=fp16"], "use bf16"),
        (["trainer.compile=true"], "untested"),
        (["model=sd35", "model.no_grad_chunk=4"], "set model.no_grad_chunk=0"),
    ],
)
def test_what_fsdp_does_not_support_is_refused_in_one_line(overrides, message):
    distributed = [] if overrides[0].startswith("trainer.distributed") else ["trainer.distributed=fsdp"]
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        validate(compose([*distributed, *overrides]))
    assert "\n" not in str(err.value)
    validate(compose(["trainer.distributed=fsdp", "objective=meanflow"]))  # JVP objectives run sharded (below)


def test_unsharded_tensors_pass_the_full_state_helpers_unchanged(caplog):
    """A DDP or single-process run: gathers keep tensors only where asked, optimizer state keeps its tensors, loading is
    load_state_dict, and FSDP over one process falls back to the whole model with a warning."""
    from fewstep.training.distributed import (
        Replicated,
        full_optimizer_state,
        gathered,
        load_full_state_dict,
        local_numel,
        strategy_for,
    )

    module = torch.nn.Linear(3, 2)
    assert gathered(dict(module.named_parameters()), keep=False) == {}
    assert torch.equal(gathered(dict(module.named_parameters()))["weight"], module.weight)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = full_optimizer_state(optimizer)
    assert state["state"][0]["exp_avg"] is optimizer.state[module.weight]["exp_avg"]
    load_full_state_dict(module, {"weight": torch.zeros(2, 3), "unknown": torch.ones(1)})
    assert module.weight.abs().sum() == 0 and local_numel(module) == 8

    class OneProcess:
        num_processes = 1

    with caplog.at_level(logging.WARNING, logger="fewstep"):
        assert type(strategy_for(OneProcess(), "fsdp", "no")) is Replicated
    assert "nothing to shard" in caplog.text


def test_a_call_on_a_subset_of_rows_is_skipped_together_under_fsdp(monkeypatch):
    """call_rows: alone (or under DDP) the rows themselves, None for none. In lockstep (FSDP: every model call a
    collective) the call is skipped only if no process has a row; a process without rows runs one stand-in row."""
    import fewstep.training.distributed as dist
    from fewstep.objectives.base import call_rows

    rows, none = torch.tensor([False, True, True]), torch.zeros(3, dtype=torch.bool)
    assert call_rows(rows) is rows and call_rows(none) is None
    monkeypatch.setattr(dist, "lockstep", lambda: True)
    monkeypatch.setattr(dist, "any_process", lambda flag: True)  # another process has rows
    assert call_rows(rows) is rows and call_rows(none).tolist() == [True, False, False]
    monkeypatch.setattr(dist, "any_process", lambda flag: flag)  # none has
    assert call_rows(none) is None


@pytest.mark.slow
def test_twinflow_with_one_row_per_process_under_fsdp_does_not_deadlock_and_equals_ddp(tmp_path):
    """With one row per process the RCGM rollout and the enhanced target run on some processes and not on others
    (their rows depend on the drawn times). Under FSDP each of those calls all-gathers the weights, so before
    call_rows a process that skipped one waited in its backward while the other waited in the call (measured: a
    hang until the timeout). Now every process makes the call (a stand-in row where it has none), and the run
    equals DDP: measured 1.3e-7 apart in weights, 9.3e-8 in the EMA after 8 steps; asserted within 1e-6."""
    runs = {}
    for mode in ("fsdp", "ddp"):
        run = runs[mode] = tmp_path / mode
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fewstep",
            "data=digits", "data.batch_size=1", "model.width=64", "model.emb_dim=32", "trainer.max_steps=8",
            "trainer.lr_schedule=constant", *FAST, "trainer.final_nfe=[1]", "trainer.grid_size=4",
            f"trainer.distributed={mode}", f"hydra.run.dir={run}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = [runs[m] / "checkpoints" / "step_0000008" for m in ("fsdp", "ddp")]  # sharded (dcp/) and full formats
    assert json.loads((ckpts[0] / "state.json").read_text())["format"] == "dcp"
    for part in ("model", "teacher"):
        a, b = (ckpt_io.read_tensors(c, part) for c in ckpts)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, part
    # sharded, not a silent fallback to replicas (which would equal DDP as well): each process holds its half
    sharded, replicated = (json.loads((runs[m] / "summary.json").read_text()) for m in ("fsdp", "ddp"))
    assert (sharded["distributed"], sharded["num_processes"], replicated["distributed"]) == ("fsdp", 2, "ddp")
    whole, per_process = sharded["params"], sharded["params_per_process"]
    assert len(per_process) == 2 and sum(per_process) == whole == replicated["params"]
    assert all(0.45 * whole < n < 0.55 * whole for n in per_process), per_process
    assert per_process == [43_488, 43_456]  # of 86,944: rows that do not divide leave rank 0 the extra one
    assert replicated["params_per_process"] == [whole, whole]


@pytest.mark.slow
def test_meanflow_with_grad_accumulation_under_two_process_fsdp_equals_ddp(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 ... trainer.distributed=fsdp` on CPU (gloo): MeanFlow (its
    JVP runs through the sharded module) with grad_accum 2 (FSDP's gradient sync off for the first micro-batch) gives
    the same losses, weights, EMA and AdamW state as DDP. Measured: equal bit for bit on the tiny digits MLP (its
    three residual blocks are the shard units); asserted within 1e-6 (the AdamW moments relative to their size)."""
    from helpers.moments import assert_moments_close

    def launch(run, *extra):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fewstep",
            "objective=meanflow", "data=digits", "data.batch_size=16", "trainer.grad_accum=2", "model.width=64",
            "model.emb_dim=32", "trainer.max_steps=4", "trainer.lr_schedule=constant", *FAST, "trainer.log_every=1",
            "trainer.final_nfe=[1]", "trainer.grid_size=4", f"hydra.run.dir={run}", *extra,
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return run

    sharded = launch(tmp_path / "fsdp", "trainer.distributed=fsdp", "trainer.checkpoint_format=full")  # safetensors
    replicated = launch(tmp_path / "ddp")
    summary = json.loads((sharded / "summary.json").read_text())
    per_process = summary["params_per_process"]
    assert sum(per_process) == summary["params"] and max(per_process) < 0.51 * summary["params"]
    rows = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (sharded, replicated)]  # fmt: skip
    assert len(rows[0]) == 4 and max(abs(a - b) for a, b in zip(*rows)) < 1e-6
    ddp = json.loads((replicated / "summary.json").read_text())  # MeanFlow's JVP under 2-process DDP
    assert ddp["num_processes"] == 2 and ddp["steps"] == 4 and len(rows[1]) == 4
    ckpts = [run / "checkpoints" / "step_0000004" for run in (sharded, replicated)]
    for name in ("model.safetensors", "teacher.safetensors"):
        a, b = (load_file(str(c / name)) for c in ckpts)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    weights = load_file(str(ckpts[0] / "model.safetensors"))
    start = torch.load(ckpts[0] / "optim.pt", weights_only=True)["optimizer"]["state"]
    other = torch.load(ckpts[1] / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert start.keys() == other.keys() and len(start) == len(weights)
    assert_moments_close(start, other)  # relative to their size: median and largest gap (measured: equal)


WORKER_MODES = ("rank0", "every", "resume", "resume_bf16", "policy")


@pytest.fixture(scope="module")
def load_worker(tmp_path_factory):
    """tests/helpers/fsdp_load_worker.py in 2 gloo processes, every mode of WORKER_MODES in turn in the one launch (each
    in its own folder): the tiny Qwen-Image pipeline, the folder of each mode and what each rank saved there."""
    from helpers.tiny_families import save_tiny_pipeline

    root = tmp_path_factory.mktemp("fsdp_load")
    pretrained = save_tiny_pipeline("qwenimage", root / "pipe")
    worker = Path(__file__).resolve().parents[1] / "helpers" / "fsdp_load_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(pretrained), str(root), ",".join(WORKER_MODES)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {m: [torch.load(root / m / f"rank{r}.pt", weights_only=False) for r in (0, 1)] for m in WORKER_MODES}
    return pretrained, {m: root / m for m in WORKER_MODES}, ranks


@pytest.mark.slow
def test_under_fsdp_only_rank_0_reads_the_pretrained_weights_and_every_rank_gets_them_exactly(load_worker):
    """2 gloo processes (tests/helpers/fsdp_load_worker.py) build a tiny Qwen-Image TwinFlow model from a saved pipeline
    and shard it. Inside ``Sharded.building`` rank 1 reads no weight file (diffusers' ``safetensors.torch.load_file``
    is never called there; rank 0 calls it once) and its 82 parameters are on ``meta`` until sharding; after it, on
    every rank, the gathered weights (the zero-initialised time-pair embeddings included), the rotary tables and the
    forward output equal the single-process model's bit for bit, and a forward + AdamW step later the weights and
    output equal those of the run where every rank reads the weights (the former FSDP load), bit for bit."""
    from fewstep.models.qwenimage import QwenImageModel

    from helpers.fsdp_load_worker import inputs

    pretrained, _, runs = load_worker
    single = QwenImageModel(pretrained=str(pretrained), time_pair=True, data_shape=[4, 6, 4])
    x, t, tt, cond = inputs()
    with torch.no_grad():
        reference = single(x, t, tt, cond)
    state = single.state_dict()
    rotary = {k: v for k, v in vars(single.transformer.pos_embed).items() if torch.is_tensor(v)}
    assert sorted(rotary) == ["neg_freqs", "pos_freqs"]

    rank0, rank1 = runs["rank0"]
    assert len(rank0["reads"]) == 1 and rank1["reads"] == []  # only rank 0 reads the weights
    assert len(rank1["on_meta"]) == 82 and all(rank1["on_meta"]) and not any(rank0["on_meta"])
    assert all(len(r["reads"]) == 1 and not any(r["on_meta"]) for r in runs["every"])
    for got in (rank0, rank1):
        assert got["placed"].keys() == state.keys() and all(torch.equal(got["placed"][k], state[k]) for k in state)
        assert all(torch.equal(got["buffers"][k], rotary[k]) for k in rotary)
        assert torch.equal(got["before"], reference) and reference.abs().max().item() > 1e-2
    emb = "transformer.time_text_embed."
    assert state[emb + "sign_embedding.weight"].abs().max() == 0  # the zero-initialised extras, as on every rank
    for new, old in zip(runs["rank0"], runs["every"]):
        assert torch.equal(new["after"], old["after"])
        assert all(torch.equal(new["stepped"][k], old["stepped"][k]) for k in state)
    moved = max((rank0["stepped"][k] - state[k]).abs().max().item() for k in state)
    assert moved > 1e-3  # the step changed the weights (measured 1.0e-2 at lr 1e-2)


@pytest.mark.slow
def test_resuming_under_fsdp_each_rank_reads_only_its_slices_and_restores_exactly(load_worker):
    """2 gloo processes (tests/helpers/fsdp_load_worker.py ``resume``) checkpoint a sharded tiny Qwen-Image TwinFlow
    model, its EMA teacher and AdamW after one step, then load the checkpoint into freshly built sharded ones. Each
    rank reads from ``model.safetensors`` exactly the bytes of its own shards plus the (unsharded) buffers, and from
    ``teacher.safetensors`` exactly its shards (no file is read whole); ``optim.pt`` is memory-mapped; the gathered
    weights, EMA and AdamW moments after the load equal those saved, bit for bit."""
    _, folders, runs = load_worker
    ranks = runs["resume"]
    ckpt = folders["resume"] / "ckpt" / "step_0000001"
    size = {name: sum(v.numel() * v.element_size() for v in load_file(str(ckpt / name)).values())
            for name in ("model.safetensors", "teacher.safetensors")}  # fmt: skip
    params = sum(sum(r["local"].values()) for r in ranks)
    buffers = size["model.safetensors"] - params
    assert size["teacher.safetensors"] == params and buffers >= 0
    for got in ranks:
        own = sum(got["local"].values())
        assert got["read"] == {"model.safetensors": own + buffers, "teacher.safetensors": own}
        assert 0.3 * params < own < 0.7 * params  # about half each (uneven rows allowed)
        assert got["whole_reads"] == [] and got["optim_mmap"] == [True]
        for part in ("model", "ema", "moments"):
            saved, restored = got["saved"][part], got["restored"][part]
            assert saved.keys() == restored.keys() and saved
            assert all(torch.equal(saved[k], restored[k]) for k in saved), part


@pytest.mark.slow
def test_the_bf16_ema_low_bits_are_sharded_averaged_exactly_and_resumed_under_fsdp(load_worker):
    """``resume_bf16``: the tiny Qwen-Image model in bfloat16 under 2-process FSDP, three AdamW steps with an EMA of
    decay 0.9. The sharded EMA (bf16 shards + int16 low-bit shards) is the float32 average of the gathered weights
    bit for bit; each rank reads only its slices of ``teacher_shadow_low.safetensors``; the restored EMA and low
    bits equal the saved ones bit for bit."""
    from fewstep.teachers.base import joined

    ranks = load_worker[2]["resume_bf16"]
    saved = ranks[0]["saved"]
    assert saved["ema_low"].keys() == saved["ema"].keys() and saved["ema"]
    assert all(v.dtype == torch.bfloat16 for v in saved["ema"].values())
    master, d = {k: v.float() for k, v in ranks[0]["history"][0].items()}, 0.0
    for weights in ranks[0]["history"]:  # the EMATeacher warm-up from d = 0, in float32
        for k, v in master.items():
            v.lerp_(weights[k].float(), 1.0 - d)
        d = d + (1.0 - d) * (0.9 - d) / 2
    assert all(torch.equal(joined(saved["ema"][k], saved["ema_low"][k]), master[k]) for k in master)
    assert any(v.any() for v in saved["ema_low"].values())
    for got in ranks:
        own = sum(got["local"].values())
        assert got["read"]["teacher_shadow_low.safetensors"] == own  # int16 beside bf16: the same bytes
        assert got["whole_reads"] == []
        for part in ("ema", "ema_low"):
            assert all(torch.equal(got["saved"][part][k], got["restored"][part][k]) for k in got["saved"][part])


@pytest.mark.slow
def test_fsdp_shards_each_block_gathers_bf16_reduces_fp32_and_does_not_reduce_inside_no_sync(load_worker):
    """``policy`` (tests/helpers/fsdp_load_worker.py): the tiny Qwen-Image model under ``Sharded`` in 2 gloo processes.
    Its FSDP modules are the root and each QwenImageTransformerBlock (one shard unit per block, not one for the
    whole model); between forwards every parameter is an fp32 shard. With trainer.mixed_precision=bf16 the weights a
    forward gathers are bf16, in a block and at the root, and gradients are reduce-scattered in fp32 (in fp32
    without it). A backward inside ``Sharded.no_sync`` (an accumulation micro-batch) makes no reduce-scatter and
    leaves no sharded gradient; the next backward makes one per FSDP module (3) and its gradients are the sum of the
    two micro-batches' on one process (measured: 69 of the 76 tensors equal, the rest within 1.5e-7 of their
    largest element; asserted within 1e-5)."""
    from fewstep.models.qwenimage import QwenImageModel

    from helpers.fsdp_load_worker import inputs

    pretrained, _, runs = load_worker
    f32, b16 = (torch.float32,) * 3, (torch.bfloat16,) * 3
    for got in runs["policy"]:
        for precision, dtypes in (("no", f32), ("bf16", b16)):
            run = got[precision]
            assert run["fsdp_modules"] == ["", "transformer.transformer_blocks.0", "transformer.transformer_blocks.1"]
            assert run["shards"] and run["param_dtypes"] == {torch.float32}, precision
            assert run["inside"] == {"block": dtypes, "root": dtypes}, precision  # weight, input, output
            assert run["reduce_dtypes"] == run["grad_dtypes"] == {torch.float32}, precision
            assert run["reduces"] == [0, 3] and not any(run["grads_inside"]), precision
    single = QwenImageModel(pretrained=str(pretrained), time_pair=True, data_shape=[4, 6, 4])
    x, t, tt, cond = inputs()
    for rows in (slice(0, 2), slice(2, 4)):
        single(x[rows], t[rows], tt[rows], {k: v[rows] for k, v in cond.items()}).square().mean().backward()
    reference = {k: p.grad for k, p in single.named_parameters() if p.grad is not None}
    for got in runs["policy"]:
        grads = got["no"]["grads"]
        assert grads.keys() == reference.keys() and len(grads) == 76  # 82 tensors, 6 never get a gradient
        worst = max(((grads[k] - reference[k]).abs().max() / reference[k].abs().max()).item() for k in grads)
        assert worst < 1e-5, worst


def test_checkpoint_format_and_background_saves_are_checked_before_anything_is_built():
    from fewstep.config.checks import ConfigError
    from fewstep.config.validate import validate

    with pytest.raises(ConfigError, match=r"trainer.checkpoint_format='zip' must be auto, full or sharded"):
        validate(compose(["trainer.checkpoint_format=zip"]))
    with pytest.raises(ConfigError, match=r"checkpoint_format=sharded needs trainer.distributed=fsdp"):
        validate(compose(["trainer.checkpoint_format=sharded"]))
    with pytest.raises(ConfigError, match=r"async_checkpoint=true writes sharded checkpoints in the background"):
        validate(compose(["trainer.async_checkpoint=true"]))
    with pytest.raises(ConfigError, match=r"async_checkpoint=true"):
        validate(
            compose(["trainer.distributed=fsdp", "trainer.checkpoint_format=full", "trainer.async_checkpoint=true"])
        )
    validate(compose(["trainer.distributed=fsdp", "trainer.async_checkpoint=true"]))
