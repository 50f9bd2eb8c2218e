"""MeanFlow (SPEC §11) and the shared JVP machinery, pinned with numbers."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.base import Batch
from fewstep.errors import FewstepError
from fewstep.models.tiny import TinyMLP
from fewstep.objectives.base import EvalCounter
from fewstep.objectives.jvp import ForwardADError, time_derivative
from fewstep.objectives.meanflow import MeanFlow, adaptive_weight, squared_norm

from helpers import FAST, compose


class GaussianMeanFlow(torch.nn.Module):
    """The exact average velocity of Gaussian data ``x ~ N(mu, s²I)`` on the straight path.

    The probability-flow ODE of a Gaussian is affine: ``x_t = m(t) + σ(t)·η`` with ``m = (1 − t)·mu`` and
    ``σ² = (1 − t)²s² + t²``, so ``x_tt = m(tt) + σ(tt)/σ(t)·(x_t − m(t))`` and the average velocity over
    ``[tt, t]`` is ``(x_t − x_tt)/(t − tt)``; at ``tt = t`` it is the marginal velocity
    ``m'(t) + σ'(t)/σ(t)·(x_t − m(t))``."""

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def sigma(self, t):
        return ((1 - t) ** 2 * self.s**2 + t**2).sqrt()

    def velocity(self, x, t):
        t = t[:, None]
        dsigma = (-(1 - t) * self.s**2 + t) / self.sigma(t)
        return -self.mu + dsigma / self.sigma(t) * (x - (1 - t) * self.mu)

    def forward(self, x, t, tt, cond):
        equal = (t == tt)[:, None]
        t_, tt_ = t[:, None], tt[:, None]
        x_tt = (1 - tt_) * self.mu + self.sigma(tt_) / self.sigma(t_) * (x - (1 - t_) * self.mu)
        gap = torch.where(equal, torch.ones_like(t_), t_ - tt_)
        return torch.where(equal, self.velocity(x, t), (x - x_tt) / gap)


def gaussian_case(n=64, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)[:dim]
    model = GaussianMeanFlow(mu, s=0.7)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    tt = t * torch.rand(n, generator=g, dtype=torch.float64)
    tt[::4] = t[::4]  # the tt = t rows
    tt[1] = 0.0
    t[1] = 1.0  # the one-step jump
    x = mu + 0.7 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    return model, x_t, t, tt


def test_meanflow_target_on_gaussian_data_has_zero_residual():
    """With the exact average velocity as the network and the marginal velocity as v, the MeanFlow target
    ``v − (t − tt)·df/dt`` equals the network's output: the identity MeanFlow trains on holds exactly."""
    model, x_t, t, tt = gaussian_case()
    v = model.velocity(x_t, t)
    target = MeanFlow().average_velocity_target(model, x_t, t, tt, None, v)
    assert target.dtype == torch.float64
    residual = (target - model(x_t, t, tt, None)).abs().max().item()
    assert residual < 1e-10
    # a wrong model (the instantaneous velocity used as the average) does not satisfy it
    wrong = MeanFlow().average_velocity_target(lambda x, a, b, c: model.velocity(x, a), x_t, t, tt, None, v)
    assert (wrong - model(x_t, t, tt, None)).abs().max().item() > 0.1


def test_conditional_velocity_target_is_unbiased_on_gaussian_data():
    """Training uses v = z − x, not the marginal velocity; the target is linear in v, so averaging the
    conditional v over (x, z) given x_t recovers the exact average velocity (Monte Carlo, 4 sigma)."""
    model, _, _, _ = gaussian_case()
    g = torch.Generator().manual_seed(1)
    n = 200_000
    mu = model.mu
    x = mu + 0.7 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.full((n,), 0.6, dtype=torch.float64)
    tt = torch.full((n,), 0.2, dtype=torch.float64)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    target = MeanFlow().average_velocity_target(model, x_t, t, tt, None, z - x)
    residual = target - model(x_t, t, tt, None)  # its mean over all x_t is E[E[residual | x_t]] = 0
    stderr = residual.std(dim=0) / n**0.5
    assert (residual.mean(dim=0).abs() < 4 * stderr).all()


