"""Peak memory of this process: what a run's summary and the bench report (GPU: max allocated; CPU: peak RSS)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def peak_host_memory_mb() -> float:
    """This process's peak resident host memory (RSS) so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_memory() -> None:
    """Start this run's peak memory from now: a sweep's points run one after another in one process, and each
    reports its own peak (Linux: ``/proc/self/clear_refs`` resets the RSS high-water mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the process's peak so far
        pass


def peak_memory_mb(device: torch.device | None = None) -> float:
    """The peak since :func:`reset_peak_memory` (or start): CUDA max allocated on ``device`` (default: the current
    one) where CUDA is in use, else the process's peak RSS."""
    if device is not None and device.type != "cuda":
        return peak_host_memory_mb()
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_host_memory_mb()
