"""The UCGM sampler pinned further with numbers: defaults, the messages a user sees, where and in which dtype the noise
is drawn, the dtypes of an update, when extrapolation applies and that a deterministic step leaves the RNG alone."""

from __future__ import annotations

import pytest
import torch

import fewstep.samplers.ucgm as ucgm
from fewstep.samplers.step_noise import LatentKeyedNoise
from fewstep.samplers.ucgm import (
    UCGMSampler,
    UCGMStepper,
    check_step_noise,
    draw_noise,
    grid_steps,
    resolve_stochast_ratio,
    shift_time,
    state_dtype,
    ucgm_update,
)

from .models import DiracVelocity

F64 = torch.float64


def test_grid_steps_defaults_to_first_order():
    assert [grid_steps(s) for s in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert [grid_steps(s, 2) for s in (1, 2, 3, 4)] == [1, 1, 2, 2]


def test_shift_time_is_the_identity_only_at_one():
    t = torch.tensor([0.25, 0.5, 1.0], dtype=F64)
    assert shift_time(t, 1.0) is t
    assert shift_time(t, 2.0).tolist() == pytest.approx([0.4, 2 / 3, 1.0], abs=1e-15)  # 2t / (1 + t)
    assert shift_time(t, 3.0).tolist() == pytest.approx([0.5, 0.75, 1.0], abs=1e-15)  # 3t / (1 + 2t)


def test_state_dtype_is_float32_on_mps_only():
    assert state_dtype(torch.device("mps")) == torch.float32
    assert state_dtype("mps:0") == torch.float32
    assert state_dtype(torch.device("cpu")) == F64
    assert state_dtype("meta") == F64


def test_sde_rule_without_t_cur_names_what_is_missing():
    with pytest.raises(ValueError, match=r"^The 'SDE' stochast_ratio rule needs t_cur\.$"):
        resolve_stochast_ratio("SDE", None, 0.5)


def test_noise_of_the_global_rng_is_drawn_on_the_cpu_under_another_default_device():
    like = torch.zeros(2, 3, dtype=F64)
    torch.manual_seed(3)
    want = torch.randn(2, 3, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.device("meta"):  # a default device (as torch.set_default_device sets one) is not where noise comes from
        eps = draw_noise(like)
    assert eps.device.type == "cpu" and eps.dtype == F64 and torch.equal(eps, want.to(F64))
    with torch.device("meta"):
        eps = draw_noise(like, torch.Generator().manual_seed(4))
    assert torch.equal(eps, torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).to(F64))


def test_noise_is_a_float32_draw_whatever_the_default_dtype():
    like = torch.zeros(4, 5, dtype=F64)
    want = torch.randn(4, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float32).to(F64)
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        eps = draw_noise(like, torch.Generator().manual_seed(9))
        torch.manual_seed(9)
        eps_global = draw_noise(like)
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(eps, want) and torch.equal(eps_global, want)


def test_noise_is_requested_on_the_generators_device(monkeypatch):
    """A CUDA generator draws on the GPU: the draw is asked for on the generator's device (a generator reporting
    another device stands in for one on a CPU-only machine), on the CPU without a generator."""

    class Elsewhere(torch.Generator):
        @property
        def device(self):
            return torch.device("meta")

    asked = []

    def randn(shape, generator=None, device=None, dtype=None):
        asked.append((device, dtype))
        return torch.zeros(shape, dtype=dtype)

    monkeypatch.setattr(ucgm.torch, "randn", randn)
    draw_noise(torch.zeros(2), Elsewhere())
    draw_noise(torch.zeros(2), torch.Generator())
    draw_noise(torch.zeros(2))
    assert asked == [(torch.device("meta"), torch.float32), (torch.device("cpu"), torch.float32)] + [
        (torch.device("cpu"), torch.float32)
    ]


def test_update_result_takes_x_curs_dtype_whatever_the_inputs_dtypes():
    x32 = torch.zeros(1, 2)
    hat32 = torch.tensor([[0.5, 1.5]])
    hat64 = hat32.to(F64)
    for x_hat, z_hat in ((hat64, hat32), (hat32, hat64)):
        out = ucgm_update(x32, x_hat, z_hat, 0.25, 0.0, None)
        assert out.dtype == torch.float32 and out.tolist() == [[0.5, 1.5]]
    out = ucgm_update(x32, hat32, hat32, 0.5, 0.75, torch.tensor([[2.0, -2.0]], dtype=F64))
    # 0.5·x̂ + 0.5·(√0.25·ẑ + √0.75·ε)
    want = 0.5 * hat32 + 0.5 * (0.5 * hat32 + 0.75**0.5 * torch.tensor([[2.0, -2.0]]))
    assert out.dtype == torch.float32 and torch.allclose(out, want, rtol=0, atol=1e-6)


def test_update_without_noise_says_so():
    with pytest.raises(ValueError, match=r"^ucgm_update with stochast_ratio 0\.5 > 0 needs noise\.$"):
        ucgm_update(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.5, 0.5, None)


def test_sampler_messages_name_the_fix():
    with pytest.raises(ValueError) as err:
        UCGMSampler(guidance_scale=2.0)
    assert str(err.value) == (
        "UCGMSampler needs guidance_scale=0 (got 2.0): few-step models have CFG baked in; use EulerSampler for CFG "
        "sampling of a multi-step model."
    )
    with pytest.raises(ValueError) as err:
        UCGMSampler(preset="fast")
    assert str(err.value) == "Unknown UCGM preset 'fast': use one of few_step, any_step, multi_step."
    with pytest.raises(ValueError) as err:
        UCGMSampler(rfba_gap_steps=(0.1, 0.2, 0.3))
    assert str(err.value) == "rfba_gap_steps must be 2 numbers [g0, g1], got (0.1, 0.2, 0.3)."


def test_sampler_defaults_two_steps_no_guidance_and_keeps_its_preset_name():
    sampler = UCGMSampler()
    assert (sampler.default_steps, sampler.guidance_scale, sampler.preset) == (2, 0.0, None)
    model = DiracVelocity()
    sampler.sample(model, torch.ones(2, 3), torch.zeros(2, 3), generator=torch.Generator().manual_seed(0))
    assert [t for _, t in model.calls] == pytest.approx([0.999, 0.6])  # steps=None: the two default steps
    assert UCGMSampler(preset="any_step").preset == "any_step"
    assert UCGMSampler(preset="any_step").guidance_scale == 0.0


def test_explicit_sequences_override_a_preset():
    """A knob differs from its default when any element differs, and a sequence given where the default is None
    (rfba_gap_steps) is an override too."""
    s = UCGMSampler(preset="multi_step", time_dist_ctrl=(1.0, 1.0, 2.0))
    assert s.time_dist_ctrl == (1.0, 1.0, 2.0)
    assert UCGMSampler(preset="multi_step", time_dist_ctrl=[1, 1, 1]).time_dist_ctrl == (1.17, 0.8, 1.1)
    s = UCGMSampler(preset="few_step", rfba_gap_steps=(0.01, 0.3))
    assert s.rfba_gap_steps == (0.01, 0.3)
    assert s.time_grid(2).tolist() == pytest.approx([0.99, 0.3, 0.0], abs=1e-12)  # t = 1 − linspace(0.01, 1 − 0.3, 2)
    assert UCGMSampler(preset="few_step").rfba_gap_steps is None


def test_stepper_defaults_are_stochastic_and_not_extrapolating():
    stepper = UCGMStepper()
    assert (stepper.stochast_ratio, stepper.extrapol_ratio) == (1.0, 0.0)


def test_extrapolation_needs_a_previous_step_and_a_positive_ratio():
    a = torch.tensor([[1.0, 2.0]], dtype=F64)
    b = torch.tensor([[3.0, 5.0]], dtype=F64)
    x, z = UCGMStepper(0.0, 0.5).extrapolate(2, a, b)  # a fresh stepper: nothing to extrapolate from
    assert torch.equal(x, a) and torch.equal(z, b)
    stepper = UCGMStepper(0.0, 0.0)  # ratio 0: the reconstructions as they are, even after a non-finite one
    inf = torch.full((1, 2), float("inf"), dtype=F64)
    stepper.extrapolate(1, inf, inf)
    x, z = stepper.extrapolate(2, a, b)
    assert torch.equal(x, a) and torch.equal(z, b)


def test_steps_extrapolate_from_the_third_but_not_on_the_final_jump():
    e = 0.5
    stepper = UCGMStepper(stochast_ratio=0.0, extrapol_ratio=e)
    x = torch.tensor([[1.0, -2.0]], dtype=F64)
    velocities = [[0.5, 1.0], [1.0, 0.0], [2.0, -1.0], [4.0, 2.0]]
    times = [(0.75, 0.5), (0.5, 0.25), (0.25, 0.125), (0.125, 0.0)]
    raw = []
    for i, (v, (t_cur, t_next)) in enumerate(zip(velocities, times)):
        v = torch.tensor([v], dtype=F64)
        raw.append((x - t_cur * v, x + (1 - t_cur) * v))
        x_next, x_hat, z_hat = stepper.step(i, x, v, t_cur, t_next)
        if i == 2:  # x̂ + e·(x̂ − x̂_prev), against the previous raw reconstruction
            want = tuple(r + e * (r - p) for r, p in zip(raw[2], raw[1]))
        else:
            want = raw[i]
        assert torch.equal(x_hat, want[0]) and torch.equal(z_hat, want[1]), i
        assert torch.equal(x_next, (1 - t_next) * want[0] + t_next * want[1]), i
    assert x_next.tolist() == [[0.5, -2.25]]  # the final jump returns the raw x̂ = x − 0.125·v


def test_step_reconstructs_in_the_states_dtype():
    stepper = UCGMStepper(0.0)
    x = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[0.1, 0.2]], dtype=F64)
    x_next, x_hat, z_hat = stepper.step(0, x, v, 0.7, 0.3)
    assert (x_next.dtype, x_hat.dtype, z_hat.dtype) == (torch.float32,) * 3
    v32 = v.float()
    assert torch.equal(x_hat, x - torch.tensor(0.7) * v32) and torch.equal(z_hat, x + (1 - torch.tensor(0.7)) * v32)


