"""DMD2's pieces pinned one by one with numbers (tests/objectives/test_dmd2.py has the losses as a whole): the
constructor against its config schema, ``check_config``'s messages and edges, which device and dtype each piece
works in, the noise levels each pass draws, the per-pass evaluation counts, and the GAN head's architecture
against a re-implementation."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F_nn
from omegaconf import OmegaConf

import fewstep.objectives.dmd2 as dmd2_module
from fewstep.config.checks import ConfigError
from fewstep.data.base import Batch
from fewstep.objectives.base import EvalCounter, Network
from fewstep.objectives.dmd2 import DMD2, DMD2Config, GanHead

# -- constructor and setup ---------------------------------------------------------------------------------------------


def test_constructor_defaults_are_the_config_schemas_and_every_option_is_kept():
    defaults = {f.name: f.default for f in dataclasses.fields(DMD2Config) if f.name != "_target_"}
    assert defaults == {
        "target_step_count": 1,
        "critic_steps": 5,
        "fake_lr": None,
        "guidance_scale": 1.0,
        "time_min": 0.02,
        "time_max": 0.98,
        "gan": False,
        "gan_weight": 1e-3,
        "gan_critic_weight": 1e-2,
        "allow_diff2flow": False,
    }
    obj = DMD2()
    assert {k: getattr(obj, k) for k in defaults} == defaults
    assert obj.real_score is None  # setup builds it
    given = {
        "target_step_count": 1,
        "critic_steps": 2,
        "fake_lr": 0.002,
        "guidance_scale": 1.5,
        "time_min": 0.1,
        "time_max": 0.9,
        "gan": True,
        "gan_weight": 0.5,
        "gan_critic_weight": 0.25,
        "allow_diff2flow": True,
    }
    obj = DMD2(**given)
    assert {k: getattr(obj, k) for k in given} == given
    assert type(DMD2(fake_lr=1).fake_lr) is float and DMD2(fake_lr=1).fake_lr == 1.0


def test_setup_gives_both_owned_networks_the_fake_lr():
    obj = DMD2(fake_lr=0.002, gan=True)
    obj.setup(torch.nn.Linear(2, 2), SimpleNamespace(shape=(2,)))
    assert obj.networks["fake_score"].lr == 0.002 and obj.networks["gan_head"].lr == 0.002
    obj = DMD2(gan=True)
    obj.setup(torch.nn.Linear(2, 2), SimpleNamespace(shape=(2,)))
    assert obj.networks["fake_score"].lr is None and obj.networks["gan_head"].lr is None  # None = trainer.lr


def test_bind_moves_the_real_score_to_the_fake_scores_device_and_keeps_the_averages():
    obj = DMD2()
    obj.setup(torch.nn.Linear(2, 2))
    assert obj.real_score.weight.device.type == "cpu"
    prepared, average = torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2)
    obj.bind({"fake_score": prepared}, {"fake_score": average})
    assert obj.real_score.weight.device.type == "meta"  # followed the prepared fake score
    assert obj.network("fake_score") is prepared and obj.averages == {"fake_score": average}


# -- check_config ------------------------------------------------------------------------------------------------------


def dmd2_cfg(model=None, trainer=None, **objective):
    fields = {f.name: f.default for f in dataclasses.fields(DMD2Config)}
    trainer = {"init_from": "/runs/fm"} if trainer is None else trainer
    return OmegaConf.create({"objective": {**fields, **objective}, "model": model or {}, "trainer": trainer})


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"critic_steps": 0},
            "objective.critic_steps=0 must lie in [1, inf) (fake-score updates per generator update)",
        ),
        ({"guidance_scale": 0.5}, "objective.guidance_scale=0.5 must lie in [1, inf) (1 = no CFG on the real score)"),
        (
            {"target_step_count": 2},
            "objective.target_step_count=2: DMD2 trains a one-step generator here "
            "(multi-step backward simulation is not implemented); use 1",
        ),
        ({"gan_weight": -1.0}, "objective.gan_weight=-1.0 must lie in [0, inf)"),
        ({"gan_critic_weight": -1.0}, "objective.gan_critic_weight=-1.0 must lie in [0, inf)"),
        ({"fake_lr": 0.0}, "objective.fake_lr=0.0 must lie in (0, inf)"),
        ({"time_min": 0.5, "time_max": 0.5}, "objective.time_min=0.5, time_max=0.5 must satisfy 0 <= min < max <= 1"),
        ({"time_max": 1.5}, "objective.time_min=0.02, time_max=1.5 must satisfy 0 <= min < max <= 1"),
        ({"time_min": -0.1}, "objective.time_min=-0.1, time_max=0.98 must satisfy 0 <= min < max <= 1"),
    ],
)
def test_check_config_messages_word_for_word(options, message):
    with pytest.raises(ConfigError) as err:
        DMD2.check_config(dmd2_cfg(**options))
    assert str(err.value) == message


def test_check_config_accepts_the_edges_of_every_range():
    for options in (
        {"time_min": 0.0},
        {"time_max": 1.0},
        {"time_min": 0.0, "time_max": 1.0},
        {"critic_steps": 1},
        {"guidance_scale": 1.0},
        {"gan_weight": 0.0, "gan_critic_weight": 0.0},
        {"fake_lr": 1e-9},
    ):
        DMD2.check_config(dmd2_cfg(**options))


def test_a_pretrained_model_needs_no_init_from_unless_it_starts_from_random_weights():
    DMD2.check_config(dmd2_cfg(model={"pretrained": "org/model"}, trainer={}))
    DMD2.check_config(dmd2_cfg(model={"pretrained": "org/model", "random_init": False}, trainer={}))
    message = (
        "objective=dmd2 needs a pretrained teacher and this model starts from random weights: set "
        "trainer.init_from=RUN_DIR (a finished run, e.g. objective=flow_matching on the same model and data)"
    )
    for model in ({"pretrained": "org/model", "random_init": True}, {"pretrained": None}, {}):
        with pytest.raises(ConfigError) as err:
            DMD2.check_config(dmd2_cfg(model=model, trainer={}))
        assert str(err.value) == message
    DMD2.check_config(dmd2_cfg(model={"pretrained": "org/model", "random_init": True}))  # init_from is set


# -- generate ----------------------------------------------------------------------------------------------------------


def test_generate_is_z_minus_the_velocity_at_t_1_tt_0_in_zs_dtype():
    seen = []

    def model(z, t, tt, cond):  # a float64 model on float32 samples
        seen.append((t, tt))
        return (2.0 * z + t[:, None] + 3.0 * tt[:, None] + cond[:, None]).double()

    z = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]])
    counter = EvalCounter(batch=2)
    out = DMD2().generate(model, z, torch.tensor([0.0, 10.0]), counter, grad=True)
    assert out.dtype == torch.float32
    assert out.tolist() == [[-2.0, -3.0, -4.0], [-10.0, -11.5, -11.25]]  # z − (2z + 1 + 0 + c)
    assert seen[0][0].tolist() == [1.0, 1.0] and seen[0][1].tolist() == [0.0, 0.0]
    assert (counter.calls_grad, counter.rows_grad, counter.calls_nograd) == (1, 2, 0)
    assert counter.by_pass == {"generator": 2}
    counter = EvalCounter(batch=2)
    DMD2().generate(model, z, torch.zeros(2), counter, grad=False)
    assert (counter.calls_grad, counter.calls_nograd, counter.rows_nograd) == (0, 1, 2)


def devices_asked(monkeypatch, name: str) -> list:
    """Spy on ``torch.<name>``: the device each call asks for ("none" when it names none). Placement on the CPU
    cannot tell a tensor made on the data's device from one made on the default device; the spy can (a meta-device
    run could too, but its first arithmetic costs seconds of imports)."""
    asked, real = [], getattr(torch, name)

    def spy(*args, **kwargs):
        asked.append(kwargs.get("device", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, name, spy)
    return asked


def test_generate_makes_its_times_on_zs_device(monkeypatch):
    asked = devices_asked(monkeypatch, "ones")
    z = torch.zeros(2, 3)
    DMD2().generate(lambda z, t, tt, c: z, z, None, EvalCounter(batch=2), grad=False)
    assert asked == [z.device]


# -- distribution matching ---------------------------------------------------------------------------------------------


class Recorder:
    """A velocity model ``(x_t − target(c))/t`` (data estimate ``target(c)`` at every noise level) that records
    the (t, tt) of every call."""

    def __init__(self, target, dtype=None):
        self.target, self.dtype, self.calls = target, dtype, []

    def __call__(self, x_t, t, tt, cond):
        self.calls.append((t.clone(), tt.clone()))
        v = (x_t - self.target(cond)) / t[:, None]
        return v if self.dtype is None else v.to(self.dtype)


def dmd2_with(real, fake, **options):
    obj = DMD2(**options)
    obj.real_score = real
    obj.networks = {"fake_score": Network(torch.nn.Identity())}
    obj.bound = {"fake_score": fake}
    return obj


def test_noise_levels_of_the_distribution_matching_step_are_uniform_on_time_min_to_time_max():
    real, fake = Recorder(lambda c: 0.0), Recorder(lambda c: 1.0)
    obj = dmd2_with(real, fake, time_min=0.2, time_max=0.6)
    torch.manual_seed(0)
    counter = EvalCounter(batch=4096)
    obj.distribution_matching_loss(torch.zeros(4096, 1, requires_grad=True), torch.zeros(4096), None, counter)
    (t, tt), (t_fake, tt_fake) = real.calls[0], fake.calls[0]
    assert torch.equal(t, t_fake) and torch.equal(tt, t) and torch.equal(tt_fake, t)  # both scores at (t, t)
    assert 0.2 <= t.min() < 0.201 and 0.599 < t.max() <= 0.6
    assert t.mean().item() == pytest.approx(0.4, abs=0.005)
    assert (t < 0.3).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert counter.by_pass == {"real_score": 4096, "fake_score": 4096}  # both without grad
    assert (counter.calls_nograd, counter.rows_nograd, counter.calls_grad) == (2, 8192, 0)


def test_generator_gradient_with_guidance_uses_the_guided_real_estimate():
    """With CFG the real score's data estimate is a_null + g·(a_c − a_null) when its conditional and unconditional
    estimates are the constants a_c and a_null; the gradient is w·(b − that)/N (test_dmd2.py's formula)."""
    a_c, a_null, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 2.0])
    real = Recorder(lambda c: torch.where((c == 9)[:, None], a_null, a_c))
    obj = dmd2_with(real, Recorder(lambda c: b), guidance_scale=3.0)
    x_hat = torch.tensor([[3.0, 0.0, 1.0], [1.0, -2.0, 0.8]], requires_grad=True)
    torch.manual_seed(0)
    counter = EvalCounter(batch=2)
    loss = obj.distribution_matching_loss(x_hat, torch.tensor([0, 1]), torch.tensor([9, 9]), counter)
    loss.backward()
    a = a_null + 3.0 * (a_c - a_null)  # [3, -8, -1]
    w = 1 / (x_hat.detach() - a).abs().mean(dim=1, keepdim=True)
    assert torch.allclose(x_hat.grad, w * (b - a) / 6, rtol=1e-5)
    assert loss.item() == pytest.approx((0.5 * (w * (b - a)).pow(2).mean()).item(), rel=1e-5)
    assert counter.by_pass == {"real_score": 4, "fake_score": 2}


