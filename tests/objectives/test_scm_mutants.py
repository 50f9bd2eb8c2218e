"""sCM (SPEC §11) pinned further with numbers: its options, the warm-up edge, the random draws of a step (the
times, the noise and condition dropout, reproduced from the seed), the dropout masks the JVP replays, the dtypes
the tangent and the loss are formed in, and the config warning a user sees."""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf
from test_meanflow import LegacyOpNet, digits_batch, tiny

from fewstep.data.base import Batch
from fewstep.objectives.jvp import ForwardADError
from fewstep.objectives.scm import SCM, SCMConfig
from fewstep.teachers.rng import RngState

from helpers import compose


def test_defaults_match_the_config_schema_and_options_are_kept():
    obj = SCM()
    got = (obj.target_step_count, obj.time_mu, obj.time_sigma, obj.tangent_norm_c, obj.warmup_steps)
    assert got == (1, -1.0, 1.4, 0.1, 1000)
    assert (obj.cond_dropout, obj.allow_diff2flow) == (0.0, False)
    schema = SCMConfig()
    assert got == (schema.target_step_count, schema.time_mu, schema.time_sigma, schema.tangent_norm_c,
                   schema.warmup_steps)  # fmt: skip
    obj = SCM(target_step_count=3, allow_diff2flow=True, warmup_steps=7)
    assert obj.target_step_count == 3 and obj.allow_diff2flow is True and obj.warmup_steps == 7
    assert SCM(allow_diff2flow=1).allow_diff2flow is True


def test_warmup_over_a_single_step():
    """warmup_steps = 1 is a real (one-step) warm-up: ratio 0 at step 0, 1 from step 1; only <= 0 disables it."""
    obj = SCM(warmup_steps=1)
    assert [obj.warmup(s) for s in (0, 1, 5)] == [0.0, 1.0, 1.0]
    assert SCM(warmup_steps=3).warmup(1) == pytest.approx(1 / 3, abs=1e-15)
    assert SCM(warmup_steps=-2).warmup(0) == 1.0