def test_the_next_state_takes_x_curs_dtype_when_the_previous_steps_had_another():
    """Extrapolation mixes in the previous step's reconstructions: in float64 there, float32 now; the next state is
    in the current state's dtype all the same."""
    stepper = UCGMStepper(stochast_ratio=0.0, extrapol_ratio=0.5)
    for i in range(2):
        stepper.step(
            i, torch.ones(1, 2, dtype=F64), torch.full((1, 2), 0.5, dtype=F64), 0.75 - 0.25 * i, 0.5 - 0.25 * i
        )
    x = torch.ones(1, 2)
    x_next, x_hat, _ = stepper.step(2, x, torch.full((1, 2), 0.25), 0.25, 0.125)
    assert x_hat.dtype == F64 and x_next.dtype == torch.float32
    # raw x̂, ẑ = 0.9375, 1.1875 (index 1: 0.75, 1.25); extrapolated 1.03125, 1.15625; 0.875·x̂ + 0.125·ẑ
    assert x_next.tolist() == [[1.046875, 1.046875]]


def test_a_deterministic_step_draws_no_noise():
    stepper = UCGMStepper(0.0)
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    torch.manual_seed(6)
    global_before = torch.get_rng_state()
    stepper.step(0, torch.ones(2, 3, dtype=F64), torch.ones(2, 3), 0.8, 0.4, g)
    stepper.step(1, torch.ones(2, 3, dtype=F64), torch.ones(2, 3), 0.4, 0.2)
    assert torch.equal(g.get_state(), before) and torch.equal(torch.get_rng_state(), global_before)
    UCGMStepper(0.25).step(0, torch.ones(2, 3, dtype=F64), torch.ones(2, 3), 0.8, 0.4, g)
    assert not torch.equal(g.get_state(), before)  # a stochastic step does draw


