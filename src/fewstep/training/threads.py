"""How many torch (intra-op) threads a run uses: ``trainer.torch_threads``, or, at 0, a count chosen at start from
what the machine has free.

torch's default is one thread per core. On a machine where another process keeps a core busy, those threads wait on
each other at every parallel op (the one that shares its core with the other process arrives late at each barrier):
400 steps of the default run went at 5.5 steps/s with 2 threads beside one busy process and at 39.4 with 1 thread
(README). So at 0 the run takes at most its share of the cores it may use (the CPU affinity mask and a cgroup CPU
quota, divided among the processes a launcher started on this node) and then measures, for a fraction of a second,
a small parallel workload at that count and at fewer threads, interleaved, and keeps the fewest threads within 10 %
of the fastest. An explicit ``trainer.torch_threads`` or ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is taken as given.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

# the workload each candidate count times, per round: a small MLP's forward and backward, parallel ops
# (GEMMs and elementwise ops above torch's grain size) with a barrier after each, like a training step; its
# rows grow with the largest count (ROWS_PER_THREAD each), so that a many-core machine is not measured on a
# workload too small to spread over its cores
PROBE_ROWS, ROWS_PER_THREAD, PROBE_WIDTH, PROBE_LAYERS = 128, 64, 512, 3
PROBE_ROUNDS = 10
# rounds stop after this many seconds in all (at least MIN_ROUNDS): a contended count is slow to probe
PROBE_BUDGET_S, MIN_ROUNDS = 0.5, 3
TOLERANCE = 1.1  # the fewest threads whose time is within this factor of the fastest count's


class Threads(NamedTuple):
    count: int
    reason: str  # why this count, for the run's first log line

    def __str__(self) -> str:
        return f"{self.count} torch thread{'s' if self.count != 1 else ''} ({self.reason})"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity mask, capped by a cgroup v2/v1 CPU quota
    (containers, SLURM) where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup may use (``cpu.max`` "200000 100000" -> 2.0); None where there is no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """Training processes a launcher started on this node (torchrun / ``accelerate launch``: LOCAL_WORLD_SIZE;
    SLURM tasks: SLURM_NTASKS_PER_NODE); 1 for a plain run."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def probe_times(counts: list[int], rounds: int = PROBE_ROUNDS, budget_s: float = PROBE_BUDGET_S) -> dict[int, float]:
    """Seconds the probe workload took at each thread count, summed over up to ``rounds`` interleaved rounds
    (one pass per count per round, so a burst of other work hits every count alike), fewer once ``budget_s`` is
    spent (at least MIN_ROUNDS). Summed, not the median: a thread that waits for a core shows up as frequent long
    passes; but without each count's slowest pass, so that one hiccup of a quiet machine does not decide. Draws
    from a generator of its own: the global RNG (the run's seed) is untouched."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(PROBE_ROWS, ROWS_PER_THREAD * max(counts)), PROBE_WIDTH, generator=gen)
    weights = [
        torch.randn(PROBE_WIDTH, PROBE_WIDTH, generator=gen).div_(PROBE_WIDTH**0.5).requires_grad_()
        for _ in range(PROBE_LAYERS)
    ]

    def once() -> None:
        h = x
        for w in weights:
            h = torch.nn.functional.silu(h @ w)
        h.square().mean().backward()
        for w in weights:
            w.grad = None

    before = torch.get_num_threads()
    passes: dict[int, list[float]] = {count: [] for count in counts}
    try:
        for count in counts:  # warm-up: each count's thread pool started
            torch.set_num_threads(count)
            once()
        start = time.perf_counter()
        for done in range(rounds):
            if done >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
                break
            for count in counts:
                torch.set_num_threads(count)
                t0 = time.perf_counter()
                once()
                passes[count].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {count: sum(times) - max(times) for count, times in passes.items()}


def fewest_within(times: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest thread count whose time is within ``tolerance`` of the fastest count's."""
    best = min(times.values())
    return min(count for count, t in times.items() if t <= best * tolerance)


def candidates(cap: int) -> list[int]:
    """``cap``, then halved down to 1: 8 -> [8, 4, 2, 1]."""
    out = [cap]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def choose_threads(requested: int = 0, probe=probe_times) -> Threads:
    """The thread count for ``trainer.torch_threads=requested`` (0: chosen here, see the module docstring)."""
    if requested > 0:
        return Threads(requested, "trainer.torch_threads")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").strip():
            return Threads(torch.get_num_threads(), f"{var}={os.environ[var].strip()}")
    procs = local_processes()
    cap = max(1, min(torch.get_num_threads(), usable_cores() // procs))
    share = f"{usable_cores()} usable cores" + (f" / {procs} processes on this node" if procs > 1 else "")
    if cap == 1:
        return Threads(1, share)
    times = probe(candidates(cap))
    count = fewest_within(times)
    measured = ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in sorted(times.items()))
    return Threads(count, f"auto: {share}; probe {measured}")


REUSE_S = 60.0  # a process that starts runs one after another (a sweep's points, tests) probes at most this often
_last: tuple[float, Threads] | None = None


def set_torch_threads(requested: int = 0) -> Threads:
    """Choose (:func:`choose_threads`) and apply the thread count; returns it with the reason, for the log. A
    chosen count is reused for REUSE_S seconds by the runs that start in the same process."""
    global _last
    now = time.monotonic()
    if requested <= 0 and _last is not None and now - _last[0] < REUSE_S and _last[1].reason.startswith("auto"):
        threads = _last[1]._replace(reason=f"{_last[1].reason}, {now - _last[0]:.0f} s ago")
    else:
        threads = choose_threads(requested)
        if threads.reason.startswith("auto"):
            _last = (now, threads)
    torch.set_num_threads(threads.count)
    return threads
