"""The pieces every objective shares (fewstep.objectives.base) pinned with numbers: the Barron loss against Barron's
own ρ by its gradient, the dtypes distances and weights are formed in, the loss config in either form, the devices
times are drawn for, the FSDP stand-in row, the network-evaluation counter and the rows it logs per pass (sCM's and
MeanFlow's passes too), and the registration of an objective with its own schema."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_meanflow import digits_batch, tiny

import fewstep.objectives.base as base
import fewstep.training.distributed as distributed
from fewstep.objectives.base import (
    EvalCounter,
    LossConfig,
    Objective,
    barron_distance,
    call_rows,
    l2_distance,
    make_distance,
    sample_time,
    time_weight,
    wide,
)


def barron_rho(x2: torch.Tensor, alpha: float, c: float) -> torch.Tensor:
    """Barron's general robust loss of a residual x (as x², float64): ``|α−2|/α·(((x/c)²/|α−2| + 1)^(α/2) − 1)``,
    ``(x/c)²/2`` at α = 2 (its limit)."""
    if alpha == 2.0:
        return 0.5 * x2 / c**2
    return abs(alpha - 2.0) / alpha * ((x2 / c**2 / abs(alpha - 2.0) + 1.0) ** (alpha / 2.0) - 1.0)


@pytest.mark.parametrize("alpha", [-2.0, 0.5, 1.0, 2.0, 3.0, 4.0])
@pytest.mark.parametrize("c", [0.1, 1e-3])
def test_barron_distance_is_barrons_loss_by_its_gradient(alpha, c):
    """``barron_distance = mse·sg(w)/c`` descends like Barron's ρ at x² = mse: its gradient is 2c·dρ/d(pred)
    (autograd of ρ, float64) and its value is 2c·mse·ρ'(mse). Rows with mse below, at and above c² so the weight
    is neither 1 nor its asymptote."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 3.0, 20.0], dtype=torch.float64)[:, None] * c
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    pred = (target + scales * torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    got = barron_distance(pred, target, alpha=alpha, c=c)
    (grad,) = torch.autograd.grad(got.sum(), pred)

    pred_ref = pred.detach().clone().requires_grad_(True)
    mse = (pred_ref - target).pow(2).mean(dim=1)
    (grad_rho,) = torch.autograd.grad(barron_rho(mse, alpha, c).sum(), pred_ref)
    assert torch.allclose(grad, 2 * c * grad_rho, rtol=1e-10, atol=0)

    s = mse.detach().clone().requires_grad_(True)
    (drho_ds,) = torch.autograd.grad(barron_rho(s, alpha, c).sum(), s)
    assert torch.allclose(got.detach(), 2 * c * s.detach() * drho_ds, rtol=1e-10, atol=0)
    weight = got.detach() / (s.detach() / c)
    assert (weight - 1).abs().min() > 1e-3 or alpha == 2.0  # the weight does something here


def test_l2_distance_dtype_is_the_wider_input_at_least_float32():
    g = torch.Generator().manual_seed(1)
    a64, b64 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    a32, b32 = a64.float(), b64.float()

    def exact(p, t):
        return (p.double() - t.double()).pow(2).mean(dim=1)

    # bf16 inputs: widened to float32 before the difference (bf16 values are exact in float32)
    ab, bb = a64.bfloat16(), b64.bfloat16()
    got = l2_distance(ab, bb)
    assert got.dtype == torch.float32 and torch.equal(got, (ab.float() - bb.float()).pow(2).mean(dim=1))
    # either input in float64 makes the whole computation float64
    for p, t in ((a64, b32), (a32, b64)):
        got = l2_distance(p, t)
        assert got.dtype == torch.float64 and torch.allclose(got, exact(p, t), rtol=1e-15)
    # also a broadcast 0-d operand (a scalar tensor of the wider dtype does not lose to the other's dims)
    zero64 = torch.tensor(0.25, dtype=torch.float64)
    got = l2_distance(a32, zero64)
    assert got.dtype == torch.float64 and torch.allclose(got, exact(a32, zero64.expand(3, 4)), rtol=1e-15)
    got = l2_distance(zero64, a32)
    assert got.dtype == torch.float64 and torch.allclose(got, exact(zero64.expand(3, 4), a32), rtol=1e-15)


def test_wide_and_the_unit_time_weight_are_at_least_float32():
    for dtype, wider in (
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ):
        x = torch.tensor([0.5, -0.25], dtype=dtype)
        assert wide(x).dtype == wider and torch.equal(wide(x).double(), x.double())
        w = time_weight(x, x, "none")
        assert w.dtype == wider and torch.equal(w, torch.ones(2, dtype=wider))
        assert time_weight(x, torch.zeros_like(x), "tan").dtype == wider


def test_make_distance_reads_a_dict_or_an_attribute_config():
    g = torch.Generator().manual_seed(2)
    p, t = torch.randn(3, 4, generator=g) * 0.1, torch.randn(3, 4, generator=g) * 0.1
    assert make_distance(LossConfig(type="l2")) is l2_distance
    assert make_distance({"type": "l2"}) is l2_distance
    expected = barron_distance(p, t, alpha=3.0, c=0.1)
    for cfg in (LossConfig(type="barron", alpha=3.0, c=0.1), {"type": "barron", "alpha": 3.0, "c": 0.1}):
        assert torch.equal(make_distance(cfg)(p, t), expected)
    # both options reach the distance: the defaults (alpha 1, c 1e-3) and each one alone give other numbers
    for alpha, c in ((1.0, 0.1), (3.0, 1e-3), (1.0, 1e-3)):
        assert (barron_distance(p, t, alpha=alpha, c=c) - expected).abs().min() > 1e-3 * expected.abs().max()


def test_make_distance_error_names_the_choices():
    with pytest.raises(ValueError) as err:
        make_distance({"type": "huber"})
    assert str(err.value) == "objective.loss.type='huber' is unknown; use 'l2' or 'barron'"
    with pytest.raises(ValueError) as err:
        make_distance(LossConfig(type="L2"))
    assert str(err.value) == "objective.loss.type='L2' is unknown; use 'l2' or 'barron'"


def test_sample_time_lands_on_the_datas_device_in_its_wide_dtype():
    """Drawn on the CPU generator, then moved: the meta device stands in for an accelerator."""
    t = sample_time(3, (1.0, 1.0, 1.0), torch.empty(2, device="meta"))
    assert t.device.type == "meta" and t.dtype == torch.float32 and t.shape == (3,)
    t = sample_time(3, (1.0, 1.0, 1.0), torch.empty(2, device="meta", dtype=torch.float64))
    assert t.device.type == "meta" and t.dtype == torch.float64
    torch.manual_seed(3)
    t = sample_time(4, (2.0, 3.0, 0.5), torch.zeros(1, dtype=torch.bfloat16))
    torch.manual_seed(3)
    expected = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(3.0)).sample((4,)) * 0.5
    assert t.dtype == torch.float32 and torch.equal(t, expected)


