"""TwinFlowScheduler details pinned by numbers: the step count of custom schedules, the diffusers hooks
(begin index, scale_noise, add_noise, scale_model_input) and the float64 trajectory.

The default 2-step "few" grid is ``[0.999, 0.6, 0]`` (``.timesteps = [999, 600]``); the expected values
below are computed by hand from the documented formulas, not read back from the scheduler.
"""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fewstep.samplers.scheduler import TwinFlowScheduler  # noqa: E402

LOGGER = "fewstep.samplers.scheduler"


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _sigma(alpha_bar: float) -> float:
    """Flow time of a diffusion noise level: √(1 − ᾱ) / (√ᾱ + √(1 − ᾱ))."""
    a, b = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return b / (a + b)


# ----------------------------------------------------------------------------- set_timesteps


def test_set_timesteps_step_count_precedence():
    """num_inference_steps, else the custom grid's length, else default_num_inference_steps; a custom grid is
    followed (sigmas shifted as FlowMatchEulerDiscreteScheduler shifts them, timesteps as given)."""
    scheduler = TwinFlowScheduler(default_num_inference_steps=3)
    scheduler.set_timesteps()
    assert scheduler.num_inference_steps == 3
    assert scheduler.sigmas.tolist() == pytest.approx([0.999, 0.7495, 0.5, 0.0], abs=1e-12)
    scheduler.set_timesteps(timesteps=[900.0, 800.0, 700.0, 600.0, 500.0])
    assert scheduler.num_inference_steps == 5
    assert scheduler.sigmas.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.0], abs=1e-12)
    assert scheduler.timesteps.tolist() == [900.0, 800.0, 700.0, 600.0, 500.0]
    scheduler.set_timesteps(2, sigmas=[1.0, 0.5, 0.0])  # a trailing 0 may be given
    assert scheduler.sigmas.tolist() == [1.0, 0.5, 0.0] and scheduler.timesteps.tolist() == [1000.0, 500.0]
    shifted = TwinFlowScheduler(shift=3.0)
    shifted.set_timesteps(sigmas=[0.8, 0.5])  # 3·0.8 / (1 + 2·0.8), 1.5 / 2
    assert shifted.sigmas.tolist() == pytest.approx([2.4 / 2.6, 0.75, 0.0], abs=1e-12)
    shifted.set_timesteps(timesteps=[800.0, 500.0])  # timesteps: the model's, unshifted
    assert shifted.sigmas.tolist() == pytest.approx([0.8, 0.5, 0.0], abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, r"^num_inference_steps must be >= 1, got 0\.$"),
        ({"sigmas": []}, r"^TwinFlowScheduler cannot follow sigmas=\[\]: it is empty\.$"),
        ({"sigmas": [0.5, 0.8]}, r"^TwinFlowScheduler cannot follow sigmas=\[0\.5, 0\.8\]: its values must decrease"),
        (
            {"sigmas": [1.2, 0.5]},
            r"cannot follow sigmas=\[1\.2, 0\.5\]: every value but a final 0 must lie in \(0, 1\]",
        ),
        ({"sigmas": [1.0, 0.0, 0.0]}, r"cannot follow sigmas=\[1, 0, 0\]: every value but a final 0"),
        ({"timesteps": [1200.0, 500.0]}, r"cannot follow timesteps=\[1200, 500\]: .* in \(0, 1000\]"),
        ({"timesteps": [500.0, 500.0]}, r"cannot follow timesteps=\[500, 500\]: its values must decrease"),
        ({"num_inference_steps": 4, "sigmas": [1.0, 0.5]}, r"^TwinFlowScheduler: num_inference_steps=4 but 2 sigmas"),
        ({"num_inference_steps": 3, "timesteps": [900.0, 500.0]}, r"num_inference_steps=3 but 2 timesteps"),
        ({"sigmas": [1.0, 0.6], "timesteps": [900.0, 500.0]}, r"takes sigmas or timesteps, not both"),
    ],
)
def test_a_grid_the_scheduler_cannot_follow_is_refused_by_name(kwargs, message):
    scheduler = TwinFlowScheduler()
    with pytest.raises(ValueError, match=message):
        scheduler.set_timesteps(**kwargs)


