"""Peak memory of this process: what a run's summary and the bench report (GPU: max allocated; CPU: peak RSS)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

_EARLIER_PEAK = [0.0]  # MB: the host peak before a measurement reset the high-water mark (host_peak_during)


def peak_host_memory_mb() -> float:
    """This process's peak resident host memory (RSS) so far (since :func:`reset_peak_memory`). Linux: ``VmHWM``,
    the high-water mark ``clear_refs`` resets; not ``getrusage``'s ``ru_maxrss``, which also keeps the mark each
    exiting thread (a read-ahead thread, a gloo worker) latched into the process's record, past any reset."""
    hwm = _status_mb("VmHWM")
    now = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: KiB
    return max(_EARLIER_PEAK[0], now)


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the RSS high-water mark restarts from the RSS now
        return True
    except OSError:  # not Linux, or not permitted
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class HostPeak:
    """The host memory of one block of code (:func:`host_peak_during`): RSS at its start and its peak RSS."""

    start_mb: float | None = None
    peak_mb: float | None = None

    @property
    def growth_mb(self) -> float | None:
        """How far above its starting RSS the block went (None where /proc cannot tell)."""
        return None if self.peak_mb is None or self.start_mb is None else max(self.peak_mb - self.start_mb, 0.0)


@contextlib.contextmanager
def host_peak_during():
    """Measure the peak RSS of the block (Linux: the high-water mark is reset at its start; the process's peak so far
    is kept for :func:`peak_host_memory_mb`)."""
    measured = HostPeak()
    _EARLIER_PEAK[0] = peak_host_memory_mb()
    if _reset_high_water_mark():
        measured.start_mb = _status_mb("VmRSS")
    try:
        yield measured
    finally:
        if measured.start_mb is not None:
            measured.peak_mb = _status_mb("VmHWM")


def reset_peak_memory() -> None:
    """Start this run's peak memory from now: a sweep's points run one after another in one process, and each
    reports its own peak (Linux: ``/proc/self/clear_refs`` resets the RSS high-water mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _EARLIER_PEAK[0] = 0.0
    _reset_high_water_mark()


def peak_memory_mb(device: torch.device | None = None) -> float:
    """The peak since :func:`reset_peak_memory` (or start): CUDA max allocated on ``device`` (default: the current
    one) where CUDA is in use, else the process's peak RSS."""
    if device is not None and device.type != "cuda":
        return peak_host_memory_mb()
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_host_memory_mb()
