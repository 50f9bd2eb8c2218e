"""The default run's speed at the old thread default (torch's: one thread per core) beside the new one
(``trainer.torch_threads=0``: chosen at start, fewstep/training/threads.py), on the machine as it is and beside one busy
process, interleaved.

    .venv/bin/python scripts/bench_threads.py [--rounds 3] [--seconds 8] [--out docs/raw/bench_threads.txt]

Each measurement is one ``python -m fewstep`` of the default config (the ``make run`` model, data and objective),
trained for ``--seconds`` of wall time (``trainer.time_limit_s``) without the final evaluation; its steps/s is
the summary's (training only, the thread probe excluded) and "wall" the whole command (start-up and the probe
included). Each round runs every (condition, variant) pair once, the variants' order alternating between rounds;
"one busy child" is one ``python -c "while True: pass"`` child started before the run and killed after it, "no
busy child" the machine as it is (its 1-minute load average before each run is printed: quiet only if it is
well under 1). The table prints medians over rounds, the per-round values, and the thread count the run logged.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run_once(overrides: list[str], seconds: float, workdir: Path) -> dict:
    run_dir = workdir / f"run_{time.monotonic_ns()}"
    cmd = [
        sys.executable, "-m", "fewstep", f"hydra.run.dir={run_dir}", "trainer.max_steps=1000000",
        f"trainer.time_limit_s={seconds}", "trainer.evaluate=false", "trainer.baseline_steps=0",
        "trainer.sample_every=1000000", "trainer.checkpoint_every=1000000", "logger.progress=false", *overrides,
    ]  # fmt: skip
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    found = re.search(r"\| (\d+) torch threads? \(([^)]*)\)", proc.stderr + proc.stdout)
    return {
        "steps_per_s": summary["steps_per_s"],
        "wall_s": wall,
        "threads": int(found.group(1)) if found else None,
        "why": found.group(2) if found else "",
        "load1": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    args = parser.parse_args()

    default = torch.get_num_threads()  # what trainer.torch_threads=0 meant before: torch's default
    variants = {f"before (torch default, {default})": [f"trainer.torch_threads={default}"], "after (auto)": []}
    conditions = ["no busy child", "one busy child"]
    results = {(c, v): [] for c in conditions for v in variants}
    lines = [
        f"# scripts/bench_threads.py --rounds {args.rounds} --seconds {args.seconds}",
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"torch default threads {default}",
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
            for cond in conditions:
                for name in order:
                    busy = None
                    if cond != "no busy child":
                        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        time.sleep(0.5)
                    try:
                        r = run_once(variants[name], args.seconds, Path(tmp))
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
                    results[(cond, name)].append(r)
                    say(
                        f"round {rnd} | {cond:14} | {name:26} | {r['steps_per_s']:6.1f} steps/s | wall "
                        f"{r['wall_s']:5.1f} s | threads {r['threads']} ({r['why']}) | load1 {r['load1']:.2f}"
                    )

    say("")
    say("| condition | variant | steps/s (median) | per round | threads chosen | wall s (median) | load1 |")
    say("|---|---|---|---|---|---|---|")
    for (cond, name), rs in results.items():
        per = ", ".join(f"{r['steps_per_s']:.1f}" for r in rs)
        threads = ", ".join(str(r["threads"]) for r in rs)
        med = statistics.median(r["steps_per_s"] for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        load = f"{min(r['load1'] for r in rs):.1f}-{max(r['load1'] for r in rs):.1f}"
        say(f"| {cond} | {name} | {med:.1f} | {per} | {threads} | {wall:.1f} | {load} |")
    for cond in conditions:
        before, after = (statistics.median(r["steps_per_s"] for r in results[(cond, v)]) for v in variants)
        say(f"{cond}: after / before = {after / before:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