def test_the_placeholder_grid_of_flux_and_qwen_image_means_the_ucgm_grid():
    """QwenImagePipeline / FluxPipeline pass sigmas = linspace(1, 1/n, n) (and mu) when the user passes no sigmas."""
    four = [0.999, 0.999 - 0.499 / 3, 0.999 - 0.998 / 3, 0.5, 0.0]
    for n, expected in [(1, [0.999, 0.0]), (2, [0.999, 0.6, 0.0]), (4, four)]:
        scheduler = TwinFlowScheduler()
        scheduler.set_timesteps(sigmas=[1.0 - i / n for i in range(n)], mu=1.1)
        assert scheduler.sigmas.tolist() == pytest.approx(expected, abs=1e-12)
        scheduler.set_timesteps(sigmas=[1.0 - i / n for i in range(n)])  # without mu (SD3, SANA): the user's grid
        assert scheduler.sigmas.tolist() == pytest.approx([1.0 - i / n for i in range(n)] + [0.0], abs=1e-15)
    scheduler.set_timesteps(sigmas=[1.0, 0.7, 0.4], mu=1.1)  # any other grid is the user's
    assert scheduler.sigmas.tolist() == [1.0, 0.7, 0.4, 0.0]


def test_dynamic_shifting_needs_mu_and_applies_it():
    scheduler = TwinFlowScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True: set_timesteps needs mu"):
        scheduler.set_timesteps(2)
    scheduler.set_timesteps(2, mu=math.log(3.0))  # e^μ = 3: t' = 3 / (3 + 1/t − 1), the static shift 3
    assert scheduler.sigmas.tolist() == pytest.approx([3 * 0.999 / (1 + 2 * 0.999), 1.8 / 2.2, 0.0], abs=1e-12)
    linear = TwinFlowScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    linear.set_timesteps(sigmas=[0.5], mu=2.0)  # 2 / (2 + 1)
    assert linear.sigmas.tolist() == pytest.approx([2.0 / 3.0, 0.0], abs=1e-12)
    plain = TwinFlowScheduler()
    plain.set_timesteps(2, mu=5.0)  # without use_dynamic_shifting mu is not used, as in FlowMatchEulerDiscreteScheduler
    assert plain.sigmas.tolist() == pytest.approx([0.999, 0.6, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match=r"time_shift_type='cubic' is unknown"):
        TwinFlowScheduler(time_shift_type="cubic")


def test_set_timesteps_device_and_dtype():
    """diffusers convention: ``.timesteps`` are float32 on ``device``; ``.sigmas`` stay float64 on CPU."""
    scheduler = TwinFlowScheduler()
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.dtype == torch.float32 and scheduler.timesteps.device.type == "cpu"
    assert scheduler.sigmas.dtype == torch.float64
    scheduler.set_timesteps(2, device="meta")  # meta stands in for an accelerator on a CPU-only machine
    assert scheduler.timesteps.device.type == "meta" and scheduler.timesteps.dtype == torch.float32
    assert scheduler.timesteps.shape == (2,)
    assert scheduler.sigmas.device.type == "cpu" and scheduler.sigmas.tolist() == pytest.approx([0.999, 0.6, 0.0])


def test_a_foreign_config_names_the_grid_settings_it_brings_in_one_warning(caplog):
    """TwinFlowScheduler.from_config(a base pipeline's FlowMatchEulerDiscreteScheduler config): shift 3.0 and
    dynamic shifting are applied and named; shift_terminal / Karras sigmas have no UCGM meaning: named, ignored."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    caplog.clear()
    scheduler = TwinFlowScheduler.from_config(sd3.config)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1 and "(another scheduler's config): shift=3.0 (applied)" in messages[0]
    scheduler.set_timesteps(2)
    assert scheduler.sigmas.tolist() == pytest.approx([3 * 0.999 / (1 + 2 * 0.999), 1.8 / 2.2, 0.0], abs=1e-12)
    qwen = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.02, use_karras_sigmas=True)
    caplog.clear()
    TwinFlowScheduler.from_config(qwen.config)
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert (
        "use_dynamic_shifting=True (mu applied), shift_terminal=0.02 (ignored), use_karras_sigmas=True (ignored)"
        in message
    )
    caplog.clear()
    TwinFlowScheduler.from_config({**sd3.config, "_class_name": "FlowMatchEulerDiscreteScheduler"})  # from a file
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "from_config(FlowMatchEulerDiscreteScheduler config): shift=3.0 (applied)" in message
    caplog.clear()  # the settings the user overrides, a config of TwinFlow's own, the neutral values: nothing
    TwinFlowScheduler.from_config(sd3.config, shift=1.0)
    TwinFlowScheduler.from_config(TwinFlowScheduler(shift=3.0).config)
    TwinFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
    assert [r for r in caplog.records if r.name == LOGGER] == []


# ----------------------------------------------------------------------------- indices


def test_index_for_timestep_nearest_first_element_and_explicit_schedule():
    scheduler = TwinFlowScheduler()
    scheduler.set_timesteps(2)  # [999, 600]
    assert scheduler.index_for_timestep(610.0) == 1
    assert scheduler.index_for_timestep(torch.tensor(990.0, dtype=torch.float64)) == 0
    assert scheduler.index_for_timestep(torch.tensor([600.0, 999.0])) == 1  # a batch: its first element
    assert scheduler.index_for_timestep(torch.tensor([[999.0], [600.0]])) == 0
    assert scheduler.index_for_timestep(999.0, schedule_timesteps=torch.tensor([600.0, 750.0, 999.0])) == 2
    assert scheduler.index_for_timestep(700.0, schedule_timesteps=torch.tensor([600.0, 750.0, 999.0])) == 1


def test_step_with_batched_timestep_finds_its_index():
    scheduler = TwinFlowScheduler(stochast_ratio=0.0)
    scheduler.set_timesteps(2)
    x, v = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    out = scheduler.step(v, torch.tensor([600.0, 600.0, 600.0]), x).prev_sample  # enters at step 1 (t = 0.6)
    assert torch.allclose(out, x - 0.6 * v, rtol=0, atol=1e-12)
    assert scheduler.step_index == 2


def test_set_begin_index_default_and_step_from_begin_index():
    scheduler = TwinFlowScheduler(stochast_ratio=0.0)
    scheduler.set_timesteps(2)
    scheduler.set_begin_index()
    assert scheduler.begin_index == 0
    scheduler.set_begin_index(1)
    x, v = _rand(2, 3, seed=3), _rand(2, 3, seed=4)
    # the begin index wins over the timestep passed (999 would be step 0): one jump from t = 0.6 to 0
    out = scheduler.step(v, scheduler.timesteps[0], x)
    assert scheduler.step_index == 2
    assert torch.allclose(out.prev_sample, x - 0.6 * v, rtol=0, atol=1e-12)
    assert torch.allclose(out.pred_original_sample, x - 0.6 * v, rtol=0, atol=1e-12)


def test_current_time_after_the_last_step_stays_on_the_last_step():
    scheduler = TwinFlowScheduler(sampling_style="any", stochast_ratio=0.0)
    scheduler.set_timesteps(2)  # any: gaps (0.001, 0.5) → [0.999, 0.5, 0]
    x = torch.zeros(1, 2, dtype=torch.float64)
    seen = []
    for timestep in scheduler.timesteps:
        seen.append((scheduler.current_time(), scheduler.current_target_time()))
        x = scheduler.step(torch.ones_like(x), timestep, x).prev_sample
    assert seen == [pytest.approx((0.999, 0.5)), pytest.approx((0.5, 0.0))]
    assert scheduler.step_index == 2
    assert scheduler.current_time() == pytest.approx(0.5)  # clamped to the last step, not the final t = 0
    assert scheduler.current_target_time() == 0.0
    assert scheduler.target_timestep == 0.0


def test_step_past_the_end_message():
    scheduler = TwinFlowScheduler(stochast_ratio=0.0)
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 2)
    for timestep in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), timestep, x).prev_sample
    message = (
        r"^TwinFlowScheduler\.step called 3 times for 2 steps; "
        r"call set_timesteps again before a new trajectory\.$"
    )
    with pytest.raises(IndexError, match=message):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[1], x)


# ----------------------------------------------------------------------------- float64 trajectory


def test_float32_trajectory_is_the_float64_one_rounded():
    """float32 latents: each step computes in float64 and continues from its float64 state, so every returned
    sample is the float64 UCGM trajectory rounded once to float32 (bit-exact)."""
    scheduler = TwinFlowScheduler(stochast_ratio=0.0)
    scheduler.set_timesteps(2)
    t0, t1 = 0.999, 0.6
    assert scheduler.sigmas.tolist() == [t0, t1, 0.0]
    x0 = _rand(4, 512, seed=5, dtype=torch.float32)
    v0 = _rand(4, 512, seed=6, dtype=torch.float32)
    v1 = _rand(4, 512, seed=7, dtype=torch.float32)
    # hand-written float64 reference: x̂ = x − t·v, ẑ = x + (1 − t)·v, x_next = (1 − t_next)·x̂ + t_next·ẑ
    x = x0.double()
    x_hat, z_hat = x - t0 * v0.double(), x + (1 - t0) * v0.double()
    x1 = (1 - t1) * x_hat + t1 * z_hat
    x2 = x1 - t1 * v1.double()  # last jump: t_next = 0 → x̂

    out0 = scheduler.step(v0, scheduler.timesteps[0], x0)
    assert out0.prev_sample.dtype == torch.float32
    assert torch.equal(out0.prev_sample, x1.float())
    assert torch.equal(out0.pred_original_sample, x_hat.float())
    out1 = scheduler.step(v1, scheduler.timesteps[1], out0.prev_sample)
    assert torch.equal(out1.prev_sample, x2.float())
    # the test discriminates: restarting from the rounded float32 latents gives other bits
    assert not torch.equal((x1.float().double() - t1 * v1.double()).float(), x2.float())


# ----------------------------------------------------------------------------- scale_noise


def test_scale_noise_exact_grid_time_and_batched_timesteps():
    scheduler = TwinFlowScheduler()
    scheduler.set_timesteps(2)
    x, z = _rand(2, 3, seed=8), _rand(2, 3, seed=9)
    one = scheduler.scale_noise(x, scheduler.timesteps[1], z)
    assert torch.allclose(one, 0.6 * z + 0.4 * x, rtol=0, atol=1e-15)  # t = 0.6 exactly, not float32(0.6)
    both = scheduler.scale_noise(x, torch.tensor([999.0, 600.0]), z)
    expected = torch.stack([0.999 * z[0] + 0.001 * x[0], 0.6 * z[1] + 0.4 * x[1]])
    assert torch.allclose(both, expected, rtol=0, atol=1e-15)
    # one sample at two timesteps broadcasts to two noised samples
    pair = scheduler.scale_noise(x[:1], torch.tensor([999.0, 600.0]), z[:1])
    assert pair.shape == (2, 3)
    assert torch.allclose(pair, torch.stack([0.999 * z[0] + 0.001 * x[0], 0.6 * z[0] + 0.4 * x[0]]), atol=1e-15)


def test_scale_noise_draws_noise_when_none_given():
    scheduler = TwinFlowScheduler()
    scheduler.set_timesteps(2)
    x = _rand(3, 4, seed=10)
    torch.manual_seed(123)
    out = scheduler.scale_noise(x, scheduler.timesteps[1:2])
    torch.manual_seed(123)
    eps = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(out, 0.6 * eps + 0.4 * x, rtol=0, atol=1e-15)


def test_scale_noise_with_begin_index_uses_the_scheduler_index():
    """diffusers convention: once set_begin_index was called the scheduler's own index wins over the timestep."""
    scheduler = TwinFlowScheduler(stochast_ratio=0.0)
    scheduler.set_timesteps(2)
    x, z = _rand(2, 3, seed=11), _rand(2, 3, seed=12)
    scheduler.set_begin_index(1)  # before the loop: the begin index
    out = scheduler.scale_noise(x, scheduler.timesteps[0], z)
    assert torch.allclose(out, 0.6 * z + 0.4 * x, rtol=0, atol=1e-15)
    out = scheduler.scale_noise(x, torch.tensor([999.0, 999.0]), z)
    assert torch.allclose(out, 0.6 * z + 0.4 * x, rtol=0, atol=1e-15)
    scheduler.set_timesteps(2)
    scheduler.set_begin_index(0)
    scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x)  # now at step 1
    out = scheduler.scale_noise(x, scheduler.timesteps[0], z)  # mid-loop: the step index
    assert torch.allclose(out, 0.6 * z + 0.4 * x, rtol=0, atol=1e-15)


