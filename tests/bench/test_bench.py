"""fewstep.bench: its tables and keys, the spread and averages it reports (hand-computed), and that
each variant's memory is measured with nothing else resident."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from fewstep.bench.command import DEFAULT_VARIANTS, DEFAULTS, USAGE, VARIANTS, main, summarize_timings, time_variants
from fewstep.bench.runner import (
    StepRunner,
    live_tensor_bytes,
    measure_variant_memory,
    time_runners,
    variant_memory_here,
)
from fewstep.cli import parse_kv as parse_args

TOY = ["model=tiny_toy", "data=toy2d", "data.batch_size=32"]
CPU = torch.device("cpu")


def _live_runners() -> int:
    return sum(type(obj) is StepRunner for obj in gc.get_objects())


@pytest.mark.slow  # subprocesses
def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    main([f"out={out}", "data=toy2d", "model=tiny_toy", "batch_size=32", "repeats=2", "warmup=1", "runs=2",
          "sample_batch=64"])  # fmt: skip
    result = json.loads((out / "bench.json").read_text())
    assert result["command"].startswith("python -m fewstep.bench out=") and result["runs"] == 2
    objs = result["objectives"]
    assert set(objs) == {"flow_matching", "rcgm", "twinflow", "twinflow_no_enhance"}
    for r in objs.values():
        assert r["step_time_s"] > 0 and r["timed_steps"] == 4
        # a step's growth over the resident model at batch 32 (measured 0.7-1.3 MB; the process's RSS is ~500 MB)
        assert 0.25 < r["peak_memory_mb"] < 8, r["peak_memory_mb"]
        assert len(r["ratio_run_medians"]) == 2
        assert r["ratio_range"][0] <= r["ratio_quartiles"][0] <= r["ratio_vs_flow_matching"] <= r["ratio_range"][1]
    assert objs["flow_matching"]["evals_per_step"] == 1.0
    assert objs["flow_matching"]["ratio_vs_flow_matching"] == 1.0
    assert objs["flow_matching"]["ratio_range"] == [1.0, 1.0]
    # twinflow runs more (no-grad) network evaluations than rcgm, which runs more than flow matching
    assert objs["twinflow"]["evals_per_step"] > objs["twinflow_no_enhance"]["evals_per_step"] > 1.0
    assert set(result["sampling"]) == {"nfe_1", "nfe_2", "nfe_4", "euler_50"}
    assert result["sampling"]["euler_50"]["speedup_vs_euler_50"] == 1.0
    md = (out / "bench.md").read_text()
    assert "| twinflow |" in md and "| nfe_1 | 1 |" in md and "ratio min–max" in md


@pytest.mark.slow
def test_isolated_variants_run_each_alone_and_collect_merges_them(tmp_path):
    out = tmp_path / "iso"
    result = main([
        f"out={out}", "data=toy2d", "model=tiny_toy", "batch_size=32", "repeats=2", "warmup=1", "isolate=true",
        "variants=[flow_matching,twinflow_no_enhance]",
    ])  # fmt: skip
    objs = result["objectives"]
    assert list(objs) == ["flow_matching", "twinflow_no_enhance"] and "sampling" not in result
    assert objs["flow_matching"]["ratio_vs_flow_matching"] == 1.0 == objs["flow_matching"]["memory_vs_flow_matching"]
    assert objs["flow_matching"]["evals_per_step"] == 1.0
    assert objs["twinflow_no_enhance"]["evals_per_step"] > 1.0
    for r in objs.values():  # a fresh process each: the whole process's peak, model and optimizer included
        assert r["peak_memory_mb"] > 50 and r["trainable_params"] == r["params"] > 0
    merged = json.loads(json.dumps(__import__("fewstep.bench.tables", fromlist=["collect"]).collect(
        tmp_path / "table", [out, tmp_path / "missing"]
    )))  # fmt: skip
    assert [(r["run"], r.get("objective")) for r in merged["rows"]] == [
        ("iso", "flow_matching"), ("iso", "twinflow_no_enhance"), ("missing", None)
    ]  # fmt: skip
    md = (tmp_path / "table.md").read_text()
    assert "| iso | twinflow_no_enhance |" in md and "| missing |  | failed: no bench.json" in md


@pytest.mark.slow
def test_an_out_of_memory_or_a_crash_is_a_result_not_an_exception(tmp_path, monkeypatch, capsys):
    import torch

    from fewstep.bench import command as bench
    from fewstep.bench import runner, tables

    class Exhausted:
        def __init__(self, *args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore")

    monkeypatch.setattr(runner, "StepRunner", Exhausted)
    runner._isolated_child("[]", "no", "cpu", "1", "1")
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["oom"] is True and row["error"] == "CUDA out of memory. Tried to allocate 80.00 GiB"
    assert "| out of memory |" in "\n".join(tables._table([{"objective": "dmd2", **row}]))
    crashed = bench.isolated_variant(
        ["data=toy2d", "model=tiny_toy", "objective=no_such_objective"],
        bench.parse_kv(["isolate=true"], bench.DEFAULTS, bench.USAGE), torch.device("cpu"),
    )  # fmt: skip
    assert crashed["error"].startswith("exit 1") and "no_such_objective" in crashed["error"]


def test_variants_are_checked_and_compare_compile_adds_compiled_copies():
    import pytest

    from fewstep.bench import command as bench
    from fewstep.errors import FewstepError

    args = bench.parse_kv(["variants=[flow_matching,twinflow]", "compare_compile=true"], bench.DEFAULTS, bench.USAGE)
    chosen = bench.select_variants(args)
    assert list(chosen) == ["flow_matching", "twinflow", "flow_matching_compiled", "twinflow_compiled"]
    assert chosen["twinflow_compiled"] == [*bench.VARIANTS["twinflow"], "trainer.compile=true"]
    for bad, message in ((["dmd3"], "dmd3 unknown"), (["twinflow"], "must include flow_matching")):
        args = bench.parse_kv([f"variants=[{','.join(bad)}]"], bench.DEFAULTS, bench.USAGE)
        with pytest.raises(FewstepError, match=message):
            bench.select_variants(args)


def test_summary_spread_and_means_hand_computed():
    # two runs; per-round ratios run 1: 2/1, 5/2, 8/4, 3/1 = 2, 2.5, 2, 3; run 2: 3/1, 3/2 = 3, 1.5
    runs = [
        {"flow_matching": {"times": [1.0, 2.0, 4.0, 1.0], "evals": [1.0] * 4, "params": 5},
         "twinflow": {"times": [2.0, 5.0, 8.0, 3.0], "evals": [3.0, 4.0, 3.0, 6.0], "params": 7}},
        {"flow_matching": {"times": [1.0, 2.0], "evals": [1.0] * 2, "params": 5},
         "twinflow": {"times": [3.0, 3.0], "evals": [2.0, 6.0], "params": 7}},
    ]  # fmt: skip
    tw = summarize_timings(runs)["twinflow"]
    assert tw["evals_per_step"] == pytest.approx(24 / 6)  # mean of every timed step, not the last (6.0)
    assert tw["step_time_s"] == 3.0  # median of 2, 5, 8, 3, 3, 3
    assert tw["ratio_run_medians"] == [2.25, 2.25]
    assert tw["ratio_vs_flow_matching"] == 2.25  # median of 1.5, 2, 2, 2.5, 3, 3
    assert tw["ratio_range"] == [1.5, 3.0]
    # quartiles (inclusive) of 1.5, 2, 2, 2.5, 3, 3: positions 1.25 and 3.75 from 0: 2 + 0, 2.5 + 0.75 x 0.5
    assert tw["ratio_quartiles"] == pytest.approx([2.0, 2.875])
    assert tw["timed_steps"] == 6 and tw["params"] == 7
    assert "ratio_vs_eager" not in tw


def test_compiled_over_eager_is_a_same_round_ratio(tmp_path):
    from fewstep.bench.tables import write_markdown

    fm = {"times": [1.0, 1.0, 1.0], "evals": [1.0] * 3, "params": 5}
    runs = [{
        "flow_matching": fm, "twinflow": {"times": [4.0, 2.0, 8.0], "evals": [3.0] * 3, "params": 5},
        "flow_matching_compiled": {**fm, "times": [0.5, 1.0, 1.0]},
        "twinflow_compiled": {"times": [1.0, 4.0, 2.0], "evals": [3.0] * 3, "params": 5},
    }]  # fmt: skip
    out = summarize_timings(runs)
    # per round 1/4, 4/2, 2/8 = 0.25, 2, 0.25: the median of the rounds, not 2/4 from the two medians
    assert out["twinflow_compiled"]["ratio_vs_eager"] == 0.25
    assert out["twinflow_compiled"]["ratio_vs_eager_run_medians"] == [0.25]
    assert out["flow_matching_compiled"]["ratio_vs_eager"] == 1.0
    assert "ratio_vs_eager" not in out["twinflow"]
    for r in out.values():
        r["peak_memory_mb"] = 1.0
    result = {"device": "cpu", "config": "c", "runs": 1, "repeats": 3, "warmup": 1, "objectives": out}
    write_markdown(result, tmp_path / "bench.md")
    assert "| twinflow | 4000.00 | 2000.00 | 0.25 | 0.25–1.12 | 0.25 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_evals_per_step_is_the_mean_over_the_timed_steps():
    runners = {
        "flow_matching": StepRunner([*TOY, *VARIANTS["flow_matching"]], CPU, "no"),
        "twinflow": StepRunner([*TOY, *VARIANTS["twinflow"]], CPU, "no"),
    }
    timed = time_runners(runners, warmup=2, repeats=6)
    counts = runners["twinflow"].evals  # every step the runner took, warm-up included
    assert len(counts) == 8 and timed["twinflow"]["evals"] == counts[2:]
    assert len(set(counts[2:])) > 1  # the count varies per step, so the last one is not the mean
    runs = [{name: {**timed[name], "params": 0} for name in timed}]
    summary = summarize_timings(runs)
    assert summary["twinflow"]["evals_per_step"] == pytest.approx(sum(counts[2:]) / 6)
    assert summary["flow_matching"]["evals_per_step"] == 1.0


@pytest.mark.slow
def test_trainer_torch_threads_in_the_overrides_sets_the_thread_count():
    """overrides=[trainer.torch_threads=1] times at one thread, as a training run with it does."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        StepRunner([*TOY, *VARIANTS["flow_matching"], "trainer.torch_threads=1"], CPU, "no")
        assert torch.get_num_threads() == 1
        from fewstep.bench import runner

        torch.set_num_threads(2)
        StepRunner([*TOY, *VARIANTS["flow_matching"]], CPU, "no")  # 0 (default): chosen once per process
        chosen = runner._AUTO_THREADS.count
        assert torch.get_num_threads() == chosen >= 1
        torch.set_num_threads(chosen + 1)
        StepRunner([*TOY, *VARIANTS["flow_matching"]], CPU, "no")  # every variant at the same count
        assert torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)


