"""MeanFlow (SPEC §11) pinned further with numbers: its options, the random draws of a step reproduced from the
seed (times, the equal-time and dropout rows, strict at the rate), the devices and dtypes the inputs and targets
live in, the logs, and the one-line config errors a user sees."""

from __future__ import annotations

import pytest
import torch
from test_meanflow import LegacyOpNet, probe_case, time_derivative_by_hand

from fewstep.data.base import Batch
from fewstep.objectives.jvp import ForwardADError
from fewstep.objectives.meanflow import MeanFlow, MeanFlowConfig, logit_normal

from helpers import compose


def test_defaults_match_the_config_schema_and_options_are_kept():
    obj = MeanFlow()
    names = ["target_step_count", "time_mu", "time_sigma", "equal_time_ratio", "adaptive_p", "adaptive_c",
             "guidance_scale", "guidance_mix", "cond_dropout", "allow_diff2flow"]  # fmt: skip
    got = [getattr(obj, k) for k in names]
    assert got == [1, -0.4, 1.0, 0.75, 1.0, 1e-3, 1.0, 0.0, 0.0, False]
    assert got == [getattr(MeanFlowConfig(), k) for k in names]
    assert obj.guidance_interval == (0.0, 1.0) and not obj.guided
    obj = MeanFlow(target_step_count=4, allow_diff2flow=True)
    assert obj.target_step_count == 4 and obj.allow_diff2flow is True
    assert MeanFlow(allow_diff2flow=1).allow_diff2flow is True


def test_logit_normal_numbers_dtype_and_device():
    """sigmoid(N(mu, sigma)) from the CPU generator: the same draws by hand; float32 at least; on like's device."""
    torch.manual_seed(0)
    got = logit_normal(5, 0.3, 2.0, torch.zeros(1, dtype=torch.float64))
    torch.manual_seed(0)
    assert torch.equal(got, torch.sigmoid(torch.randn(5) * 2.0 + 0.3).double())
    assert logit_normal(3, 0.0, 1.0, torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    # the meta device stands in for an accelerator: the times follow the data there
    assert logit_normal(3, 0.0, 1.0, torch.empty(1, device="meta")).device.type == "meta"


def test_time_pairs_by_hand_strict_at_the_equal_time_rate():
    """t = max(a, b), tt = min(a, b) of two logit-normal draws; tt = t on the rows whose uniform u is below
    equal_time_ratio (strictly: the row whose u equals the rate keeps tt < t)."""
    torch.manual_seed(1)
    a = torch.sigmoid(torch.randn(6) * 0.8 + 0.2)
    b = torch.sigmoid(torch.randn(6) * 0.8 + 0.2)
    u = torch.rand(6)
    rate = sorted(u.tolist())[2]
    torch.manual_seed(1)
    t, tt = MeanFlow(time_mu=0.2, time_sigma=0.8, equal_time_ratio=rate).sample_times(6, torch.zeros(1))
    equal = u < rate
    assert equal.sum().item() == 2
    assert torch.equal(t, torch.maximum(a, b))
    assert torch.equal(tt, torch.where(equal, t, torch.minimum(a, b)))
    assert (tt[u == rate] < t[u == rate]).all()


def test_time_pairs_follow_the_data_device():
    t, tt = MeanFlow().sample_times(4, torch.empty(1, device="meta"))
    assert t.device.type == "meta" and tt.device.type == "meta"


def batch3(n=5):
    g = torch.Generator().manual_seed(4)
    return Batch(torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g), torch.full((n, 3), -7.0))


def test_inputs_without_condition_dropout_draw_only_times_and_noise():
    """cond_dropout = 0 draws no dropout numbers: the time pair and z are the seed's first draws."""
    batch = batch3()
    obj = MeanFlow(equal_time_ratio=0.5)
    torch.manual_seed(2)
    inp = obj.sample_inputs(batch)
    torch.manual_seed(2)
    t, tt = obj.sample_times(5, batch.x)
    z = torch.randn_like(batch.x)
    assert torch.equal(inp["t"], t) and torch.equal(inp["tt"], tt)
    assert torch.equal(inp["v"], z - batch.x)
    assert torch.allclose(inp["x_t"], t[:, None] * z + (1 - t[:, None]) * batch.x, rtol=0, atol=1e-6)
    assert torch.equal(inp["cond"], batch.cond) and not inp["dropped"].any()


def test_condition_dropout_is_strict_at_the_rate():
    """Rows with u < cond_dropout take the null condition; the row whose u equals the rate keeps its own."""
    batch = batch3()
    torch.manual_seed(6)
    u = torch.rand(5)
    rate = sorted(u.tolist())[2]
    torch.manual_seed(6)
    inp = MeanFlow(cond_dropout=rate).sample_inputs(batch)
    dropped = u < rate
    assert dropped.sum().item() == 2 and torch.equal(inp["dropped"], dropped)
    assert torch.equal(inp["cond"], torch.where(dropped[:, None], batch.null_cond, batch.cond))