def test_scale_noise_and_add_noise_stay_on_the_samples_device():
    """Times follow the samples' device (meta stands in for an accelerator on a CPU-only machine)."""
    scheduler = TwinFlowScheduler()
    scheduler.set_timesteps(2)
    x, z = torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta")
    noised = scheduler.scale_noise(x, torch.tensor([600.0]), z)
    assert noised.device.type == "meta" and noised.shape == (2, 3)
    added = scheduler.add_noise(x, z, torch.tensor([250.0, 500.0]))
    assert added.device.type == "meta" and added.shape == (2, 3)
    eps = TwinFlowScheduler(prediction_type="epsilon")
    added = eps.add_noise(x, z, torch.tensor([250.0, 500.0], device="meta"))
    assert added.device.type == "meta" and added.shape == (2, 3)


# ----------------------------------------------------------------------------- add_noise


def test_add_noise_flow_single_timestep_and_broadcast():
    scheduler = TwinFlowScheduler()
    x, z = _rand(3, 5, seed=13), _rand(3, 5, seed=14)
    out = scheduler.add_noise(x, z, torch.tensor(250.0))  # one timestep for the whole batch
    assert torch.allclose(out, 0.25 * z + 0.75 * x, rtol=0, atol=1e-15)
    out = scheduler.add_noise(x, z, torch.tensor([750.0]))
    assert torch.allclose(out, 0.75 * z + 0.25 * x, rtol=0, atol=1e-15)
    pair = scheduler.add_noise(x[:1], z[:1], torch.tensor([250.0, 750.0]))  # one sample, two timesteps
    assert pair.shape == (2, 5)
    assert torch.allclose(pair, torch.stack([0.25 * z[0] + 0.75 * x[0], 0.75 * z[0] + 0.25 * x[0]]), atol=1e-15)


