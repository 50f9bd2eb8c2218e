"""trainer.distributed (fewstep.distributed): what FSDP refuses in one line, the strategy helpers on unsharded
tensors (what every DDP and single-process run goes through), and (slow) a JVP objective with gradient
accumulation under 2-process FSDP on CPU equal to DDP. The full Qwen-Image FSDP run is in tests/test_families.py."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fewstep.validate import ConfigError, validate

from helpers import FAST, compose


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.distributed=zero"], "must be ddp or fsdp"),
        (["model=sd35_lora"], "LoRA trains a few adapter weights"),
        (["objective=dmd2"], "its own networks (fake score, frozen real score) are not sharded"),
        (["trainer.mixed_precision=fp16"], "use bf16"),
        (["trainer.compile=true"], "untested"),
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
    from fewstep.distributed import (
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


@pytest.mark.slow
def test_meanflow_with_grad_accumulation_under_two_process_fsdp_equals_ddp(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 ... trainer.distributed=fsdp` on CPU (gloo): MeanFlow (its
    JVP runs through the sharded module) with grad_accum 2 (FSDP's gradient sync off for the first micro-batch) gives
    the same losses, weights, EMA and AdamW state as DDP. Measured: equal bit for bit on the tiny digits MLP (its
    three residual blocks are the shard units); asserted within 1e-6."""

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

    sharded = launch(tmp_path / "fsdp", "trainer.distributed=fsdp")
    replicated = launch(tmp_path / "ddp")
    summary = json.loads((sharded / "summary.json").read_text())
    per_process = summary["params_per_process"]
    assert sum(per_process) == summary["params"] and max(per_process) < 0.51 * summary["params"]
    rows = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (sharded, replicated)]  # fmt: skip
    assert len(rows[0]) == 4 and max(abs(a - b) for a, b in zip(*rows)) < 1e-6
    ckpts = [run / "checkpoints" / "step_0000004" for run in (sharded, replicated)]
    for name in ("model.safetensors", "teacher.safetensors"):
        a, b = (load_file(str(c / name)) for c in ckpts)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    weights = load_file(str(ckpts[0] / "model.safetensors"))
    start = torch.load(ckpts[0] / "optim.pt", weights_only=True)["optimizer"]["state"]
    other = torch.load(ckpts[1] / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert start.keys() == other.keys() and len(start) == len(weights)
    assert max((start[i]["exp_avg_sq"] - other[i]["exp_avg_sq"]).abs().max().item() for i in start) < 1e-6