def test_scores_in_another_dtype_are_taken_in_the_samples_dtype():
    """A float64 teacher and fake score on float32 samples: their velocities are cast to float32, so the loss is
    float32 (a float64 estimate made the whole loss float64)."""
    for real_dtype, fake_dtype in ((torch.float64, None), (None, torch.float64)):
        obj = dmd2_with(Recorder(lambda c: 0.0, real_dtype), Recorder(lambda c: 1.0, fake_dtype))
        x_hat = torch.tensor([[3.0, 0.0, 1.0]], requires_grad=True)
        loss = obj.distribution_matching_loss(x_hat, torch.zeros(1), None, EvalCounter(batch=1))
        assert loss.dtype == torch.float32
        # w = 1/mean|x̂ − 0| = 3/4, direction = w·(1 − 0): loss = ½·(3/4)²
        assert loss.item() == pytest.approx(0.5 * 0.75**2, rel=1e-6)


class MoveRecorder(torch.Tensor):
    """A tensor that records where ``.to`` sends it (the noise levels of the distribution-matching step)."""

    targets: list = []

    def to(self, *args, **kwargs):
        MoveRecorder.targets.append(args[0] if args else kwargs.get("device"))
        return super().to(*args, **kwargs)


def test_distribution_matching_draws_its_noise_levels_onto_the_samples_device(monkeypatch):
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: real_rand(*a, **k).as_subclass(MoveRecorder))
    MoveRecorder.targets = []
    obj = dmd2_with(Recorder(lambda c: 0.0), Recorder(lambda c: 1.0))
    x_hat = torch.zeros(3, 2, requires_grad=True)
    obj.distribution_matching_loss(x_hat, torch.zeros(3), None, EvalCounter(batch=3))
    assert MoveRecorder.targets[0] == x_hat.device  # t = t_min + (t_max − t_min)·rand(B), moved to x̂'s device


