"""fewstep.path: the flow path's conventions, pinned with numbers (t = 1 is noise; negative times address the fake
trajectory and the arithmetic uses |t|)."""

from __future__ import annotations

import pytest
import torch

from fewstep.path import expand_like, full_time, interpolate, reconstruct


def test_expand_like_broadcasts_per_sample_and_takes_the_reference_dtype():
    t = torch.tensor([0.25, 0.5], dtype=torch.float32)
    ref = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    out = expand_like(t, ref)
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float64
    assert out.flatten().tolist() == [0.25, 0.5]
    assert expand_like(t, torch.zeros(2, 7)).shape == (2, 1)


def test_interpolate_and_reconstruct_by_hand_with_signed_times():
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    z = torch.tensor([[0.5, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([0.25, -0.75], dtype=torch.float64)  # row 1: the fake trajectory, |t| = 0.75
    x_t = interpolate(x, z, t)
    assert x_t.tolist() == [[0.875, -1.25], [0.0, 1.625]]  # |t|·z + (1 − |t|)·x
    x_hat, z_hat = reconstruct(x_t, z - x, t)  # the true velocity recovers both ends exactly
    assert torch.allclose(x_hat, x, atol=0, rtol=1e-15) and torch.allclose(z_hat, z, atol=0, rtol=1e-15)
    x_hat, z_hat = reconstruct(x_t, torch.ones_like(x), t)
    assert x_hat.tolist() == [[0.625, -1.5], [-0.75, 0.875]]  # x_t − |t|·F
    assert z_hat.tolist() == [[1.625, -0.5], [0.25, 1.875]]  # x_t + (1 − |t|)·F


def test_full_time_keeps_a_per_sample_vector_and_fills_anything_else():
    like = torch.zeros(3, 2, dtype=torch.float64)
    per_sample = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)
    kept = full_time(per_sample, 3, like)
    assert kept.dtype == torch.float64 and kept.tolist() == pytest.approx([0.1, 0.2, 0.3], abs=1e-7)
    filled = full_time(0.5, 3, like)
    assert filled.dtype == torch.float64 and filled.tolist() == [0.5, 0.5, 0.5]
    assert full_time(torch.tensor(0.25), 3, like).tolist() == [0.25, 0.25, 0.25]  # a 0-d tensor: filled
    assert full_time(torch.tensor([0.75]), 3, like).tolist() == [0.75, 0.75, 0.75]  # one value for 3 rows: filled
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        full_time(torch.tensor([[0.1, 0.2, 0.3]]), 3, like)  # 2-d: neither a per-sample vector nor one value