def test_timing_leaves_no_runner_alive():
    """Nothing built for the timing survives it (the loop variable of the old code kept the last runner,
    its model, AdamW state and EMA resident during the CUDA memory measurement)."""
    gc.collect()
    before = _live_runners()
    kept = StepRunner([*TOY, *VARIANTS["flow_matching"]], CPU, "no")
    assert _live_runners() == before + 1  # the count sees a live runner
    del kept
    args = parse_args([*[f"{k}={v}" for k, v in {"model": "tiny_toy", "data": "toy2d", "batch_size": 32}.items()],
                       "repeats=2", "warmup=1"], DEFAULTS, USAGE)  # fmt: skip
    timings = time_variants(args, CPU)
    assert _live_runners() == before  # freed on return, without a garbage collection
    assert set(timings) == set(DEFAULT_VARIANTS)  # the default set (dmd2, meanflow, scm are opt-in)
    json.dumps(timings)  # plain numbers only: no tensor or module is referenced from the result


@pytest.mark.slow  # subprocesses
def test_memory_is_measured_with_nothing_else_resident():
    """measure_variant_memory runs the variant in a fresh process: a model and 64 MiB held here are not
    resident there. Measured in this process, they would be, and variant_memory_here refuses. What it measures is
    the step's own memory, which grows with the batch: a TwinFlow step of tiny_toy takes ~19 KB a row (measured
    19.6 MB at batch 1024, 77.6 MB at 4096, ~1 MB at 32), not the ~500 MB the process holds."""
    held = (StepRunner([*TOY, *VARIANTS["twinflow"]], CPU, "no"), torch.ones(16, 2**20))
    assert live_tensor_bytes() >= 64 * 2**20
    rows_1024 = ["model=tiny_toy", "data=toy2d", "data.batch_size=1024"]
    result = measure_variant_memory([*rows_1024, *VARIANTS["twinflow"]], "no", CPU)
    assert result["resident_before_mb"] < 1.0
    assert 12 < result["peak_memory_mb"] < 30, result
    with pytest.raises(RuntimeError, match="resident"):
        variant_memory_here([*TOY, *VARIANTS["twinflow"]], "no", CPU)
    del held