def tiny(dropout=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = TinyMLP([1, 4, 4], num_classes=3, width=32, depth=2, emb_dim=16, dropout=dropout, time_pair=True)
    for p in model.parameters():  # the zero-initialised output layers would make every derivative 0
        torch.nn.init.normal_(p, std=0.3)
    return model.to(dtype)


class SmoothNet(torch.nn.Module):
    """A float64 network of x, t and tt (TinyMLP's Fourier features are float32, too coarse for FD)."""

    def __init__(self, dim=16, width=32):
        super().__init__()
        self.inp = torch.nn.Linear(dim + 2, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, dim)
        self.label = torch.nn.Embedding(4, width)

    def forward(self, x, t, tt, cond):
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None], tt[:, None]], dim=1)) + self.label(cond))
        return self.out(torch.nn.functional.silu(self.hidden(h)) * (1 + t[:, None])).reshape(x.shape)


def test_jvp_equals_central_finite_differences():
    torch.manual_seed(0)
    model = SmoothNet().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    dx = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.99], dtype=torch.float64)
    tt = torch.tensor([0.1, 0.5, 0.0, 0.2, 0.0], dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 3, 1])
    out, dfdt = time_derivative(model, x, t, tt, cond, dx)
    assert torch.equal(out, model(x, t, tt, cond))
    eps = 1e-5
    with torch.no_grad():
        fd = (model(x + eps * dx, t + eps, tt, cond) - model(x - eps * dx, t - eps, tt, cond)) / (2 * eps)
    assert (dfdt - fd).abs().max().item() < 1e-8
    assert dfdt.abs().max().item() > 0.1


class Attention(torch.nn.Module):
    """One self-attention layer through ``scaled_dot_product_attention`` (CPU flash has no forward AD)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)
        self.time = torch.nn.Linear(2, 4)

    def forward(self, x, t, tt, cond):
        h = x.reshape(x.shape[0], 4, 4) + self.time(torch.stack([t, tt], dim=-1))[:, None]
        q, k, v = self.qkv(h).reshape(x.shape[0], 4, 3, 2, 2).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(x.shape)


def test_attention_runs_under_forward_ad_on_the_math_backend():
    torch.manual_seed(0)
    model = Attention()
    x, t, tt = torch.randn(3, 16), torch.rand(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="forward AD"):  # what the math backend avoids
        torch.func.jvp(lambda a: model(a, t, tt, None), (x,), (x,))
    _, dfdt = time_derivative(model, x, t, tt, None, torch.randn_like(x))
    assert torch.isfinite(dfdt).all() and dfdt.abs().max() > 0


class NoForwadADOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class LegacyOpNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, tt, cond):
        return NoForwadADOp.apply(self.lin(x))


def test_a_model_without_forward_ad_gets_one_line_naming_the_fix():
    with pytest.raises(ForwardADError) as err:
        time_derivative(LegacyOpNet(), torch.randn(2, 4), torch.rand(2), torch.zeros(2), None,
                        torch.randn(2, 4), objective="objective=meanflow")  # fmt: skip
    message = str(err.value)
    assert isinstance(err.value, FewstepError) and "\n" not in message
    assert message.startswith("LegacyOpNet cannot run under forward-mode AD (torch.func.jvp), which objective=meanflow")
    assert "setup_context and jvp" in message and "objective=twinflow" in message


def digits_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    cond = torch.randint(0, 3, (n,), generator=g)
    return Batch(x, cond, torch.full((n,), 3))


def test_batched_loss_equals_unbatched():
    """Each row's loss depends on that row only: the batch mean equals the mean of one-row losses."""
    model = tiny(dtype=torch.float32)
    obj = MeanFlow(equal_time_ratio=0.5, guidance_scale=2.0, guidance_mix=0.3, cond_dropout=0.25)
    torch.manual_seed(5)
    inp = obj.sample_inputs(digits_batch())
    v = obj.guided_velocity(model, inp, EvalCounter())
    assert inp["dropped"].any() and (inp["t"] == inp["tt"]).any() and (inp["t"] > inp["tt"]).any()
    F = model(inp["x_t"], inp["t"], inp["tt"], inp["cond"])
    target = obj.average_velocity_target(model, inp["x_t"], inp["t"], inp["tt"], inp["cond"], v)
    batched, _ = obj.per_sample_loss(F, target)
    rows = []
    for i in range(len(F)):
        one = {k: (val[i : i + 1] if isinstance(val, torch.Tensor) else val) for k, val in inp.items()}
        one["null"] = inp["null"][i : i + 1]
        v_i = obj.guided_velocity(model, one, EvalCounter())
        F_i = model(one["x_t"], one["t"], one["tt"], one["cond"])
        target_i = obj.average_velocity_target(model, one["x_t"], one["t"], one["tt"], one["cond"], v_i)
        rows.append(obj.per_sample_loss(F_i, target_i)[0])
    assert torch.allclose(batched, torch.cat(rows), rtol=1e-5, atol=1e-6)


