"""UCGM grid, update and native sampler: pinned numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.samplers.ucgm import (
    PRESETS,
    UCGMSampler,
    UCGMStepper,
    default_rfba_gap_steps,
    draw_noise,
    heun_correction,
    resolve_stochast_ratio,
    target_time,
    ucgm_time_grid,
    ucgm_update,
)

from .models import DiracVelocity, RandomVelocityMLP

D = 0.499 / 3  # few/any 4-step spacing of u over [0.001, 0.5]
MUL4 = 0.999 / 4  # mul 4-step spacing of u over [0.001, 1)

HAND_GRIDS = {
    ("few", 1): [0.999, 0.0],
    ("few", 2): [0.999, 0.6, 0.0],
    ("few", 4): [0.999, 0.999 - D, 0.999 - 2 * D, 0.5, 0.0],
    ("any", 1): [0.999, 0.0],
    ("any", 2): [0.999, 0.5, 0.0],
    ("any", 4): [0.999, 0.999 - D, 0.999 - 2 * D, 0.5, 0.0],
    ("mul", 1): [0.999, 0.0],
    ("mul", 2): [0.999, 0.4995, 0.0],
    ("mul", 4): [0.999, 0.999 - MUL4, 0.999 - 2 * MUL4, 0.999 - 3 * MUL4, 0.0],
}


@pytest.mark.parametrize("style,steps", sorted(HAND_GRIDS))
def test_grid_default_gaps_pinned(style, steps):
    grid = ucgm_time_grid(steps, default_rfba_gap_steps(style, steps))
    assert grid.dtype == torch.float64
    assert grid.tolist() == pytest.approx(HAND_GRIDS[(style, steps)], abs=1e-12)
    sampler_grid = UCGMSampler(style=style).time_grid(steps)
    assert torch.equal(sampler_grid, grid)


def test_default_gaps_per_nfe():
    assert default_rfba_gap_steps("few", 1) == (0.001, 0.6)
    assert default_rfba_gap_steps("few", 2) == (0.001, 0.6)
    assert default_rfba_gap_steps("few", 3) == (0.001, 0.5)
    assert default_rfba_gap_steps("few", 4) == (0.001, 0.5)
    assert default_rfba_gap_steps("any", 2) == (0.001, 0.5)
    assert default_rfba_gap_steps("mul", 30) == (0.001, 0.0)
    with pytest.raises(ValueError, match="sampler.style=.fast. is unknown"):
        default_rfba_gap_steps("fast", 2)


def _kumaraswamy(u, a, b, c):
    return (1 - (1 - u**a) ** b) ** c


def test_grid_kumaraswamy_multi_step_preset():
    sampler = UCGMSampler(preset="multi_step")
    assert (sampler.style, sampler.stochast_ratio, sampler.default_steps) == ("mul", 0.0, 30)
    grid = sampler.time_grid(30).tolist()
    assert len(grid) == 31 and grid[-1] == 0.0
    # u_i = 0.001 + i·0.999/30, t = 1 − K(u), K(u) = (1 − (1 − u^1.17)^0.8)^1.1
    hand = [1 - _kumaraswamy(0.001 + i * 0.999 / 30, 1.17, 0.8, 1.1) for i in range(30)]
    assert grid[:-1] == pytest.approx(hand, abs=1e-12)
    assert grid[0] == pytest.approx(0.9998922508754208, abs=1e-12)
    assert grid[15] == pytest.approx(0.6594482273894419, abs=1e-12)
    assert grid[29] == pytest.approx(0.0815167484896675, abs=1e-12)
    assert all(a > b for a, b in zip(grid, grid[1:]))


@pytest.mark.parametrize(
    "preset,steps,expected",
    [
        ("few_step", 1, [0.999, 0.0]),
        ("few_step", 2, [0.999, 0.6, 0.0]),
        ("few_step", 4, [0.999, 0.999 - D, 0.999 - 2 * D, 0.5, 0.0]),
        ("any_step", 4, [0.999, 0.999 - D, 0.999 - 2 * D, 0.5, 0.0]),
        ("any_step", 2, [0.999, 0.5, 0.0]),
    ],
)
def test_preset_grids(preset, steps, expected):
    assert UCGMSampler(preset=preset).time_grid(steps).tolist() == pytest.approx(expected, abs=1e-12)


def test_presets_set_knobs_and_explicit_values_override():
    few = UCGMSampler(preset="few_step")
    assert (few.style, few.stochast_ratio, few.rfba_gap_steps, few.default_steps) == ("few", 1.0, None, 2)
    anys = UCGMSampler(preset="any_step")
    assert (anys.style, anys.stochast_ratio, anys.rfba_gap_steps, anys.default_steps) == ("any", 0.0, (0.001, 0.5), 4)
    mul = UCGMSampler(preset="multi_step")
    assert mul.time_dist_ctrl == (1.17, 0.8, 1.1) and mul.rfba_gap_steps == (0.001, 0.0)
    assert set(PRESETS) == {"few_step", "any_step", "multi_step"}
    tuned = UCGMSampler(preset="multi_step", stochast_ratio=0.3)
    assert tuned.stochast_ratio == 0.3 and tuned.style == "mul"
    with pytest.raises(ValueError, match="Unknown UCGM preset"):
        UCGMSampler(preset="two_step")


def test_heun_grid_and_nfe():
    # sampling_order 2: (steps + 1)//2 grid steps, the last one uncorrected
    assert ucgm_time_grid(4, (0.001, 0.5), sampling_order=2).tolist() == pytest.approx([0.999, 0.5, 0.0])
    assert ucgm_time_grid(3, (0.001, 0.5), sampling_order=2).tolist() == pytest.approx([0.999, 0.5, 0.0])
    heun = UCGMSampler(sampling_order=2, stochast_ratio=0.0)
    assert [heun.nfe(s) for s in (1, 2, 3, 4, 5)] == [1, 1, 3, 3, 5]
    assert [UCGMSampler().nfe(s) for s in (1, 2, 4)] == [1, 2, 4]
    model = RandomVelocityMLP()
    noise = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    heun.sample(model, noise, torch.zeros(3, 3), 5)
    assert len(model.calls) == heun.nfe(5)


def test_shift_grid():
    # SD3 shift s=3 on the 2-step few grid: 0.6 → 1.8 / 2.2
    grid = ucgm_time_grid(2, (0.001, 0.6), shift=3.0).tolist()
    assert grid == pytest.approx([3 * 0.999 / (1 + 2 * 0.999), 1.8 / 2.2, 0.0], abs=1e-12)


def test_target_time():
    assert target_time("few", 0.8, 0.5) == 0.0
    assert target_time("any", 0.8, 0.5) == 0.5
    assert target_time("mul", 0.8, 0.5) == 0.8
    with pytest.raises(ValueError):
        target_time("euler", 0.8, 0.5)


def test_update_formula_and_sde_rule():
    g = torch.Generator().manual_seed(0)
    x_hat, z_hat, eps = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    x_cur = torch.zeros(2, 5, dtype=torch.float64)
    out = ucgm_update(x_cur, x_hat, z_hat, 0.6, 0.36, eps)
    assert torch.allclose(out, 0.4 * x_hat + 0.6 * (0.8 * z_hat + 0.6 * eps), atol=1e-14)
    assert torch.allclose(ucgm_update(x_cur, x_hat, z_hat, 0.6, 0.0, None), 0.4 * x_hat + 0.6 * z_hat, atol=1e-14)
    # SDE: s = clamp(2·|Δt|·t_cur / t_next², 0, 1)
    assert resolve_stochast_ratio("SDE", 0.5, 0.45) == pytest.approx(2 * 0.05 * 0.5 / 0.45**2)
    assert resolve_stochast_ratio("SDE", 0.999, 0.6) == 1.0
    assert resolve_stochast_ratio("SDE", 0.6, 0.0) == 1.0
    s = 2 * 0.05 * 0.5 / 0.45**2
    sde = ucgm_update(x_cur, x_hat, z_hat, 0.45, "SDE", eps, t_cur=0.5)
    assert torch.allclose(sde, 0.55 * x_hat + 0.45 * (math.sqrt(1 - s) * z_hat + math.sqrt(s) * eps), atol=1e-14)
    with pytest.raises(ValueError, match="needs t_cur"):
        ucgm_update(x_cur, x_hat, z_hat, 0.45, "SDE", eps)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_stochast_ratio(1.5, 0.5, 0.4)


def test_heun_correction_is_ddim_in_z():
    g = torch.Generator().manual_seed(1)
    x, z1, z2 = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3))
    z_bar = 0.5 * (z1 + z2)
    x_bar = (x - 0.8 * z_bar) / 0.2
    assert torch.allclose(heun_correction(x, z1, z2, 0.8, 0.3), 0.7 * x_bar + 0.3 * z_bar, atol=1e-12)


def test_two_step_few_by_hand():
    """2-step few, s=1: x1 = 0.4·x̂(noise, 0.999) + 0.6·ε₁, x = x̂(x1, 0.6); ε from the generator's first draw."""
    model = RandomVelocityMLP()
    noise = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cond = torch.randn(3, 3, dtype=torch.float64)
    out = UCGMSampler().sample(model, noise, cond, 2, generator=torch.Generator().manual_seed(7))

    def full(v):
        return torch.full((3,), v, dtype=torch.float64)

    eps1 = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(7)).double()
    x_hat0 = noise - 0.999 * model(noise, full(0.999), full(0.0), cond)
    x1 = 0.4 * x_hat0 + 0.6 * eps1
    expected = x1 - 0.6 * model(x1, full(0.6), full(0.0), cond)
    assert (out - expected).abs().max().item() < 1e-12
    calls = model.calls[:2]
    assert [float(t[0]) for t, _ in calls] == pytest.approx([0.999, 0.6])
    assert [float(tt[0]) for _, tt in calls] == [0.0, 0.0]


