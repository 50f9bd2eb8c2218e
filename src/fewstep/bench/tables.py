"""The bench's Markdown tables: ``bench.md`` of one run (:func:`write_markdown`) and the per-variant tables of
isolated or estimated runs, merged across runs by :func:`collect`."""

from __future__ import annotations

import json
from pathlib import Path


def collect(out: str | Path, dirs: list[str | Path]) -> dict:
    """Merge the ``bench.json`` of several isolated runs (one model each) into ``out.json`` / ``out.md``:
    one table, a row per (model, objective)."""
    rows, devices = [], []
    for folder in dirs:
        path = Path(folder) / "bench.json"
        if not path.exists():
            rows.append({"run": Path(folder).name, "error": "no bench.json (the stage failed)"})
            continue
        result = json.loads(path.read_text())
        for name, r in result["objectives"].items():
            rows.append({"run": Path(folder).name, "config": result["config"], "overrides": result.get("overrides", []),
                         "objective": name, **r})  # fmt: skip
        devices.append(result["device"])
    merged = {"device": ", ".join(sorted(set(devices))) or "?", "rows": rows}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(merged, indent=2))
    lines = [f"# Real-size training step ({merged['device']})", "", *_table(rows, with_run=True)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return merged


def _nan(r: dict, key: str) -> float:
    return r.get(key, float("nan"))


# (header, cell) of the per-variant tables: measured (isolate=true) and estimated (estimate_memory=true)
MEASURED_COLUMNS = [
    ("step time (s)", lambda r: f"{r['step_time_s']:.3f}"),
    ("mean step (s)", lambda r: f"{_nan(r, 'step_time_mean_s'):.3f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'ratio_vs_flow_matching'):.2f}"),
    ("peak memory (GB)", lambda r: f"{r['peak_memory_mb'] / 1024:.1f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'memory_vs_flow_matching'):.2f}"),
    ("evals / step", lambda r: f"{r['evals_per_step']:.2f}"),
    ("trainable", lambda r: f"{r['trainable_params'] / 1e6:.0f} M"),
]


ESTIMATED_COLUMNS = [
    ("estimated peak memory (GB)", lambda r: f"{r['peak_memory_mb'] / 1024:.2f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'memory_vs_flow_matching'):.3f}"),
    ("resident after the steps (GB)", lambda r: f"{r['resident_mb'] / 1024:.2f}"),
    ("TFLOP / step", lambda r: f"{_nan(r, 'tflops_per_step'):.2f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'flops_vs_flow_matching'):.2f}"),
    ("evals / step", lambda r: f"{r['evals_per_step']:.2f}"),
    ("trainable", lambda r: f"{r['trainable_params'] / 1e6:.0f} M"),
]


ESTIMATE_NOTE = (
    "Estimated with `estimate_memory=true` (fewstep.bench.estimate): the step runs on fake tensors, nothing is "
    "allocated; peak = the largest total of live tensor storages (each rounded to 512 bytes) during any step. "
    "Leaves out GPU kernel workspaces and allocator fragmentation. TFLOP / step: the matmuls, convolutions and "
    "attention of one optimizer step (forward, backward, checkpointing's recompute), the mean over the steps."
)


def _table(rows: list[dict], with_run: bool = False) -> list[str]:
    """One row per variant: the measured columns, or the estimated ones when every row that ran is an estimate.
    An out-of-memory or a failure is a row too."""
    ran = [r for r in rows if "error" not in r]
    estimated = bool(ran) and all(r.get("estimated") for r in ran)
    columns = ESTIMATED_COLUMNS if estimated else MEASURED_COLUMNS
    head = "| run | objective |" if with_run else "| objective |"
    lines = [head + "".join(f" {h} |" for h, _ in columns), "|---" * (head.count("|") - 1 + len(columns)) + "|"]
    for r in rows:
        cells = [r["run"]] if with_run else []
        cells.append(r.get("objective", ""))
        if r.get("oom"):
            mem = f"OOM ({r['peak_memory_mb'] / 1024:.1f} at failure)" if "peak_memory_mb" in r else "OOM"
            cells += ["out of memory", "", "", mem, "", "", ""]
        elif "error" in r:
            cells += [f"failed: {r['error']}"] + [""] * (len(columns) - 1)
        else:
            cells += [cell(r) for _, cell in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", ESTIMATE_NOTE] if estimated else lines


def _spread_cells(quartiles: list[float], run_medians: list[float]) -> tuple[str, str]:
    """``q1–q3`` and ``m1 / m2 / ...`` of a ratio's spread, for the Markdown tables."""
    return f"{quartiles[0]:.2f}–{quartiles[1]:.2f}", " / ".join(f"{x:.2f}" for x in run_medians)


def _compile_table(objectives: dict[str, dict]) -> list[str]:
    """compare_compile: each ``<name>_compiled`` against its eager ``<name>`` (same-round ratios); none: []."""
    compiled = {n.removesuffix("_compiled"): r for n, r in objectives.items() if "ratio_vs_eager" in r}
    if not compiled:
        return []
    lines = [
        "",
        "## trainer.compile: compiled / eager",
        "",
        "| objective | eager step (ms) | compiled step (ms) | compiled / eager | IQR | per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in compiled.items():
        iqr, per_run = _spread_cells(r["ratio_vs_eager_quartiles"], r["ratio_vs_eager_run_medians"])
        lines.append(
            f"| {name} | {objectives[name]['step_time_s'] * 1000:.2f} | {r['step_time_s'] * 1000:.2f} | "
            f"{r['ratio_vs_eager']:.2f} | {iqr} | {per_run} |"
        )
    lines += [
        "",
        "compiled / eager: median of the per-round ratios (the compiled step over the eager step of the same "
        "round), their quartiles and each run's median.",
    ]
    return lines


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# fewstep benchmark ({result['device']}, {result['config']})", ""]
    lines += [
        "## Training step",
        "",
        "| objective | step time (ms) | × flow matching | ratio IQR | ratio min–max | ratio per run "
        "| network evals / step | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if result.get("isolated") or result.get("estimated"):
        lines[-2:] = _table([{"objective": k, **r} for k, r in result["objectives"].items()])
    else:
        for name, r in result["objectives"].items():
            iqr, per_run = _spread_cells(r["ratio_quartiles"], r["ratio_run_medians"])
            lo, hi = r["ratio_range"]
            lines.append(
                f"| {name} | {r['step_time_s'] * 1000:.2f} | {r['ratio_vs_flow_matching']:.2f} | {iqr} | "
                f"{lo:.2f}–{hi:.2f} | {per_run} | {r['evals_per_step']:.2f} | {r['peak_memory_mb']:.1f} |"
            )
        lines += [
            "",
            f"Step time: median of {next(iter(result['objectives'].values()))['timed_steps']} timed steps "
            f"({result['runs']} runs × {result['repeats']} interleaved rounds after {result['warmup']} warm-up rounds "
            "each). "
            "× flow matching: median of the per-round ratios (a step over the flow-matching step of the same round), "
            "their quartiles, range and each run's median. Network evals: mean over the timed steps. Peak memory: "
            "each variant alone in a fresh process.",
            *_compile_table(result["objectives"]),
        ]
    if "sampling" in result:
        lines += [
            "",
            "## Sampling",
            "",
            "| sampler | steps | latency / image (ms, batch 1) | images/s (batch "
            f"{result['sample_batch']}) | × Euler 50 |",
            "|---|---|---|---|---|",
        ]
        for name, r in result["sampling"].items():
            lines.append(
                f"| {name} | {r['steps']} | {r['latency_ms_per_image']:.2f} | {r['images_per_s']:.0f} | "
                f"{r['speedup_vs_euler_50']:.1f} |"
            )
    if result.get("quality"):
        lines += ["", f"## Quality at equal wall-clock budget ({result['quality_budget_s']} s of training)", ""]
        lines += ["| objective | steps | sampler | " + " | ".join(result["quality_metrics"]) + " |"]
        lines += ["|---|---|---|" + "---|" * len(result["quality_metrics"])]
        for name, r in result["quality"].items():
            for method, metrics in r["eval"].items():
                vals = " | ".join(f"{metrics.get(k, float('nan')):.3g}" for k in result["quality_metrics"])
                lines.append(f"| {name} | {r['steps']} | {method} | {vals} |")
    path.write_text("\n".join(lines) + "\n")