def test_guided_velocity_formula_and_interval():
    """ṽ = ω·v + κ·f(c) + (1 − ω − κ)·f(∅) on rows inside the interval that kept their condition."""

    def model(x, t, tt, cond):
        assert torch.equal(t, tt)
        return torch.where((cond == 9)[:, None], torch.full_like(x, 10.0), torch.full_like(x, 1.0))

    obj = MeanFlow(guidance_scale=2.0, guidance_mix=0.5, guidance_interval=(0.2, 0.8), cond_dropout=0.1)
    inp = {
        "v": torch.full((4, 2), 3.0), "t": torch.tensor([0.5, 0.5, 0.1, 0.9]), "x_t": torch.zeros(4, 2),
        "cond": torch.tensor([1, 9, 1, 1]), "null": torch.full((4,), 9), "dropped": torch.tensor([0, 1, 0, 0]).bool(),
    }  # fmt: skip
    counter = EvalCounter(batch=4)
    v = obj.guided_velocity(model, inp, counter)
    assert v[0].tolist() == [2 * 3 + 0.5 * 1 + (1 - 2 - 0.5) * 10] * 2  # -8.5
    assert v[1:].eq(3.0).all()  # dropped row, t below and above the interval
    assert counter.rows_nograd == 2  # one batched cond + null pass on the single guided row


def test_time_pairs_are_sorted_logit_normal_with_the_equal_fraction():
    torch.manual_seed(0)
    obj = MeanFlow(time_mu=-0.4, time_sigma=1.0, equal_time_ratio=0.25)
    t, tt = obj.sample_times(20_000, torch.zeros(1))
    assert (tt <= t).all() and (t > 0).all() and (t < 1).all()
    assert abs((t == tt).float().mean().item() - 0.25) < 0.015
    logit = torch.logit(torch.cat([t[t > tt], tt[t > tt]]))
    assert abs(logit.mean().item() + 0.4) < 0.03 and abs(logit.std().item() - 1.0) < 0.03


def test_adaptive_weight_numbers():
    per = torch.tensor([0.0, 1.0, 3.0])
    assert torch.allclose(adaptive_weight(per, 1.0, 1e-3) * per, torch.tensor([0.0, 1 / 1.001, 3 / 3.001]))
    assert torch.allclose(adaptive_weight(per, 0.5, 1.0), torch.tensor([1.0, 2**-0.5, 0.5]))
    assert torch.equal(adaptive_weight(per, 0.0, 1e-3), torch.ones(3))
    assert squared_norm(torch.ones(2, 3, 4)).tolist() == [12.0, 12.0]