@pytest.mark.parametrize("style,stochast", [("few", 1.0), ("any", 0.0), ("mul", 0.0), ("few", "SDE"), ("any", 0.5)])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_perfect_model_recovers_data(style, stochast, steps):
    """With the exact velocity of a point mass every UCGM configuration lands on it."""
    target = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    noise = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    sampler = UCGMSampler(style=style, stochast_ratio=stochast, extrapol_ratio=0.0)
    out = sampler.sample(DiracVelocity(), noise, target, steps, generator=torch.Generator().manual_seed(0))
    assert (out - target).abs().max().item() < 1e-10


def test_model_called_with_style_target_times():
    for style, expect_tt in [("few", [0.0, 0.0]), ("any", [0.5, 0.0]), ("mul", [0.999, 0.5])]:
        model = RandomVelocityMLP()
        UCGMSampler(style=style, stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.5)).sample(
            model, torch.randn(2, 2, 2, 2), torch.zeros(2, 3), 2
        )
        assert [float(tt[0]) for _, tt in model.calls] == pytest.approx(expect_tt)
        assert [float(t[0]) for t, _ in model.calls] == pytest.approx([0.999, 0.5])


def test_extrapolation_starts_at_third_step():
    stepper = UCGMStepper(stochast_ratio=0.0, extrapol_ratio=0.5)
    a, b, c = (torch.full((1, 2), v, dtype=torch.float64) for v in (1.0, 2.0, 4.0))
    assert torch.equal(stepper.extrapolate(0, a, a)[0], a)
    assert torch.equal(stepper.extrapolate(1, b, b)[0], b)  # the reference waits one more step
    x, z = stepper.extrapolate(2, c, c)
    assert torch.equal(x, c + 0.5 * (c - b)) and torch.equal(z, c + 0.5 * (c - b))
    d = torch.full((1, 2), 5.0, dtype=torch.float64)
    assert torch.equal(stepper.extrapolate(3, d, d)[0], d + 0.5 * (d - c))  # against the raw previous