@pytest.mark.parametrize("cond_dropout", [0.0, 0.5])
def test_inputs_live_on_the_data_device(cond_dropout):
    """The dropped mask (also without dropout) and the chosen conditions are on the batch's device (meta here)."""
    meta = torch.empty(4, 3, device="meta")
    batch = Batch(meta, torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta"))
    inp = MeanFlow(cond_dropout=cond_dropout).sample_inputs(batch)
    assert {k: v.device.type for k, v in inp.items()} == dict.fromkeys(inp, "meta")


class WideOutput(torch.nn.Module):
    """``f = x·(1 + t) + tt`` returned in float64 whatever its inputs: ``df/dt`` along ``(v, 1, 0)`` is
    ``v·(1 + t) + x``."""

    def forward(self, x, t, tt, cond):
        return x.double() * (1 + t.double()[:, None]) + tt.double()[:, None]


def test_target_is_formed_in_the_wide_dtype_of_v():
    """v float32: the target is float32 even with float64 times and a float64 network output (cast down)."""
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]])
    v = torch.tensor([[0.5, 1.0], [-1.0, 2.0], [0.25, -0.5]])
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    tt = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    target = MeanFlow().average_velocity_target(WideOutput(), x, t, tt, None, v)
    assert target.dtype == torch.float32
    tb = t[:, None]
    expected = v.double() - (tb - tt[:, None]) * (v.double() * (1 + tb) + x.double())
    assert torch.allclose(target.double(), expected, rtol=1e-6, atol=1e-6)
    bf = MeanFlow().average_velocity_target(WideOutput(), x.bfloat16(), t.bfloat16(), tt.bfloat16(), None,
                                            v.bfloat16())  # fmt: skip
    assert bf.dtype == torch.float32


def test_per_sample_loss_in_the_targets_dtype():
    F = torch.tensor([[1.0, 2.0], [0.0, 0.5]], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0], [1.0, 0.5]])
    weighted, raw = MeanFlow(adaptive_p=1.0, adaptive_c=1.0).per_sample_loss(F, target)
    assert raw.dtype == torch.float32 and weighted.dtype == torch.float32
    assert raw.tolist() == [5.0, 1.0] and weighted.tolist() == pytest.approx([5.0 / 6.0, 0.5], rel=1e-7)


def test_a_model_without_forward_ad_names_objective_meanflow():
    x, t = torch.randn(2, 4), torch.tensor([0.5, 0.7])
    with pytest.raises(ForwardADError, match=r"\(torch.func.jvp\), which objective=meanflow needs: "):
        MeanFlow().average_velocity_target(LegacyOpNet(), x, t, torch.zeros(2), None, torch.randn(2, 4))


@pytest.mark.parametrize("n", [1, 3])
def test_loss_logs_mse_per_element_and_grad_rows(n):
    """loss/mse = mean over rows of ‖F − target‖² / (elements per row), by hand; one row works; one grad row per
    sample."""
    net, model, batch = probe_case(n=n)
    obj = MeanFlow(equal_time_ratio=0.5, adaptive_p=1.0, adaptive_c=1e-3)
    torch.manual_seed(8)
    loss, logs = obj.loss(model, None, batch, step=0)
    x_t, t, tt = model.inputs
    tb = t[:, None, None, None]
    v = (x_t - batch.x) / tb
    F, dudt = time_derivative_by_hand(net, x_t, t, tt, batch.cond, v)
    per_sample = (F - (v - (tb - tt[:, None, None, None]) * dudt)).pow(2).flatten(1).sum(dim=1)
    assert logs["loss/mse"].item() == pytest.approx((per_sample / 16).mean().item(), rel=1e-9)
    assert loss.item() == pytest.approx((per_sample / (per_sample + 1e-3)).mean().item(), rel=1e-9)
    assert (logs["nfe/rows_grad"], logs["nfe/calls_grad"], logs["nfe/rows_nograd"]) == (n, 1, n)


def validate_meanflow(*overrides):
    from fewstep.config.validate import validate

    return validate(compose(["objective=meanflow", *overrides]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.target_step_count=0"], "objective.target_step_count=0 must lie in [1, 8] (1-4 recommended)"),
        (["objective.guidance_scale=0"], "objective.guidance_scale=0.0 must lie in (0, inf) (1 = no CFG-in-training)"),
        (["objective.guidance_interval=[0.5,0.5]"],
         "objective.guidance_interval=[0.5, 0.5] must be [lo, hi] with 0 <= lo < hi <= 1"),
        (["objective.guidance_interval=[0.0,1.5]"],
         "objective.guidance_interval=[0.0, 1.5] must be [lo, hi] with 0 <= lo < hi <= 1"),
        (["objective.guidance_scale=2"],
         "objective.guidance_scale=2.0 / guidance_mix=0.0 use the null condition: set objective.cond_dropout > 0 "
         "(e.g. 0.1) so the network learns it"),
    ],
)  # fmt: skip
def test_meanflow_config_errors_word_for_word(overrides, message):
    from fewstep.config.validate import ConfigError

    with pytest.raises(ConfigError) as err:
        validate_meanflow(*overrides)
    assert str(err.value) == message


def test_cfg_in_training_with_condition_dropout_validates():
    cfg = validate_meanflow("objective.guidance_scale=2", "objective.cond_dropout=0.1")
    assert cfg.objective.guidance_scale == 2.0
    cfg = validate_meanflow("objective.guidance_mix=0.5", "objective.cond_dropout=0.2",
                            "objective.guidance_interval=[0.25,1.0]")  # fmt: skip
    assert list(cfg.objective.guidance_interval) == [0.25, 1.0]
