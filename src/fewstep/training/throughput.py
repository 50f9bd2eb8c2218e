"""What a run's time goes to, logged with every metrics row (metrics.jsonl and W&B):

* ``samples_per_s``: training samples of the global batch per second (all processes, accumulation included);
* ``tflops_per_s``: the estimated TFLOP/s of one process: the FLOPs of a training step (matmuls, convolutions and
  attention, forward and backward, the recompute of gradient checkpointing included), counted once on the first
  step a call runs with torch's ``FlopCounterMode``, times the steps per second. Not counted under
  ``trainer.compile=true`` (a compiled graph hides its operations from the counter);
* ``mfu``: ``tflops_per_s`` over the GPU's dense bf16/fp16 peak (``trainer.peak_tflops``, or the GPU's published
  figure where the device name is known: H100/H200 989, A100 312, L40S 362, A10G 70, L4 121). With gradient
  checkpointing this counts the recomputed forward too (what the hardware ran);
* ``time/data_wait_s``: seconds per step spent waiting for the next batch (reading and moving it to the device);
* ``time/checkpoint_s``: seconds spent saving checkpoints since the last row (``checkpoint_s_total`` in the
  summary).
"""

from __future__ import annotations

import contextlib
import time

import torch

from fewstep.training.memory import host_peak_during

# metrics-row keys that follow the wall clock (or which step was counted), not the training: a resumed run logs
# the same rows as a straight one but for these
WALL_CLOCK_KEYS = frozenset(
    {"steps_per_s", "samples_per_s", "tflops_per_s", "tflop_per_step", "mfu", "time/data_wait_s", "time/checkpoint_s"}
)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def device_peak_tflops(device: torch.device, given: float | None) -> float | None:
    """``trainer.peak_tflops`` when given, else the dense bf16 peak of a known CUDA device, else None (no MFU)."""
    if given:
        return float(given)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name.split() or f"{key}-" in name or name.endswith(key):
            return peak
    return None


class Throughput:
    """Timers of one metrics window: data waits and checkpoint saves, plus the FLOPs of a step."""

    def __init__(self, samples_per_step: int, peak_tflops: float | None, count_flops: bool):
        self.samples_per_step = samples_per_step
        self.peak_tflops = peak_tflops
        self.count_flops = count_flops
        self.step_tflop: float | None = None
        self.data_wait_s = 0.0
        self.checkpoint_s = 0.0
        self.checkpoint_s_total = 0.0
        self.checkpoint_host_growth_mb = 0.0  # the most a save raised this process's RSS above its level before

    @contextlib.contextmanager
    def waiting_for_data(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def saving(self):
        """Around a checkpoint save: its seconds, and how far the process's host memory rose above where it was
        (a full-state save gathers the whole state on rank 0; a sharded one writes each rank's shards as they are)."""
        t0 = time.perf_counter()
        try:
            with host_peak_during() as host:
                yield
        finally:
            spent = time.perf_counter() - t0
            self.checkpoint_s += spent
            self.checkpoint_s_total += spent
            if host.growth_mb is not None:
                self.checkpoint_host_growth_mb = max(self.checkpoint_host_growth_mb, host.growth_mb)

    @contextlib.contextmanager
    def counting_step(self):
        """Around a training step: its FLOPs are counted when none have been yet."""
        if not self.count_flops or self.step_tflop is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            yield
        self.step_tflop = counter.get_total_flops() / 1e12

    def row(self, steps: int, seconds: float) -> dict:
        """The window's figures (``steps`` steps in ``seconds``), then a new window."""
        seconds = max(seconds, 1e-9)
        out = {
            "samples_per_s": self.samples_per_step * steps / seconds,
            "time/data_wait_s": self.data_wait_s / max(steps, 1),
            "time/checkpoint_s": self.checkpoint_s,
        }
        if self.step_tflop is not None:
            out["tflops_per_s"] = self.step_tflop * steps / seconds
            out["tflop_per_step"] = self.step_tflop
            if self.peak_tflops:
                out["mfu"] = out["tflops_per_s"] / self.peak_tflops
        self.data_wait_s = self.checkpoint_s = 0.0
        return out