class OutputProbe(torch.nn.Module):
    """``net`` plus a zero offset of the output's full shape: the offset's gradient is d loss/d output of the grad
    pass (the JVP sees the offset as a constant, so dF/dt is ``net``'s). Keeps the grad pass's (first call's) inputs."""

    def __init__(self, net: torch.nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.net = net
        self.offset = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        self.inputs: tuple | None = None

    def forward(self, x, t, tt, cond):
        if self.inputs is None:
            self.inputs = (x.detach().clone(), t.detach().clone(), tt.detach().clone())
        return self.net(x, t, tt, cond) + self.offset


def probe_case(n=6, seed=0):
    """A float64 SmoothNet under an :class:`OutputProbe`, and a batch of n rows for it."""
    torch.manual_seed(seed)
    net = SmoothNet().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return net, OutputProbe(net, tuple(x.shape)), Batch(x, torch.arange(n) % 4, torch.zeros(n, dtype=torch.long))


def time_derivative_by_hand(net, x_t, t, tt, cond, v):
    """``(f, df/dt)`` along ``(v, 1, 0)`` by torch.func.jvp (the independent computation)."""
    with torch.no_grad():
        return torch.func.jvp(lambda x, a: net(x, a, tt, cond), (x_t, t), (v, torch.ones_like(t)))


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_loss_gradient_holds_the_adaptive_weight_constant(p):
    """d loss/dF = 2·w·(F − target)/B with w = 1/(‖F − target‖² + c)^p a constant (stop-gradient). Through w,
    d(w·L)/dL would be w·(1 − p·L/(L + c)): at p = 1 the gradient nearly vanishes (c/(L + c) < 1e-3 of it here,
    every L > 1). Independent computation: v = (x_t − x)/t from the grad pass's inputs, the JVP by torch.func.jvp."""
    net, model, batch = probe_case()
    obj = MeanFlow(equal_time_ratio=0.5, adaptive_p=p, adaptive_c=1e-3)
    torch.manual_seed(2)
    loss, _ = obj.loss(model, None, batch, step=0)
    loss.backward()
    x_t, t, tt = model.inputs
    assert (t == tt).any() and (t > tt).any()
    tb = t[:, None, None, None]
    v = (x_t - batch.x) / tb
    F, dudt = time_derivative_by_hand(net, x_t, t, tt, batch.cond, v)
    delta = F - (v - (tb - tt[:, None, None, None]) * dudt)
    per_sample = delta.pow(2).flatten(1).sum(dim=1)
    w = 1 / (per_sample + 1e-3) ** p
    assert per_sample.min().item() > 1  # w·L far from L: the weight matters
    assert loss.item() == pytest.approx((w * per_sample).mean().item(), rel=1e-9)
    expected = 2 * w[:, None, None, None] * delta / len(w)
    assert torch.allclose(model.offset.grad, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.equal_time_ratio=1.5", "objective.equal_time_ratio=1.5 must lie in [0, 1]"),
        ("objective.adaptive_p=-1", "objective.adaptive_p=-1.0 must lie in [0, inf)"),
        ("objective.adaptive_c=0", "objective.adaptive_c=0.0 must lie in (0, inf)"),
        ("objective.time_sigma=0", "objective.time_sigma=0.0 must lie in (0, inf)"),
        ("objective.target_step_count=0", "objective.target_step_count=0 must lie in [1, 8]"),
        ("objective.guidance_scale=0", "objective.guidance_scale=0.0 must lie in (0, inf)"),
        ("objective.guidance_mix=1", "objective.guidance_mix=1.0 must lie in [0, 1)"),
        ("objective.guidance_interval=[0.5,0.2]", "objective.guidance_interval=[0.5, 0.2] must be [lo, hi]"),
        ("objective.guidance_scale=2", "set objective.cond_dropout > 0"),
    ],
)
def test_bad_meanflow_options_fail_in_one_line(override, message):
    from fewstep.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["objective=meanflow", override]))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_meanflow_trains_two_steps_on_digits(tmp_path):
    from fewstep.training.loop import train

    summary = train(compose(["objective=meanflow", "trainer.max_steps=2", "data.batch_size=16", *FAST,
                             "objective.guidance_scale=1.5", "objective.cond_dropout=0.1"]),
                    run_dir=tmp_path / "run")  # fmt: skip
    assert summary["steps"] == 2 and summary["objective"] == "MeanFlow"
    assert summary["nfe/rows_grad"] == 16 and summary["nfe/calls_nograd"] == 2  # guidance + jvp
    assert torch.isfinite(torch.tensor(summary["loss/main"]))