def test_seeded_sampling_is_deterministic():
    model = RandomVelocityMLP()
    noise = torch.randn(3, 2, 2, 2)
    cond = torch.randn(3, 3)
    sampler = UCGMSampler(style="few", stochast_ratio=0.7)
    a = sampler.sample(model, noise, cond, 4, generator=torch.Generator().manual_seed(11))
    b = sampler.sample(model, noise, cond, 4, generator=torch.Generator().manual_seed(11))
    c = sampler.sample(model, noise, cond, 4, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-3
    torch.manual_seed(3)
    d = sampler.sample(model, noise, cond, 4)
    torch.manual_seed(3)
    e = sampler.sample(model, noise, cond, 4)
    assert torch.equal(d, e)
    assert a.dtype == noise.dtype and a.shape == noise.shape


def test_stochastic_noise_comes_from_the_generator_whatever_the_state_device_and_dtype():
    """The noise of a stochastic step is the generator's float32 draw on the generator's device, then moved to
    the state: a CPU generator (what fewstep.training.outputs passes) gives the same noise for a state on any device.
    Without a GPU, the meta device (shapes, no values) stands in for another device: a sampler whose state
    lives there consumes exactly the CPU generator draws of the same sampler on the CPU."""
    reference = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))  # float32 on the CPU
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        eps = draw_noise(torch.zeros(3, 5, dtype=dtype), torch.Generator().manual_seed(7))
        assert eps.dtype == dtype and torch.equal(eps, reference.to(dtype))
    assert draw_noise(torch.zeros(3, 5, device="meta"), torch.Generator().manual_seed(7)).device.type == "meta"

    def zero_velocity(x, t, tt, cond):
        return torch.zeros_like(x)

    sampler = UCGMSampler(style="few", stochast_ratio=0.5)
    states = {}
    for device in ("cpu", "meta"):
        g = torch.Generator().manual_seed(7)
        out = sampler.sample(zero_velocity, torch.zeros(3, 2, 2, 2, device=device), None, 4, generator=g)
        assert out.device.type == device
        states[device] = g.get_state()
    assert torch.equal(states["cpu"], states["meta"])
    assert not torch.equal(states["cpu"], torch.Generator().manual_seed(7).get_state())  # noise was drawn

    torch.manual_seed(3)  # no generator: the CPU global RNG, for a state on any device
    sampler.sample(zero_velocity, torch.zeros(3, 2, 2, 2, device="meta"), None, 4)
    after_meta = torch.get_rng_state()
    torch.manual_seed(3)
    sampler.sample(zero_velocity, torch.zeros(3, 2, 2, 2), None, 4)
    assert torch.equal(after_meta, torch.get_rng_state())


