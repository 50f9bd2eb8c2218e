"""More TwinFlowScheduler details pinned by numbers and words: the error messages of set_timesteps and of a custom
grid word for word, the foreign-config warning in full, custom diff2flow timesteps (flow times computed here from the
scaled-linear beta schedule), the Flux placeholder tolerance and the flow times scale_model_input attaches.
"""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fewstep.samplers.scheduler import TwinFlowScheduler  # noqa: E402

LOGGER = "fewstep.samplers.scheduler"


def _exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def _flow_time_sd(k: float) -> float:
    """Flow time of (fractional) timestep k of SD's scaled-linear schedule (β from √0.00085 to √0.012 squared)."""
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    lo = min(int(math.floor(k)), 998)
    a = abar[lo] * (1 - (k - lo)) + abar[lo + 1] * (k - lo)
    return math.sqrt(1 - a) / (math.sqrt(a) + math.sqrt(1 - a))


# ----------------------------------------------------------------------------- messages


def test_dynamic_shifting_without_mu_message():
    scheduler = TwinFlowScheduler(use_dynamic_shifting=True)
    message = (
        "TwinFlowScheduler has use_dynamic_shifting=True: set_timesteps needs mu (pipelines pass it; "
        "or build the scheduler with use_dynamic_shifting=False)."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        scheduler.set_timesteps(2)


def test_sigmas_and_timesteps_message():
    message = "TwinFlowScheduler takes sigmas or timesteps, not both: the grid is one set of times."
    with pytest.raises(ValueError, match=_exact(message)):
        TwinFlowScheduler().set_timesteps(sigmas=[0.5], timesteps=[500.0])


def test_step_count_disagreeing_with_grid_message():
    message = "TwinFlowScheduler: num_inference_steps=3 but 2 sigmas; pass one of them, or both of one length."
    with pytest.raises(ValueError, match=_exact(message)):
        TwinFlowScheduler().set_timesteps(3, sigmas=[0.9, 0.5])


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        ([0.0], "sigmas=[0]: every value but a final 0 must lie in (0, 1]"),
        ([0.9, 0.5, 0.7], "sigmas=[0.9, 0.5, 0.7]: its values must decrease strictly"),
        (
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
            "sigmas=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]: its values must decrease strictly",
        ),
        (
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
            "sigmas=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, ...]: its values must decrease strictly",
        ),
    ],
)
def test_custom_grid_messages(sigmas, message):
    with pytest.raises(ValueError, match=_exact(f"TwinFlowScheduler cannot follow {message}.")):
        TwinFlowScheduler().set_timesteps(sigmas=sigmas)


def test_two_values_with_trailing_zero_are_one_step():
    scheduler = TwinFlowScheduler()
    scheduler.set_timesteps(sigmas=[0.5, 0.0])
    assert scheduler.num_inference_steps == 1
    assert scheduler.sigmas.tolist() == [0.5, 0.0]
    assert scheduler.sigmas.dtype == torch.float64


# ----------------------------------------------------------------------------- diff2flow custom timesteps


def test_diff2flow_custom_timesteps_map_to_flow_times():
    scheduler = TwinFlowScheduler(prediction_type="epsilon")
    scheduler.set_timesteps(timesteps=[999.0, 500.0, 0.0])
    assert scheduler.num_inference_steps == 2
    assert scheduler.sigmas.tolist() == pytest.approx([_flow_time_sd(999), _flow_time_sd(500), 0.0], abs=1e-12)
    assert scheduler.timesteps.tolist() == [999.0, 500.0]
    scheduler.set_timesteps(timesteps=[999.0, 500.0, 1.0])  # a timestep 1 is a flow time > 0, not the end
    assert scheduler.num_inference_steps == 3
    assert scheduler.sigmas.tolist() == pytest.approx(
        [_flow_time_sd(999), _flow_time_sd(500), _flow_time_sd(1), 0.0], abs=1e-12
    )
    scheduler.set_timesteps(timesteps=[800.0, 0.5])  # fractional timesteps interpolate ᾱ
    assert scheduler.sigmas.tolist() == pytest.approx([_flow_time_sd(800), _flow_time_sd(0.5), 0.0], abs=1e-12)


# ----------------------------------------------------------------------------- placeholder grid


def test_placeholder_tolerance_is_absolute_1e_7():
    scheduler = TwinFlowScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=[1.0, 0.5 + 5e-8], mu=0.0)  # within 1e-7: the UCGM grid
    assert scheduler.sigmas.tolist() == pytest.approx([0.999, 0.6, 0.0], abs=1e-12)
    scheduler.set_timesteps(sigmas=[1.0, 0.5 + 3e-6], mu=0.0)  # beyond: followed (mu = 0 is the identity)
    assert scheduler.sigmas.tolist() == pytest.approx([1.0, 0.500003, 0.0], abs=1e-12)


def test_placeholder_keeps_the_given_step_count():
    scheduler = TwinFlowScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(2, sigmas=np.linspace(1.0, 0.25, 4), mu=0.0)
    assert scheduler.num_inference_steps == 2
    assert scheduler.sigmas.tolist() == pytest.approx([0.999, 0.6, 0.0], abs=1e-12)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.0)
    assert scheduler.num_inference_steps == 4


# ----------------------------------------------------------------------------- from_config


def _logged(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_foreign_config_warning_word_for_word(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}
    TwinFlowScheduler.from_config(config)
    assert _logged(caplog) == [
        "TwinFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler config): shift=3.0 (applied), "
        "use_dynamic_shifting=True (mu applied); a TwinFlow model samples on the grid of its run "
        "(an export's own scheduler config, shift=1.0 unless the run's sampler set one): pass shift=1.0, "
        "use_dynamic_shifting=False to sample on it."
    ]


def test_foreign_config_without_shift_is_silent(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    scheduler = TwinFlowScheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert scheduler.shift == 1.0
    assert _logged(caplog) == []


def test_from_config_forwards_kwargs_and_unused(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}
    scheduler = TwinFlowScheduler.from_config(config, shift=2.0, use_dynamic_shifting=False)
    assert scheduler.config.shift == 2.0 and scheduler.config.use_dynamic_shifting is False
    assert _logged(caplog) == []
    result = TwinFlowScheduler.from_config(
        {"_class_name": "FlowMatchEulerDiscreteScheduler"}, return_unused_kwargs=True
    )
    assert isinstance(result, tuple) and isinstance(result[0], TwinFlowScheduler)


# ----------------------------------------------------------------------------- scale_model_input


@pytest.mark.parametrize(("style", "target"), [("any", 1), ("mul", 0)])
def test_scale_model_input_attaches_flow_times(style, target):
    scheduler = TwinFlowScheduler(prediction_type="epsilon", sampling_style=style)
    scheduler.set_timesteps(sigmas=[0.8, 0.3])
    scaled = scheduler.scale_model_input(torch.ones(1, 2), scheduler.timesteps[0])
    t, tt = scaled.fewstep_flow_times
    assert t == pytest.approx(0.8, abs=1e-15)
    assert tt == pytest.approx([0.8, 0.3][target], abs=1e-15)