def test_an_unknown_step_noise_names_the_choices():
    with pytest.raises(ValueError) as err:
        check_step_noise("seed")
    assert str(err.value) == "step_noise='seed' is unknown; use one of generator, latents"
    with pytest.raises(ValueError) as err:
        UCGMSampler(step_noise="global")
    assert str(err.value) == "sampler.step_noise='global' is unknown; use one of generator, latents"
    assert check_step_noise("latents") == "latents"


def test_latent_keyed_noise_is_drawn_for_the_steps_index():
    """A keyed generator gives step i's noise itself: draw_noise's default index is the first step, and a stepper
    asks for the index of the step it takes."""
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    keyed = LatentKeyedNoise(x0)
    first, third = keyed.draw(0, x0), keyed.draw(3, x0)
    assert not torch.equal(first, third)
    assert torch.equal(draw_noise(x0, keyed), first) and torch.equal(draw_noise(x0, keyed, 3), third)
    x = torch.ones(2, 3, dtype=F64)
    x_next, x_hat, z_hat = UCGMStepper(stochast_ratio=1.0).step(3, x, torch.zeros(2, 3, dtype=F64), 0.5, 0.25, keyed)
    assert torch.equal(x_next, 0.75 * x_hat + 0.25 * third)  # s = 1: ẑ is replaced by step 3's noise
