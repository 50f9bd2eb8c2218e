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
