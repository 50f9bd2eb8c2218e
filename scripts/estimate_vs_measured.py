"""Estimated against measured peak memory, row by row: a markdown table on stdout.

    python scripts/estimate_vs_measured.py docs/gpu/realsize.json docs/raw/estimate_realsize/*/

MEASURED: a merged real-size table (``fewstep.bench.collect``'s JSON, e.g. from the device script);
ESTIMATES: ``fewstep.bench ... estimate_memory=true`` output folders. Rows are matched on the bench
config (model, data, batch, precision), the objective and the overrides (architecture, resolution, depth);
a measured row without overrides (a table collected before they were recorded) takes the one estimate of
its config and objective. Rows without a partner are left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(measured: Path, estimate_dirs: list[Path]) -> list[dict]:
    estimates: dict[tuple, list[tuple[list, dict]]] = {}
    for folder in estimate_dirs:
        result = json.loads((folder / "bench.json").read_text())
        for objective, r in result["objectives"].items():
            if "peak_memory_mb" in r:
                estimates.setdefault((result["config"], objective), []).append((sorted(result.get("overrides", [])), r))
    merged = json.loads(measured.read_text())
    out = []
    for r in merged["rows"]:
        candidates = estimates.get((r.get("config"), r.get("objective")), [])
        if "overrides" in r:
            candidates = [c for c in candidates if c[0] == sorted(r["overrides"])]
        if len(candidates) != 1 or "peak_memory_mb" not in r or r.get("oom"):
            continue
        est = candidates[0][1]
        out.append({
            "config": r["config"], "objective": r["objective"], "measured_gib": r["peak_memory_mb"] / 1024,
            "estimated_gib": est["peak_memory_mb"] / 1024, "ratio": est["peak_memory_mb"] / r["peak_memory_mb"],
        })  # fmt: skip
    return out


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    table = rows(Path(argv[0]), [Path(a) for a in argv[1:]])
    device = json.loads(Path(argv[0]).read_text()).get("device", "?")
    print(f"| config | objective | measured peak ({device}, GiB) | estimated peak (GiB) | estimated / measured |")
    print("|---|---|---|---|---|")
    if not table:
        print("(no measured row has an estimate with the same config, objective and overrides)")
    for r in table:
        print(f"| {r['config']} | {r['objective']} | {r['measured_gib']:.2f} | {r['estimated_gib']:.2f} | "
              f"{r['ratio']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