def test_the_step_runner_steps_the_networks_an_objective_owns_on_its_schedule():
    import torch

    from fewstep.bench.runner import StepRunner

    runner = StepRunner(
        ["data=toy2d", "model=tiny_toy", "data.batch_size=16", "objective=dmd2"], torch.device("cpu"), "no"
    )
    fake = runner.objective.network("fake_score")
    student0 = [p.detach().clone() for p in runner.trainables["student"].params]
    fake0 = [p.detach().clone() for p in runner.trainables["fake_score"].params]
    for _ in range(runner.objective.critic_steps):  # critic steps: the fake score moves, the student does not
        runner.step()
    assert all(torch.equal(a, b) for a, b in zip(student0, runner.trainables["student"].params))
    assert any(not torch.equal(a, b) for a, b in zip(fake0, fake.parameters()))
    fake1 = [p.detach().clone() for p in fake.parameters()]
    runner.step()  # the generator step
    assert any(not torch.equal(a, b) for a, b in zip(student0, runner.trainables["student"].params))
    assert all(torch.equal(a, b) for a, b in zip(fake1, fake.parameters()))


def test_a_setting_to_fix_stops_the_bench_in_one_line_before_any_variant_runs(tmp_path, monkeypatch):
    """A misspelt architecture ran every variant, each "failed: ArchitectureError(...)" in the table, exit 0."""
    import fewstep.bench.command as bench
    from fewstep.config.validate import ConfigError

    monkeypatch.setattr(bench, "bench_objectives", lambda *a: pytest.fail("a variant ran"))
    overrides = "overrides=[model.random_init=true,model.architecture=sd35_mediun]"
    argv = [f"out={tmp_path}", "estimate_memory=true", "model=sd35_lora", "data=synthetic", overrides]
    with pytest.raises(ConfigError, match=r"did you mean sd35_medium"):
        bench.main(argv)
