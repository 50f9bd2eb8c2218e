"""Where the time of one training step goes: `python scripts/profile_step.py [objective overrides...]`.

Runs the bench's StepRunner (the training loop's step: EMA update, loss, backward, clip, fused AdamW) on
the embedded default (model=tiny, data=digits, batch 128; TwinFlow with enhanced 0 unless overridden) and
times each phase with perf_counter over STEPS steps after a warm-up (CPU ops are synchronous). Network
passes are timed per pass name (``TwinFlow._call``); "other" is the step's remainder (target arithmetic,
masks, RNG capture/restore, loss). Prints a table (median ms per step) and JSON on the last line (also
written to $OUT when set).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

from fewstep.bench.runner import StepRunner
from fewstep.objectives.twinflow import TwinFlow

STEPS = int(os.environ.get("STEPS", "200"))
WARMUP = int(os.environ.get("WARMUP", "20"))
acc: dict[str, float] = defaultdict(float)

_orig_call = TwinFlow._call


def _timed_call(self, counter, name, *args, **kwargs):
    t0 = time.perf_counter()
    out = _orig_call(self, counter, name, *args, **kwargs)
    acc[f"forward: {name}"] += time.perf_counter() - t0
    return out


TwinFlow._call = _timed_call


def timed(name, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    acc[name] += time.perf_counter() - t0
    return out


def step(r: StepRunner) -> dict[str, float]:
    acc.clear()
    t_all = time.perf_counter()
    batch = timed("data", lambda: next(r.batches).to(r.device))
    timed("EMA update", r.teacher.update, r.model, r.step_index)
    t0 = time.perf_counter()
    loss, _ = r.objective.loss(r.model, r.teacher, batch, r.step_index)
    passes = sum(v for k, v in acc.items() if k.startswith("forward: "))
    acc["loss: rest (targets, masks, RNG, distance)"] = time.perf_counter() - t0 - passes
    timed("backward", loss.backward)
    timed("clip_grad_norm_", torch.nn.utils.clip_grad_norm_, r.params, 1.0)
    timed("AdamW (fused)", r.opt.step)
    timed("zero_grad", r.opt.zero_grad, set_to_none=True)
    r.step_index += 1
    acc["total"] = time.perf_counter() - t_all
    return dict(acc)


def main() -> None:
    extra = sys.argv[1:] or ["objective=twinflow"]
    r = StepRunner(["model=tiny", "data=digits", "data.batch_size=128", *extra], torch.device("cpu"), "no")
    for _ in range(WARMUP):
        step(r)
    rows = defaultdict(list)
    for _ in range(STEPS):
        for k, v in step(r).items():
            rows[k].append(v * 1000)
    n = STEPS
    med = {k: statistics.median(v + [0.0] * (n - len(v))) for k, v in rows.items()}
    mean = {k: sum(v) / n for k, v in rows.items()}
    print(f"{' '.join(extra)}: {torch.get_num_threads()} threads, {n} steps, load {os.getloadavg()[0]:.2f}")
    print("| phase | median ms | mean ms | share of mean total |\n|---|---|---|---|")
    for k in sorted(mean, key=lambda k: -mean[k]):
        print(f"| {k} | {med[k]:.2f} | {mean[k]:.2f} | {mean[k] / mean['total']:.0%} |")
    result = {
        "command": " ".join(["python scripts/profile_step.py", *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_avg_1min": os.getloadavg()[0],
        "overrides": extra,
        "threads": torch.get_num_threads(),
        "steps": n,
        "median_ms": med,
        "mean_ms": mean,
    }
    print(json.dumps(result))
    if os.environ.get("OUT"):
        with open(os.environ["OUT"], "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
