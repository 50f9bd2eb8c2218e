"""Euler baseline: grid, exact integration of straight paths, one batched CFG forward."""

from __future__ import annotations

import pytest
import torch

from fewstep.samplers.euler import EulerSampler, euler_time_grid

from .models import DiracVelocity, RandomVelocityMLP


def test_grid_uniform_and_shifted():
    assert euler_time_grid(4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-15)
    # SD3 shift 3: t' = 3t / (1 + 2t)
    assert euler_time_grid(2, shift=3.0).tolist() == pytest.approx([1.0, 1.5 / 2.0, 0.0], abs=1e-15)
    assert EulerSampler(shift=3.0).time_grid(4).tolist() == pytest.approx(
        [1.0, 2.25 / 2.5, 1.5 / 2.0, 0.75 / 1.5, 0.0], abs=1e-15
    )
    assert EulerSampler().nfe(30) == 30


def test_euler_by_hand_and_target_time_equals_time():
    model = RandomVelocityMLP()
    noise = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    cond = torch.randn(3, 3, dtype=torch.float64)
    out = EulerSampler().sample(model, noise, cond, 2)
    calls = list(model.calls)
    full = lambda v: torch.full((3,), v, dtype=torch.float64)  # noqa: E731
    x = noise - 0.5 * model(noise, full(1.0), full(1.0), cond)
    x = x - 0.5 * model(x, full(0.5), full(0.5), cond)
    assert (out - x).abs().max().item() < 1e-12
    assert [(float(t[0]), float(tt[0])) for t, tt in calls] == [(1.0, 1.0), (0.5, 0.5)]


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_straight_field_is_integrated_exactly(steps):
    target, noise = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    out = EulerSampler(shift=2.0).sample(DiracVelocity(), noise, target, steps)
    assert (out - target).abs().max().item() < 1e-10


def test_cfg_is_one_batched_forward_with_exact_mix():
    """Point-mass fields: cond → c, uncond → c_u; one Euler step lands on c_u + g·(c − c_u)."""
    g = 2.5
    c, c_u = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    noise = torch.randn(3, 4, dtype=torch.float64)
    model = DiracVelocity()
    for steps in (1, 2, 5):
        model.calls.clear()
        out = EulerSampler(guidance_scale=g).sample(model, noise, c, steps, null_cond=c_u)
        # mixing straight fields keeps the path straight after the first step: the result is exact at any NFE
        assert (out - (c_u + g * (c - c_u))).abs().max().item() < 1e-10
        assert [b for b, _ in model.calls] == [6] * steps  # cond + uncond in ONE 2B forward per step


def test_cfg_with_dict_conditions():
    seen = []

    def model(x, t, tt, cond):
        seen.append({k: v.shape for k, v in cond.items()})
        return x - cond["target"]

    cond = {"target": torch.ones(2, 3), "mask": torch.ones(2, 1)}
    null = {"target": torch.zeros(2, 3), "mask": torch.zeros(2, 1)}
    out = EulerSampler(guidance_scale=3.0).sample(model, torch.randn(2, 3), cond, 1, null_cond=null)
    assert torch.allclose(out, torch.full((2, 3), 3.0))
    assert seen == [{"target": (4, 3), "mask": (4, 1)}]


def test_cfg_needs_null_cond():
    with pytest.raises(ValueError, match="null_cond"):
        EulerSampler(guidance_scale=2.0).sample(RandomVelocityMLP(), torch.randn(1, 2, 2, 2), torch.zeros(1, 3), 2)
    with pytest.raises(ValueError):
        EulerSampler(guidance_scale=-1.0)


def test_dtype_round_trip():
    noise = torch.randn(2, 3, dtype=torch.bfloat16)
    out = EulerSampler().sample(lambda x, t, tt, c: torch.zeros_like(x), noise, None, 3)
    assert out.dtype == torch.bfloat16
