"""sCM in flow form (SPEC §11): its tangent is MeanFlow's at tt = 0, zero for an exact consistency model,
normalised and warmed up as sCM does."""

from __future__ import annotations

import pytest
import torch
from test_meanflow import SmoothNet, gaussian_case, probe_case, time_derivative_by_hand

from fewstep.objectives.jvp import time_derivative
from fewstep.objectives.meanflow import MeanFlow
from fewstep.objectives.scm import SCM

from helpers import FAST, compose


def test_tangent_is_zero_for_the_exact_consistency_model_of_gaussian_data():
    """F = the exact average velocity down to 0 makes g = x_t − t·F the PF-ODE's end point: dg/dt = 0."""
    model, x_t, t, _ = gaussian_case()
    tt = torch.zeros_like(t)
    v = model.velocity(x_t, t)
    F, dFdt = time_derivative(model, x_t, t, tt, None, v)
    g, norm = SCM(tangent_norm_c=0.0).tangent(F, dFdt, v, t, ratio=1.0)
    assert norm.max().item() < 1e-10
    # and with the instantaneous velocity as F (a flow-matching model) it is not
    inst = model.velocity(x_t, t)
    _, d_inst = time_derivative(lambda x, a, b, c: model.velocity(x, a), x_t, t, tt, None, v)
    assert SCM(tangent_norm_c=0.0).tangent(inst, d_inst, v, t, 1.0)[1].max().item() > 0.1


def test_unnormalised_target_is_meanflow_at_target_time_zero():
    torch.manual_seed(0)
    model = SmoothNet().double()
    x_t, v = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t, tt, cond = torch.rand(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), torch.arange(6) % 4
    F, dFdt = time_derivative(model, x_t, t, tt, cond, v)
    g, _ = SCM(tangent_norm_c=0.0).tangent(F, dFdt, v, t, ratio=1.0)
    meanflow = MeanFlow().average_velocity_target(model, x_t, t, tt, cond, v)
    assert (F + g - meanflow).abs().max().item() < 1e-12
    # warm-up start (ratio 0): the target is v, plain flow matching
    g0, _ = SCM(tangent_norm_c=0.0).tangent(F, dFdt, v, t, ratio=0.0)
    assert (F + g0 - v).abs().max().item() < 1e-12


def test_normalisation_and_warmup_numbers():
    F, dFdt = torch.zeros(2, 3), torch.ones(2, 3)
    v = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([0.5, 0.5])
    g, norm = SCM(tangent_norm_c=0.1).tangent(F, dFdt, v, t, ratio=0.0)
    assert torch.allclose(norm, torch.tensor([5.0, 0.0]))
    assert torch.allclose(g[0], torch.tensor([3.0, 4.0, 0.0]) / 5.1) and g[1].eq(0).all()
    _, norm_half = SCM(tangent_norm_c=0.1).tangent(F, dFdt, v, t, ratio=0.5)  # g = v − 0.25
    assert torch.allclose(norm_half, torch.tensor([(2.75**2 + 3.75**2 + 0.25**2) ** 0.5, (3 * 0.25**2) ** 0.5]))
    obj = SCM(warmup_steps=100)
    assert [obj.warmup(s) for s in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert SCM(warmup_steps=0).warmup(0) == 1.0


def test_loss_gradient_is_the_normalised_tangent():
    """d loss/dF = −2·ĝ/B per row: the update moves F along the normalised tangent ĝ = g/(‖g‖ + c), with
    g = v − F − r·t·dF/dt (r = warm-up ratio). The loss value ‖ĝ‖² is blind to the target's sign; its gradient is
    not (F − sg(F − ĝ) gives +2·ĝ/B). Independent computation: v = (x_t − x)/t from the grad pass's inputs, the
    JVP by torch.func.jvp."""
    net, model, batch = probe_case(n=4)
    obj = SCM(tangent_norm_c=0.1, warmup_steps=4)
    torch.manual_seed(3)
    loss, logs = obj.loss(model, None, batch, step=2)  # warm-up ratio 0.5
    assert logs["nfe/rows_grad"] == 4 and logs["nfe/rows_nograd"] == 4 and logs["loss/warmup"] == 0.5
    loss.backward()
    x_t, t, tt = model.inputs
    assert tt.eq(0).all()
    tb = t[:, None, None, None]
    v = (x_t - batch.x) / tb
    F, dFdt = time_derivative_by_hand(net, x_t, t, tt, batch.cond, v)
    g = v - F - 0.5 * tb * dFdt
    norm = g.flatten(1).norm(dim=1)
    g_hat = g / (norm + 0.1)[:, None, None, None]
    assert torch.allclose(model.offset.grad, -2 * g_hat / 4, rtol=1e-8, atol=1e-12)
    assert loss.item() == pytest.approx(g_hat.pow(2).flatten(1).sum(dim=1).mean().item(), rel=1e-9)
    assert torch.allclose(logs["loss/tangent_norm"], norm.mean(), rtol=1e-9)
    assert 0 < 4 * loss.item() < 4  # each row contributes ‖ĝ/(‖ĝ‖ + c)‖² < 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.tangent_norm_c=-0.1", "objective.tangent_norm_c=-0.1 must lie in [0, inf) (0 = no normalisation)"),
        ("objective.warmup_steps=-1", "objective.warmup_steps=-1 must lie in [0, inf) (0 = no warm-up)"),
        ("objective.time_sigma=-1", "objective.time_sigma=-1.0 must lie in (0, inf)"),
        ("objective.target_step_count=9", "objective.target_step_count=9 must lie in [1, 8]"),
    ],
)
def test_bad_scm_options_fail_in_one_line(override, message):
    from fewstep.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["objective=scm", override]))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_scm_trains_two_steps_on_digits(tmp_path):
    from fewstep.training.loop import train

    cfg = compose(["objective=scm", "trainer.max_steps=2", "data.batch_size=16", "objective.warmup_steps=1", *FAST])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 2 and summary["objective"] == "SCM"
    assert summary["nfe/rows_grad"] == 16 and summary["nfe/rows_nograd"] == 16
    assert 0 < summary["loss/main"] < 1


def test_a_small_time_scale_tames_the_time_derivative():
    """sCM's instability on TinyMLP: its time features see 1000·t, so dF/dt is ~1000x larger than with
    time_scale=1 (sCM's c_noise(t) = t), which experiment=sweep/objectives gives the scm arm."""
    from fewstep.models.tiny import TinyMLP

    derivatives = {}
    for scale in (1000.0, 1.0):
        torch.manual_seed(0)
        model = TinyMLP([1, 4, 4], num_classes=3, width=32, depth=2, emb_dim=16, time_pair=False, time_scale=scale)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        torch.manual_seed(1)
        x, t = torch.randn(8, 1, 4, 4), torch.rand(8) * 0.8 + 0.1
        _, dFdt = time_derivative(model, x, t, torch.zeros(8), torch.zeros(8, dtype=torch.long), torch.zeros_like(x))
        derivatives[scale] = dFdt.abs().mean().item()
    assert derivatives[1000.0] > 100 * derivatives[1.0]