def test_time_scale_check_needs_the_key_and_defaults_to_silence():
    """A model config without time_scale (a pretrained family) is read as time_scale 1: no warning."""
    obj = {"target_step_count": 1, "time_sigma": 1.4, "tangent_norm_c": 0.1, "warmup_steps": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SCM.check_config(OmegaConf.create({"objective": obj, "model": {"_target_": "some.Model"}}))
        SCM.check_config(OmegaConf.create({"objective": obj, "model": {"time_scale": 1.0}}))
    with pytest.warns(UserWarning, match="model.time_scale=2.0: dF/dt"):
        SCM.check_config(OmegaConf.create({"objective": obj, "model": {"time_scale": 2.0}}))


def test_time_scale_warning_text_points_at_the_caller_of_validate():
    """The whole one-line warning, attributed (stacklevel 3) to the line that called validate(), here."""
    from fewstep.config.validate import validate

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        validate(compose(["objective=scm", "model.time_scale=1000"]))
    ours = [r for r in records if str(r.message).startswith("objective=scm")]
    assert len(ours) == 1
    assert str(ours[0].message) == (
        "objective=scm with model.time_scale=1000.0: dF/dt scales with it and sCM's tangent explodes once the "
        "warm-up ramps in (measured on digits: 1-NFE FD 171 vs 2.55 with 1); pass model.time_scale=1 "
        "(docs/objectives.md)"
    )
    # (under mutation testing a trampoline frame of mutmut's sits between validate() and the check)
    assert ours[0].filename == __file__ or "/mutmut/" in ours[0].filename, ours[0].filename


class LinearNet(torch.nn.Module):
    """``F = W·x + t·u + c`` (float conditions, added to the output): ``dF/dt`` along ``(v, 1, 0)`` is ``W·v + u``.
    Keeps the inputs of its first (grad) call."""

    def __init__(self, dim: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.u = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.inputs: tuple | None = None

    def forward(self, x, t, tt, cond):
        if self.inputs is None:
            self.inputs = (x.detach().clone(), t.detach().clone(), tt.detach().clone(), cond.detach().clone())
        return x @ self.W.T + t[:, None] * self.u + cond


def linear_case(n: int = 6):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    cond = torch.randn(n, 3, generator=g, dtype=torch.float64)
    null = torch.full((n, 3), 100.0, dtype=torch.float64)
    return Batch(x, cond, null)


def scm_loss_by_hand(model, x, cond, t, z, ratio, c):
    """The sCM loss of :class:`LinearNet` at given times and noise, in float64."""
    W, u = model.W.detach(), model.u.detach()
    tb = t[:, None]
    x_t, v = (1 - tb) * x + tb * z, z - x
    F = x_t @ W.T + tb * u + cond
    g = v - F - ratio * tb * (v @ W.T + u)
    norm = g.norm(dim=1)
    g_hat = g / (norm + c)[:, None]
    return g_hat.pow(2).sum(dim=1).mean(), norm


def test_without_condition_dropout_the_step_draws_only_its_times_and_noise():
    """cond_dropout = 0 draws no dropout numbers: t = sigmoid(N(mu, sigma)) and z are the seed's first draws,
    and the loss is the hand-computed one (warm-up ratio 0.25)."""
    batch = linear_case()
    model = LinearNet()
    obj = SCM(time_mu=-0.5, time_sigma=1.2, tangent_norm_c=0.3, warmup_steps=4, cond_dropout=0.0)
    torch.manual_seed(7)
    loss, logs = obj.loss(model, None, batch, step=1)
    torch.manual_seed(7)
    t = torch.sigmoid(torch.randn(6) * 1.2 - 0.5).double()
    z = torch.randn_like(batch.x)
    x_t, t_seen, tt_seen, c_seen = model.inputs
    assert torch.equal(t_seen, t) and tt_seen.eq(0).all() and torch.equal(c_seen, batch.cond)
    assert torch.allclose(x_t, (1 - t[:, None]) * batch.x + t[:, None] * z, rtol=0, atol=1e-15)
    expected, norm = scm_loss_by_hand(model, batch.x, batch.cond, t, z, ratio=0.25, c=0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert logs["loss/warmup"] == 0.25
    assert logs["loss/tangent_norm"].item() == pytest.approx(norm.mean().item(), rel=1e-12)
    assert torch.equal(logs["times"][0], t)


def test_condition_dropout_drops_the_rows_whose_uniform_is_below_the_rate():
    """A row takes the null condition iff u < cond_dropout (u the seed's first uniform draws, strictly: the row
    whose u equals the rate keeps its condition); the times and noise come after."""
    batch = linear_case()
    torch.manual_seed(3)
    u = torch.rand(6)
    rate = sorted(u.tolist())[3]  # the 4th smallest: three rows below it, the rate itself, two above
    model = LinearNet()
    obj = SCM(cond_dropout=rate, tangent_norm_c=0.1, warmup_steps=0)
    torch.manual_seed(3)
    loss, _ = obj.loss(model, None, batch, step=0)
    torch.manual_seed(3)
    dropped = torch.rand(6) < rate
    t = torch.sigmoid(torch.randn(6) * 1.4 - 1.0).double()
    z = torch.randn_like(batch.x)
    assert dropped.sum().item() == 3 and not dropped[u == rate].any()
    cond = torch.where(dropped[:, None], batch.null_cond, batch.cond)
    assert torch.equal(model.inputs[3], cond)
    assert torch.equal(model.inputs[1], t)
    expected, _ = scm_loss_by_hand(model, batch.x, cond, t, z, ratio=1.0, c=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_full_condition_dropout_trains_only_the_null_condition():
    batch = linear_case(4)
    model = LinearNet()
    torch.manual_seed(0)
    SCM(cond_dropout=1.0).loss(model, None, batch, step=0)
    assert torch.equal(model.inputs[3], batch.null_cond)


class _Stop(Exception):
    pass


def test_condition_dropout_stays_on_the_data_device():
    """The dropout mask is moved to the batch's device (the meta device here stands in for an accelerator), so
    the student sees times and conditions on it."""
    seen = {}

    def student(x, t, tt, cond):
        seen.update(x=x.device.type, t=t.device.type, cond=cond.device.type)
        raise _Stop

    meta = torch.empty(4, 3, device="meta")
    batch = Batch(meta, torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta"))
    with pytest.raises(_Stop):
        SCM(cond_dropout=0.5).loss(student, None, batch, step=0)
    assert seen == {"x": "meta", "t": "meta", "cond": "meta"}


def test_the_jvp_replays_the_grad_pass_dropout_masks():
    """With active dropout, F and dF/dt are of one function: the JVP starts from the RNG state the grad pass
    started from. Independent computation: every pass from that one state, the JVP by torch.func.jvp, the loss by
    hand. The generator ends where the grad pass left it."""
    model = tiny(dropout=0.3, seed=1)
    model.train()
    raw = digits_batch(n=6)
    batch = Batch(raw.x.double(), raw.cond, raw.null_cond)
    obj = SCM(tangent_norm_c=0.1, warmup_steps=0)
    torch.manual_seed(4)
    got, _ = obj.loss(model, None, batch, step=0)
    after = torch.get_rng_state()

    torch.manual_seed(4)
    t = torch.sigmoid(torch.randn(6) * 1.4 - 1.0).double()
    z = torch.randn_like(batch.x)
    tb = t[:, None, None, None]
    x_t, v, tt = (1 - tb) * batch.x + tb * z, z - batch.x, torch.zeros_like(t)
    rng = RngState.capture()

    def masked(x, a):
        rng.restore()
        return model(x, a, tt, batch.cond)

    with torch.no_grad():
        F, dFdt = torch.func.jvp(masked, (x_t, t), (v, torch.ones_like(t)))
        one_pass = torch.get_rng_state()
        g = v - F - tb * dFdt
        norm = g.flatten(1).norm(dim=1)
        expected = (g / (norm + 0.1)[:, None, None, None]).pow(2).flatten(1).sum(1).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    assert torch.equal(after, one_pass)


def test_a_model_without_forward_ad_names_objective_scm():
    with pytest.raises(ForwardADError, match=r"\(torch.func.jvp\), which objective=scm needs: "):
        SCM().loss(LegacyOpNet(), None, Batch(torch.randn(2, 4), None, None), step=0)


@pytest.mark.parametrize("wide", ["F", "dFdt", "t"])
def test_tangent_is_formed_in_the_wide_dtype_of_v(wide):
    """v float32 fixes the dtype (float32): a float64 F, dF/dt or t is cast down, not promoted to."""
    g = torch.Generator().manual_seed(0)
    parts = {k: torch.randn(3, 4, generator=g, dtype=torch.float64) for k in ("F", "dFdt", "v")}
    parts["t"] = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    args = {k: (val if k == wide else val.float()) for k, val in parts.items()}
    g_hat, norm = SCM(tangent_norm_c=0.1).tangent(args["F"], args["dFdt"], args["v"], args["t"], ratio=0.5)
    assert g_hat.dtype == torch.float32 and norm.dtype == torch.float32
    ref = {k: val.float().double() for k, val in parts.items()}
    g_ref = ref["v"] - ref["F"] - 0.5 * ref["t"][:, None] * ref["dFdt"]
    n_ref = g_ref.norm(dim=1)
    assert torch.allclose(norm.double(), n_ref, rtol=1e-6, atol=0)
    assert torch.allclose(g_hat.double(), g_ref / (n_ref + 0.1)[:, None], rtol=1e-6, atol=1e-7)


def test_tangent_of_bfloat16_inputs_is_float32():
    F, dFdt = torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16)
    v = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    g, norm = SCM(tangent_norm_c=0.0).tangent(F, dFdt, v, torch.tensor([0.5, 0.5], dtype=torch.bfloat16), 0.0)
    assert g.dtype == torch.float32 and norm.dtype == torch.float32
    assert norm.tolist() == pytest.approx([5.0, 3**0.5], rel=1e-6)


def test_bfloat16_v_does_not_round_float32_times():
    """v in bfloat16 (bf16 data) with float32 times: t = 0.3 enters the tangent as float32, not rounded to
    bfloat16 (0.30078125, an error of 8e-4·dF/dt)."""
    v = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.bfloat16)
    F, dFdt = torch.zeros(1, 3), torch.tensor([[10.0, 20.0, -30.0]])
    g, _ = SCM(tangent_norm_c=0.0).tangent(F, dFdt, v, torch.tensor([0.3]), ratio=1.0)
    t = torch.tensor(0.3).double()  # the float32 0.3, widened
    expected = v.double() - t * dFdt.double()
    assert torch.allclose(g.double(), expected, rtol=1e-6, atol=1e-6)


class WideOutput(torch.nn.Module):
    """A float64 head on float32 inputs: ``F = (W·x)·(1 + t)`` returned in float64."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor([[1.0, 0.5], [-0.25, 2.0]], dtype=torch.float64))

    def forward(self, x, t, tt, cond):
        return (x.double() @ self.W.T) * (1 + t.double()[:, None])


def test_loss_is_formed_in_the_targets_dtype_whatever_the_network_returns():
    """Float32 data: the loss is float32 even when the network answers in float64 (cast down, not promoted)."""
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]])
    model = WideOutput()
    obj = SCM(tangent_norm_c=0.2, warmup_steps=0)
    torch.manual_seed(1)
    loss, _ = obj.loss(model, None, Batch(x, None, None), step=0)
    assert loss.dtype == torch.float32
    torch.manual_seed(1)
    t = torch.sigmoid(torch.randn(3) * 1.4 - 1.0).double()
    z = torch.randn_like(x).double()
    tb, W = t[:, None], model.W.detach()
    x_t, v = (1 - tb) * x.double() + tb * z, z - x.double()
    g = v - (x_t @ W.T) * (1 + tb) - tb * ((v @ W.T) * (1 + tb) + x_t @ W.T)
    expected = (g / (g.norm(dim=1) + 0.2)[:, None]).pow(2).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
