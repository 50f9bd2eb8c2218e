"""Throughput in every metrics row: samples/s, the step's FLOPs and TFLOP/s, MFU, data waits, checkpoint saves."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.training.loop import train
from fewstep.training.throughput import device_peak_tflops

from helpers import FAST, compose, faults

FLOW = ["data=toy2d", "model=tiny_toy", "data.batch_size=32", "objective=flow_matching", *FAST]


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rows_give_samples_per_s_tflops_mfu_and_the_counted_step_matches_the_estimate(tmp_path):
    from fewstep.bench.estimate import estimate_step_memory

    over = [*FLOW, "trainer.max_steps=4", "trainer.log_every=2", "trainer.peak_tflops=0.002", "trainer.grad_accum=2"]
    summary = train(compose(over), run_dir=tmp_path / "run")
    first, second = rows(tmp_path / "run")
    for row in (first, second):
        assert row["samples_per_s"] == pytest.approx(row["steps_per_s"] * 32 * 2, rel=1e-9)  # global batch: 64
        assert row["tflops_per_s"] == pytest.approx(row["tflop_per_step"] * row["steps_per_s"], rel=1e-9)
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 0.002, rel=1e-9)
    # the same step counted another way: the bench's accounting of a real step (two micro-batches of 32 here, one
    # batch of 64 there: the same matmul FLOPs)
    bench = estimate_step_memory([*FLOW, "data.batch_size=64"], "no", steps=1, fake=False)
    assert first["tflop_per_step"] == pytest.approx(bench["step_tflops"][0], rel=1e-9)
    assert first["tflop_per_step"] > 0
    assert summary["checkpoint_s_total"] > 0  # the final save


def test_data_waits_and_checkpoint_saves_are_timed(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.DATA_SLEEP_ENV, "0.05")
    over = ["data=toy2d", "data._target_=helpers.faults.SlowToy2D", "model=tiny_toy", "data.batch_size=8", *FAST,
            "trainer.max_steps=4", "trainer.log_every=2", "trainer.checkpoint_every=2"]  # fmt: skip
    summary = train(compose(over), run_dir=tmp_path / "run")
    first, second = rows(tmp_path / "run")
    assert 0.05 <= first["time/data_wait_s"] < 0.5 and 0.05 <= second["time/data_wait_s"] < 0.5
    assert first["time/checkpoint_s"] == 0.0  # the step-2 save comes after its row; the next row has it
    assert second["time/checkpoint_s"] > 0
    assert summary["checkpoint_s_total"] > second["time/checkpoint_s"]  # and the final save
    assert "mfu" not in first  # a CPU has no known peak


def test_the_peak_is_given_or_known_by_the_gpus_name(monkeypatch):
    assert device_peak_tflops(torch.device("cpu"), None) is None
    assert device_peak_tflops(torch.device("cpu"), 123.0) == 123.0
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA H200": 989.0,
             "NVIDIA L40S": 362.0, "NVIDIA GeForce RTX 4090": None}  # fmt: skip
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert device_peak_tflops(torch.device("cuda"), None) == peak, name


def test_compile_runs_are_not_counted():
    from fewstep.training.throughput import Throughput

    counted = Throughput(8, None, count_flops=True)
    with counted.counting_step():
        torch.ones(4, 3) @ torch.ones(3, 5)
    assert counted.step_tflop == 2 * 4 * 3 * 5 / 1e12
    skipped = Throughput(8, None, count_flops=False)
    with skipped.counting_step():
        torch.ones(4, 3) @ torch.ones(3, 5)
    assert skipped.step_tflop is None and "tflops_per_s" not in skipped.row(1, 1.0)