def test_state_is_float64_and_model_sees_input_dtype():
    seen = []

    def model(x, t, tt, cond):
        seen.append((x.dtype, t.dtype, tt.dtype, t.shape))
        return torch.zeros_like(x)

    out = UCGMSampler(stochast_ratio=0.0).sample(model, torch.randn(2, 4, dtype=torch.bfloat16), None, 2)
    assert out.dtype == torch.bfloat16
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, (2,))] * 2


def test_guidance_must_be_zero():
    with pytest.raises(ValueError, match="guidance_scale=0"):
        UCGMSampler(guidance_scale=3.0)
    model = RandomVelocityMLP()
    UCGMSampler().sample(model, torch.randn(1, 2, 2, 2), torch.zeros(1, 3), 1, null_cond=torch.ones(1, 3))


def test_invalid_knobs():
    with pytest.raises(ValueError, match="sampling_order"):
        UCGMSampler(sampling_order=3)
    with pytest.raises(ValueError, match="time_dist_ctrl"):
        UCGMSampler(time_dist_ctrl=(1.0, 1.0))
    with pytest.raises(ValueError, match="stochast_ratio"):
        UCGMSampler(stochast_ratio="ODE")
    with pytest.raises(ValueError, match=">= 1"):
        UCGMSampler().time_grid(0)