# -- GAN ---------------------------------------------------------------------------------------------------------------


def test_gan_logits_are_the_heads_on_the_fake_scores_view_of_noised_samples():
    fake = Recorder(lambda c: c[:, None])
    seen = []

    def head(x_t, velocity, t):
        seen.append((x_t, velocity, t))
        return velocity.sum(dim=1)

    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    t, cond = torch.tensor([0.25, 0.5]), torch.tensor([1.0, -1.0])
    counter = EvalCounter(batch=2)
    torch.manual_seed(3)
    logits = DMD2().gan_logits(head, fake, x, t, cond, counter, "gan_real")
    torch.manual_seed(3)
    x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn_like(x)
    assert torch.allclose(seen[0][0], x_t, rtol=0, atol=1e-7) and torch.equal(seen[0][2], t)
    assert torch.allclose(logits, ((x_t - cond[:, None]) / t[:, None]).sum(dim=1), rtol=1e-6)
    assert torch.equal(fake.calls[0][0], t) and torch.equal(fake.calls[0][1], t)  # the fake score at (t, t)
    assert counter.by_pass == {"gan_real": 2} and (counter.calls_grad, counter.rows_grad, counter.calls_nograd) == (
        1,
        2,
        0,
    )


class Counters(EvalCounter):
    """EvalCounter that keeps every instance (DMD2.loss makes its own) to read its per-pass rows."""

    made: list[EvalCounter] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Counters.made.append(self)