def test_add_noise_flow_times_are_float64():
    """``t = timestep / num_train_timesteps`` in float64 even for float32 timesteps."""
    scheduler = TwinFlowScheduler()
    x, z = _rand(2, 4, seed=15), _rand(2, 4, seed=16)
    ts = torch.tensor([333.3, 777.7], dtype=torch.float32)
    t = [float(v) / 1000.0 for v in ts]  # float64 division of the float32 values
    assert t[0] != float(ts[0] / 1000)  # float32 division would round differently
    out = scheduler.add_noise(x, z, ts)
    expected = torch.stack([t[0] * z[0] + (1 - t[0]) * x[0], t[1] * z[1] + (1 - t[1]) * x[1]])
    assert torch.allclose(out, expected, rtol=0, atol=1e-15)


def test_add_noise_diff2flow_interpolates_the_alpha_bar_table():
    """epsilon models: ᾱ(k) is the linear interpolation of ᾱ at fractional k, k clamped to [0, T − 1], and the
    flow time is σ(ᾱ) = √(1 − ᾱ) / (√ᾱ + √(1 − ᾱ))."""
    scheduler = TwinFlowScheduler(prediction_type="epsilon")
    ac = scheduler.alphas_cumprod.tolist()
    assert len(ac) == 1000
    ks = [-5.0, 0.0, 0.5, 333.3, 998.5, 999.0, 1500.0]
    alpha_bars = [
        ac[0],
        ac[0],
        0.5 * ac[0] + 0.5 * ac[1],
        (1 - (333.3 - 333)) * ac[333] + (333.3 - 333) * ac[334],
        0.5 * ac[998] + 0.5 * ac[999],
        ac[999],
        ac[999],
    ]
    times = [_sigma(a) for a in alpha_bars]
    n = len(ks)
    x, z = _rand(n, 3, seed=17), _rand(n, 3, seed=18)
    out = scheduler.add_noise(x, z, torch.tensor(ks, dtype=torch.float64))
    expected = torch.stack([t * z[i] + (1 - t) * x[i] for i, t in enumerate(times)])
    assert torch.allclose(out, expected, rtol=0, atol=1e-13)
    # a single fractional timestep for a batch of two
    out = scheduler.add_noise(x[:2], z[:2], torch.tensor(333.3, dtype=torch.float64))
    assert torch.allclose(out, times[3] * z[:2] + (1 - times[3]) * x[:2], rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- scale_model_input (diff2flow)


def test_scale_model_input_diff2flow_uses_the_timestep_before_the_loop_and_the_step_in_it():
    """(√ᾱ + √(1 − ᾱ))·x = x / √((1 − t)² + t²) at ᾱ(t); t above σ(ᾱ_999) is clamped to it."""
    scheduler = TwinFlowScheduler(prediction_type="epsilon", stochast_ratio=0.0)
    scheduler.set_timesteps(2)  # flow grid [0.999, 0.6, 0]
    t_max = _sigma(scheduler.alphas_cumprod[-1].item())
    assert t_max == pytest.approx(0.93596, abs=1e-5)

    def factor(t):
        return 1.0 / math.sqrt((1 - t) ** 2 + t**2)

    x = _rand(2, 3, seed=19)
    # before the loop: the timestep passed decides the time
    assert torch.allclose(scheduler.scale_model_input(x, scheduler.timesteps[1]), factor(0.6) * x, atol=1e-13)
    assert torch.allclose(scheduler.scale_model_input(x, scheduler.timesteps[0]), factor(t_max) * x, atol=1e-13)
    # no timestep: the current step (0 before the loop)
    assert torch.allclose(scheduler.scale_model_input(x), factor(t_max) * x, atol=1e-13)
    x32 = x.float()
    scaled = scheduler.scale_model_input(x32, scheduler.timesteps[1])
    assert scaled.dtype == torch.float32
    assert torch.allclose(scaled.double(), factor(0.6) * x, atol=1e-6)
    # mid-loop: the current step wins over the timestep passed
    scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x)
    assert scheduler.step_index == 1
    assert torch.allclose(scheduler.scale_model_input(x, scheduler.timesteps[0]), factor(0.6) * x, atol=1e-13)
    assert torch.allclose(scheduler.scale_model_input(x), factor(0.6) * x, atol=1e-13)
