"""Estimated against measured peak memory, row by row: a markdown table on stdout.

    python scripts/estimate_vs_measured.py docs/gpu/realsize.json docs/raw/estimate_realsize/*/

MEASURED: a merged real-size table (``fewstep.bench.collect``'s JSON, e.g. from the device script);
ESTIMATES: ``fewstep.bench ... estimate_memory=true`` output folders. Rows are matched on the bench
config (model, data, batch, precision) and the objective; rows without a partner are left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(measured: Path, estimate_dirs: list[Path]) -> list[dict]:
    estimates = {}
    for folder in estimate_dirs:
        result = json.loads((folder / "bench.json").read_text())
        for objective, r in result["objectives"].items():
            if "peak_memory_mb" in r:
                estimates[(result["config"], objective)] = r
    merged = json.loads(measured.read_text())
    out = []
    for r in merged["rows"]:
        est = estimates.get((r.get("config"), r.get("objective")))
        if est is None or "peak_memory_mb" not in r or r.get("oom"):
            continue
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
    for r in table:
        print(f"| {r['config']} | {r['objective']} | {r['measured_gib']:.2f} | {r['estimated_gib']:.2f} | "
              f"{r['ratio']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