@pytest.fixture
def lockstep(monkeypatch):
    """FSDP's lockstep with a fake all-reduce: ``others`` says whether another process has rows; the flags this
    process contributed are recorded."""
    state = {"others": False, "flags": []}

    def any_process(flag):
        state["flags"].append(flag)
        return bool(flag) or state["others"]

    monkeypatch.setattr(distributed, "lockstep", lambda: True)
    monkeypatch.setattr(distributed, "any_process", any_process)
    return state


def test_call_rows_alone_is_the_rows_or_none():
    rows, none = torch.tensor([False, True, True]), torch.zeros(3, dtype=torch.bool)
    assert call_rows(rows) is rows and call_rows(none) is None


def test_call_rows_in_lockstep_with_local_rows_runs_them(lockstep):
    rows = torch.tensor([False, True, True])
    assert call_rows(rows) is rows
    lockstep["others"] = True
    assert call_rows(rows) is rows
    assert lockstep["flags"] == [True, True]  # this process's flag went into the all-reduce


def test_call_rows_in_lockstep_runs_a_stand_in_row_when_only_another_process_has_rows(lockstep):
    none = torch.zeros(4, dtype=torch.bool)
    assert call_rows(none) is None  # nobody has a row: everyone skips
    lockstep["others"] = True
    run = call_rows(none)
    assert run.dtype == torch.bool and run.tolist() == [True, False, False, False]  # row 0 stands in
    assert not none.any()  # the caller's mask is left alone
    assert lockstep["flags"] == [False, False]


