"""fewstep.path pinned further: a per-sample time vector given as a tensor is moved to the reference's device, as a
number is (the meta device stands in for a GPU on a CPU-only machine)."""

from __future__ import annotations

import torch

from fewstep.path import full_time


def test_full_time_moves_a_time_tensor_to_the_reference_device_and_dtype():
    like = torch.empty(3, 4, device="meta", dtype=torch.float64)
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32)  # on the CPU
    out = full_time(t, 3, like)
    assert (out.device.type, out.dtype, tuple(out.shape)) == ("meta", torch.float64, (3,))
    out = full_time(0.5, 3, like)  # a number: filled on the reference's device
    assert (out.device.type, out.dtype, tuple(out.shape)) == ("meta", torch.float64, (3,))
    on_cpu = full_time(t, 3, torch.empty(3, dtype=torch.float64))
    assert on_cpu.device.type == "cpu" and on_cpu.tolist() == [0.25, 0.5, 0.75]