def test_guided_target_under_dropout_is_one_function_with_the_grad_and_jvp_passes():
    """CFG-in-training with active dropout: ṽ = ω·v + κ·f(c) + (1 − ω − κ)·f(∅) assumes one function, so the
    cond and null passes, the grad pass and the JVP all draw one set of dropout masks (each from the state
    captured before the grad pass, on the whole batch, row for row). Independent computation here: every pass
    from one RNG state, the JVP by torch.func.jvp, the loss by hand (p = 0). One batched cond/null forward on
    the guided rows drew other masks (and the grad pass and JVP others again): loss 6.723e5 against 1.045e6."""
    from fewstep.teachers.rng import RngState

    model = tiny(dropout=0.3, seed=3)
    model.train()
    obj = MeanFlow(equal_time_ratio=0.5, guidance_scale=2.0, guidance_mix=0.3, cond_dropout=0.25, adaptive_p=0.0)
    batch = digits_batch()
    batch = Batch(batch.x.double(), batch.cond, batch.null_cond)
    torch.manual_seed(5)
    got, logs = obj.loss(model, None, batch, 0)
    after = torch.get_rng_state()

    torch.manual_seed(5)
    inp = obj.sample_inputs(batch)
    x_t, t, tt, cond, v = inp["x_t"], inp["t"], inp["tt"], inp["cond"], inp["v"]
    rows = ~inp["dropped"]
    assert rows.any() and not rows.all()
    rng = RngState.capture()

    def masked(x, a, b, c):  # the network under the one set of masks
        rng.restore()
        return model(x, a, b, c)

    with torch.no_grad():
        f_c, f_n = masked(x_t, t, t, cond), masked(x_t, t, t, inp["null"])
        w, k = obj.guidance_scale, obj.guidance_mix
        guided = torch.where(rows[:, None, None, None], w * v + k * f_c + (1 - w - k) * f_n, v)
        _, dudt = torch.func.jvp(lambda x, a: masked(x, a, tt, cond), (x_t, t), (guided, torch.ones_like(t)))
    F = masked(x_t, t, tt, cond)
    expected = (F - (guided - (t - tt)[:, None, None, None] * dudt)).pow(2).flatten(1).sum(1).mean()
    assert abs(got.item() - expected.item()) < 1e-9 * expected.item()
    assert torch.equal(torch.get_rng_state(), after)  # the teacher-side passes leave the generator as one pass
    assert logs["nfe/rows_nograd"] == 2 * 8 + 8  # whole-batch cond and null passes, then the JVP


def test_the_time_gap_of_bf16_times_is_taken_in_float32():
    """``t − tt`` is widened before the difference: in bf16, 0.99609375 − 0.0029296875 rounds to 0.9921875 (0.1 %
    off), which the ``(t − tt)·df/dt`` term would carry."""

    def model(x, t, tt, cond):  # df/dt = 3 exactly
        return x * 0 + 3.0 * t[:, None].to(x.dtype)

    t = torch.tensor([0.99609375], dtype=torch.bfloat16)
    tt = torch.tensor([0.0029296875], dtype=torch.bfloat16)
    x_t, v = torch.zeros(1, 2, dtype=torch.bfloat16), torch.ones(1, 2, dtype=torch.bfloat16)
    target = MeanFlow().average_velocity_target(model, x_t, t, tt, None, v)
    assert target.dtype == torch.float32
    expected = 1.0 - (0.99609375 - 0.0029296875) * 3.0  # -1.9794921875, exact in float32
    assert torch.equal(target, torch.full((1, 2), expected))
    assert float((t - tt).float()) != 0.99609375 - 0.0029296875  # the bf16 difference would be off