def test_eval_counter_sums_calls_rows_and_each_pass():
    counter = EvalCounter(batch=1)
    counter.add("student", 3, grad=True)
    counter.add("teacher", 4, grad=False)
    counter.add("student", 2, grad=False)
    counter.add("teacher", 1, grad=False)
    assert counter.by_pass == {"student": 5, "teacher": 5}
    assert counter.logs() == {
        "nfe/calls_grad": 1,
        "nfe/calls_nograd": 3,
        "nfe/rows_grad": 3,
        "nfe/rows_nograd": 7,
        "nfe/per_step": 10.0,  # a batch of 1: rows per row
        "nfe/rows/student": 5,
        "nfe/rows/teacher": 5,
    }
    assert EvalCounter().logs() == {  # nothing ran: no pass keys; an unknown batch size counts as 1
        "nfe/calls_grad": 0, "nfe/calls_nograd": 0, "nfe/rows_grad": 0, "nfe/rows_nograd": 0, "nfe/per_step": 0.0,
    }  # fmt: skip
    counter = EvalCounter(batch=0)
    counter.add("x", 3, grad=False)
    assert counter.logs()["nfe/per_step"] == 3.0
    counter = EvalCounter(batch=4)
    counter.add("x", 6, grad=True)
    assert counter.logs()["nfe/per_step"] == 1.5


def pass_rows(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if k.startswith("nfe/rows/")}


def test_scm_logs_the_rows_of_its_grad_pass_and_its_jvp():
    from fewstep.objectives.scm import SCM

    batch = digits_batch(n=5)
    torch.manual_seed(0)
    _, logs = SCM().loss(tiny(dtype=torch.float32), None, batch, 0)
    assert pass_rows(logs) == {"nfe/rows/student": 5, "nfe/rows/jvp": 5}


def test_meanflow_logs_the_rows_of_its_guidance_grad_and_jvp_passes():
    from fewstep.objectives.meanflow import MeanFlow

    batch, model = digits_batch(n=8), tiny(dtype=torch.float32)  # (tiny seeds the generator)
    _, logs = MeanFlow().loss(model, None, batch, 0)
    assert pass_rows(logs) == {"nfe/rows/student": 8, "nfe/rows/jvp": 8}  # no CFG-in-training: no guidance pass
    obj = MeanFlow(guidance_scale=2.0, cond_dropout=0.4)
    torch.manual_seed(4)
    kept = int((~obj.sample_inputs(batch)["dropped"]).sum())
    assert 0 < kept < 8
    torch.manual_seed(4)
    _, logs = obj.loss(model, None, batch, 0)
    # the cond and null passes over the rows that kept their condition (all times lie in the default [0, 1])
    assert pass_rows(logs) == {"nfe/rows/guidance": 2 * kept, "nfe/rows/student": 8, "nfe/rows/jvp": 8}


@dataclasses.dataclass
class _Schema:
    _target_: str = "nowhere.Objective"


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for this test: the objectives defined here do not outlive it."""
    monkeypatch.setattr(base, "_REGISTERED", dict(base._REGISTERED))
    return base


def test_a_subclass_with_its_own_schema_is_registered_under_its_name(registry):
    class Mine(Objective):
        name = "zz_mine"
        config_schema = _Schema

    class Shares(Mine):  # inherits the schema (as RCGM shares TwinFlow's): not registered again
        name = "zz_shares"

    class Plain(Objective):  # no schema: not registered, no name needed
        pass

    got = base.registered()
    assert got["zz_mine"] is Mine
    assert "zz_shares" not in got and Plain not in got.values()
    assert got["twinflow"].__name__ == "TwinFlow"  # the package's own are there too


def test_a_schema_without_a_name_is_refused(registry):
    with pytest.raises(TypeError) as err:

        class Nameless(Objective):
            config_schema = _Schema

    assert str(err.value) == (
        "test_a_schema_without_a_name_is_refused.<locals>.Nameless declares config_schema without a name"
    )
    assert "" not in base._REGISTERED
