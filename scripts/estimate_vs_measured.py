"""Estimated against measured peak memory and step time, row by row: markdown tables on stdout.

    python scripts/estimate_vs_measured.py [--time] docs/gpu/realsize.json docs/raw/estimate_realsize/*/

MEASURED: a merged real-size table (``fewstep.bench.tables.collect``'s JSON, e.g. from the device script);
ESTIMATES: ``fewstep.bench ... estimate_memory=true`` output folders. Rows are matched on the bench
config (model, data, batch, precision), the objective and the overrides (architecture, resolution, depth);
a measured row without overrides (a table collected before they were recorded) takes the one estimate of
its config and objective. Rows without a partner are left out of the first table.

The second table predicts step times from FLOPs: every estimate row's TFLOP / step divided by the
throughput its model's measured flow-matching step achieved (estimated TFLOP / measured seconds, at the
measured batch); where the row was measured too, its measured time stands beside the prediction.
``--time``: that table alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _model(config: str) -> str:
    return next((w for w in config.split() if w.startswith("model=")), config)


def _estimates(estimate_dirs: list[Path]) -> list[dict]:
    out = []
    for folder in estimate_dirs:
        result = json.loads((folder / "bench.json").read_text())
        for objective, r in result["objectives"].items():
            if "peak_memory_mb" in r:
                out.append({"config": result["config"], "objective": objective,
                            "overrides": sorted(result.get("overrides", [])), **r})  # fmt: skip
    return out


def _pairs(measured: Path, estimate_dirs: list[Path]) -> list[tuple[dict, dict]]:
    """(measured row, its one estimate) for every measured row that ran and has exactly one partner."""
    estimates = _estimates(estimate_dirs)
    out = []
    for r in json.loads(measured.read_text())["rows"]:
        candidates = [e for e in estimates if (e["config"], e["objective"]) == (r.get("config"), r.get("objective"))]
        if "overrides" in r:
            candidates = [e for e in candidates if e["overrides"] == sorted(r["overrides"])]
        if len(candidates) == 1 and "peak_memory_mb" in r and not r.get("oom"):
            out.append((r, candidates[0]))
    return out


def rows(measured: Path, estimate_dirs: list[Path]) -> list[dict]:
    out = []
    for r, est in _pairs(measured, estimate_dirs):
        row = {
            "config": r["config"], "objective": r["objective"], "measured_gib": r["peak_memory_mb"] / 1024,
            "estimated_gib": est["peak_memory_mb"] / 1024, "ratio": est["peak_memory_mb"] / r["peak_memory_mb"],
        }  # fmt: skip
        if est.get("tflops_per_step") and r.get("step_time_s"):
            row.update(tflops=est["tflops_per_step"], step_time_s=r["step_time_s"],
                       achieved_tflops_s=est["tflops_per_step"] / r["step_time_s"])  # fmt: skip
        out.append(row)
    return out


def predictions(measured: Path, estimate_dirs: list[Path]) -> list[dict]:
    """Each estimate row with FLOPs: its predicted step time at its model's measured flow-matching throughput."""
    compared = rows(measured, estimate_dirs)
    throughput = {_model(r["config"]): r["achieved_tflops_s"] for r in compared
                  if r["objective"] == "flow_matching" and "achieved_tflops_s" in r}  # fmt: skip
    times = {(r["config"], r["objective"]): r["step_time_s"] for r in compared if "step_time_s" in r}
    out = []
    for e in _estimates(estimate_dirs):
        rate = throughput.get(_model(e["config"]))
        if not e.get("tflops_per_step") or rate is None:
            continue
        out.append({
            "config": e["config"], "objective": e["objective"], "tflops": e["tflops_per_step"],
            "flops_ratio": e.get("flops_vs_flow_matching", float("nan")), "rate": rate,
            "predicted_s": e["tflops_per_step"] / rate, "measured_s": times.get((e["config"], e["objective"])),
        })  # fmt: skip
    return out


def main(argv: list[str]) -> None:
    time_only = "--time" in argv
    argv = [a for a in argv if a != "--time"]
    if len(argv) < 2:
        sys.exit(__doc__)
    measured, dirs = Path(argv[0]), [Path(a) for a in argv[1:]]
    device = json.loads(measured.read_text()).get("device", "?")
    if not time_only:
        _memory_table(rows(measured, dirs), device)
    _time_table(predictions(measured, dirs), device, time_only)


def _memory_table(table: list[dict], device: str) -> None:
    print(f"| config | objective | measured peak ({device}, GiB) | estimated peak (GiB) | estimated / measured |")
    print("|---|---|---|---|---|")
    if not table:
        print("(no measured row has an estimate with the same config, objective and overrides)")
    for r in table:
        print(f"| {r['config']} | {r['objective']} | {r['measured_gib']:.2f} | {r['estimated_gib']:.2f} | "
              f"{r['ratio']:.3f} |")  # fmt: skip


def _time_table(predicted: list[dict], device: str, alone: bool) -> None:
    if not predicted:
        if alone:
            print("(no estimate with FLOPs has a measured flow-matching step of its model)")
        return
    if not alone:
        print()
    print(
        f"| config | objective | TFLOP / step | × flow matching | {device}: flow matching's TFLOP/s | "
        "predicted step (s) | measured step (s) | predicted / measured |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in predicted:
        m = p["measured_s"]
        cells = [f"{m:.3f}", f"{p['predicted_s'] / m:.3f}"] if m else ["", ""]
        print(f"| {p['config']} | {p['objective']} | {p['tflops']:.1f} | {p['flops_ratio']:.2f} | {p['rate']:.0f} | "
              f"{p['predicted_s']:.3f} | " + " | ".join(cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
