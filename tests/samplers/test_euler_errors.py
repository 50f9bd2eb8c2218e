"""The Euler sampler's argument errors, word for word (what a user sees), and the shift's open lower bound."""

from __future__ import annotations

import pytest

from fewstep.samplers.euler import EulerSampler, euler_time_grid


def test_step_count_error_names_the_value():
    with pytest.raises(ValueError, match=r"^The number of sampling steps must be >= 1, got 0\.$"):
        euler_time_grid(0)
    with pytest.raises(ValueError, match=r"^The number of sampling steps must be >= 1, got -3\.$"):
        EulerSampler().time_grid(-3)


def test_guidance_scale_error_names_the_value():
    with pytest.raises(ValueError, match=r"^guidance_scale must be >= 0, got -0\.5\.$"):
        EulerSampler(guidance_scale=-0.5)
    assert EulerSampler(guidance_scale=0.0).guidance_scale == 0.0  # 0 = no CFG, allowed


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_shift_must_be_positive(shift):
    """shift = 0 would send every t < 1 to 0 (t' = 0 / (1 − t)) and t = 1 to 0/0: rejected like a negative shift."""
    with pytest.raises(ValueError, match=rf"^shift must be > 0, got {shift}\.$"):
        EulerSampler(shift=shift)
    assert EulerSampler(shift=1e-3).shift == 1e-3