def uniform_on_0_1(t: torch.Tensor) -> None:
    """Beta(1, 1) noise levels (sample_time with (1, 1, 1)): mean 1/2, a quarter below 1/4, none above 1."""
    assert 0 <= t.min() and t.max() <= 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.03)
    assert (t < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_every_pass_of_both_steps_draws_its_noise_level_and_is_counted_by_name(monkeypatch):
    """Critic step (GAN on): the fake score's flow-matching pass and the GAN's real pass draw t ~ U(0, 1); generator
    step: the distribution-matching pass draws t ~ U(time_min, time_max), the GAN pass t ~ U(0, 1). Every pass is
    counted under its name, the logs carry loss/main and the time pair (1, 0) of a one-step generator."""
    monkeypatch.setattr(dmd2_module, "EvalCounter", Counters)
    b = 2048
    fake = Recorder(lambda c: 0.0)
    obj = dmd2_with(
        Recorder(lambda c: torch.where((c == 9)[:, None], 1.0, 0.0)), fake, critic_steps=1, gan=True, guidance_scale=2.0
    )
    obj.networks["gan_head"] = Network(torch.nn.Identity())
    obj.bound["gan_head"] = lambda x_t, velocity, t: velocity.mean(dim=1)
    batch = Batch(torch.randn(b, 1), torch.zeros(b), torch.full((b,), 9.0))
    student = lambda z, t, tt, cond: z - 0.5  # noqa: E731
    torch.manual_seed(0)

    Counters.made = []
    total, logs = obj.loss(student, None, batch, step=0)
    assert len(fake.calls) == 2  # F_fake, then the GAN's real pass
    for t, tt in fake.calls:
        uniform_on_0_1(t)
        assert torch.equal(tt, t)
    assert not torch.equal(fake.calls[0][0], fake.calls[1][0])  # two draws
    assert Counters.made[0].by_pass == {"generator": b, "fake_score": b, "gan_real": b}
    assert {k: v for k, v in logs.items() if k.startswith("nfe/")} == {
        "nfe/calls_grad": 2,
        "nfe/calls_nograd": 1,
        "nfe/rows_grad": 2 * b,
        "nfe/rows_nograd": b,
        "nfe/per_step": 3.0,
        "nfe/rows/generator": b,
        "nfe/rows/fake_score": b,
        "nfe/rows/gan_real": b,
    }
    assert logs["loss/main"].item() == total.item()
    critic, gan = logs["loss/fake_score"].item(), logs["loss/gan_critic"].item()
    assert logs["loss/main"].item() == pytest.approx(critic + 1e-2 * gan)
    assert logs["times"][0].tolist() == [1.0] * b and logs["times"][1].tolist() == [0.0] * b

    fake.calls.clear()
    Counters.made = []
    total, logs = obj.loss(student, None, batch, step=1)
    (t_dm, _), (t_gan, tt_gan) = fake.calls
    assert 0.02 <= t_dm.min() and t_dm.max() <= 0.98 and t_dm.mean().item() == pytest.approx(0.5, abs=0.03)
    uniform_on_0_1(t_gan)
    assert torch.equal(tt_gan, t_gan)
    assert Counters.made[0].by_pass == {"generator": b, "real_score": 2 * b, "fake_score": b, "gan_generator": b}
    assert {k: v for k, v in logs.items() if k.startswith("nfe/")} == {
        "nfe/calls_grad": 2,
        "nfe/calls_nograd": 2,
        "nfe/rows_grad": 2 * b,
        "nfe/rows_nograd": 3 * b,
        "nfe/per_step": 5.0,
        "nfe/rows/generator": b,
        "nfe/rows/real_score": 2 * b,
        "nfe/rows/fake_score": b,
        "nfe/rows/gan_generator": b,
    }
    assert logs["loss/main"].item() == total.item()
    assert logs["times"][0].tolist() == [1.0] * b and logs["times"][1].tolist() == [0.0] * b


def test_both_steps_make_their_time_logs_on_the_datas_device(monkeypatch):
    obj = dmd2_with(Recorder(lambda c: 0.0), Recorder(lambda c: 1.0), critic_steps=1)
    x = torch.zeros(3, 2)
    for step in (0, 1):
        asked = devices_asked(monkeypatch, "ones")
        _, logs = obj.loss(lambda z, t, tt, cond: z * t[:, None], None, Batch(x, x[:, 0], x[:, 0]), step)
        assert asked == [x.device, x.device]  # generate's times, then the logged (1, 0) pair
        assert logs["times"][0].tolist() == [1.0] * 3 and logs["times"][1].tolist() == [0.0] * 3
        monkeypatch.undo()


def test_gan_head_architecture_parameter_counts():
    # vector data (2,): in 2·2 + 1 (t), then width 256, 256, 1
    head = GanHead((2,))
    assert not head.spatial
    assert sum(p.numel() for p in head.parameters()) == (5 * 256 + 256) + (256 * 256 + 256) + (256 + 1)
    # images (1, 4, 16) pool to at most 8×8: (4, 8); in 2·1·4·8 + 1 = 65
    head = GanHead((1, 4, 16), width=8)
    assert head.spatial and head.pooled == (4, 8)
    assert [m.in_features for m in head.net if isinstance(m, torch.nn.Linear)] == [65, 8, 8]
    assert GanHead((3, 20, 20), width=4).net[0].in_features == 2 * 3 * 8 * 8 + 1


def test_gan_head_forward_equals_a_reimplementation():
    """Logits = W3·silu(W2·silu(W1·[pool(x_t ‖ v) flattened, t])), the velocity taken in x_t's dtype (bfloat16
    here) before the float32 head, 8×16 images average-pooled to 8×8 (pairs along the width)."""
    torch.manual_seed(0)
    head = GanHead((1, 8, 16), width=6)
    x_t = torch.randn(2, 1, 8, 16).to(torch.bfloat16)
    v, t = torch.randn(2, 1, 8, 16) / 3, torch.tensor([0.3, 0.9])
    h = torch.cat([x_t.float(), v.to(torch.bfloat16).float()], dim=1)  # (2, 2, 8, 16)
    pooled = h.reshape(2, 2, 8, 8, 2).mean(dim=4)  # width 16 → 8 by pairs, height 8 stays
    lin = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    a = torch.cat([pooled.flatten(1), t[:, None]], dim=1)
    a = F_nn.silu(a @ lin[0].weight.T + lin[0].bias)
    a = F_nn.silu(a @ lin[1].weight.T + lin[1].bias)
    want = (a @ lin[2].weight.T + lin[2].bias).squeeze(1)
    with torch.no_grad():
        got = head(x_t, v, t)
    assert got.shape == (2,) and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
