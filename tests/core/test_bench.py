"""fewstep.bench writes its tables with the keys the issues ask for (numbers, not timings)."""

from __future__ import annotations

import json

from fewstep.bench import main


def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    main([f"out={out}", "data=toy2d", "model=tiny_toy", "batch_size=32", "repeats=2", "warmup=1", "sample_batch=64"])
    result = json.loads((out / "bench.json").read_text())
    objs = result["objectives"]
    assert set(objs) == {"flow_matching", "rcgm", "twinflow", "twinflow_no_enhance"}
    for r in objs.values():
        assert r["step_time_s"] > 0 and r["peak_memory_mb"] >= 0
    assert objs["flow_matching"]["evals_per_step"] == 1.0
    assert objs["flow_matching"]["ratio_vs_flow_matching"] == 1.0
    # twinflow runs more (no-grad) network evaluations than rcgm, which runs more than flow matching
    assert objs["twinflow"]["evals_per_step"] > objs["twinflow_no_enhance"]["evals_per_step"] > 1.0
    assert set(result["sampling"]) == {"nfe_1", "nfe_2", "nfe_4", "euler_50"}
    assert result["sampling"]["euler_50"]["speedup_vs_euler_50"] == 1.0
    md = (out / "bench.md").read_text()
    assert "| twinflow |" in md and "| nfe_1 | 1 |" in md


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
    merged = json.loads(json.dumps(__import__("fewstep.bench", fromlist=["collect"]).collect(
        tmp_path / "table", [out, tmp_path / "missing"]
    )))  # fmt: skip
    assert [(r["run"], r.get("objective")) for r in merged["rows"]] == [
        ("iso", "flow_matching"), ("iso", "twinflow_no_enhance"), ("missing", None)
    ]  # fmt: skip
    md = (tmp_path / "table.md").read_text()
    assert "| iso | twinflow_no_enhance |" in md and "| missing |  | failed: no bench.json" in md


def test_an_out_of_memory_or_a_crash_is_a_result_not_an_exception(tmp_path, monkeypatch, capsys):
    import torch

    from fewstep import bench

    class Exhausted:
        def __init__(self, *args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore")

    monkeypatch.setattr(bench, "StepRunner", Exhausted)
    bench._isolated_child("[]", "no", "cpu", "1", "1")
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["oom"] is True and row["error"] == "CUDA out of memory. Tried to allocate 80.00 GiB"
    assert "| out of memory |" in "\n".join(bench._isolated_table([{"objective": "dmd2", **row}]))
    crashed = bench.isolated_variant(
        ["data=toy2d", "model=tiny_toy", "objective=no_such_objective"],
        bench.parse_args(["isolate=true"], bench.DEFAULTS, bench.USAGE), torch.device("cpu"),
    )  # fmt: skip
    assert crashed["error"].startswith("exit 1") and "no_such_objective" in crashed["error"]


def test_variants_are_checked_and_compare_compile_adds_compiled_copies():
    import pytest

    from fewstep import bench
    from fewstep.errors import FewstepError

    args = bench.parse_args(["variants=[flow_matching,twinflow]", "compare_compile=true"], bench.DEFAULTS, bench.USAGE)
    chosen = bench.select_variants(args)
    assert list(chosen) == ["flow_matching", "twinflow", "flow_matching_compiled", "twinflow_compiled"]
    assert chosen["twinflow_compiled"] == [*bench.VARIANTS["twinflow"], "trainer.compile=true"]
    for bad, message in ((["dmd3"], "dmd3 unknown"), (["twinflow"], "must include flow_matching")):
        args = bench.parse_args([f"variants=[{','.join(bad)}]"], bench.DEFAULTS, bench.USAGE)
        with pytest.raises(FewstepError, match=message):
            bench.select_variants(args)
