"""DMD2 (SPEC §11) and the interface for objectives that own networks: math pinned with numbers, the
update schedule, exact resume of every network, EMA of an owned network, trainer.init_from."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import fewstep.training.loop
from fewstep.data.base import Batch
from fewstep.objectives.base import EvalCounter, Network
from fewstep.objectives.dmd2 import DMD2, GanHead, share_frozen_copy
from fewstep.objectives.flow_matching import FlowMatching
from fewstep.objectives.jvp import unwrap

from helpers import FAST, compose

TOY = ["data=toy2d", "model=tiny_toy", "data.batch_size=16", *FAST]


def test_generator_gradient_is_the_normalised_score_difference():
    """With real and fake scores whose data estimates are constants a and b, d loss/d x̂ = w·(b − a)/N with
    w = 1/mean|x̂ − a| per sample (N = number of elements): DMD2's normalised distribution-matching step."""
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 2.0])

    def score_to(target):
        return lambda x_t, t, tt, c: (x_t - target) / t[:, None]

    obj = DMD2()
    obj.real_score = score_to(a)
    obj.networks = {"fake_score": Network(torch.nn.Identity())}
    obj.bound = {"fake_score": score_to(b)}
    torch.manual_seed(0)  # the noise level t is drawn inside; the estimates do not depend on it
    x_hat = torch.tensor([[3.0, 0.0, 1.0], [1.0, -2.0, 0.8]], requires_grad=True)
    loss = obj.distribution_matching_loss(x_hat, None, None, EvalCounter(batch=2))
    loss.backward()
    w = 1 / (x_hat.detach() - a).abs().mean(dim=1, keepdim=True)
    assert torch.allclose(x_hat.grad, w * (b - a) / 6, rtol=1e-5)
    assert torch.allclose(loss, 0.5 * (w * (b - a)).pow(2).mean(), rtol=1e-5)


class ShiftedDiracVelocity(torch.nn.Module):
    """The exact velocity ``(x_t − c)/t`` of samples that all sit at their condition c, plus a learnable constant."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift, dtype=torch.float64))

    def forward(self, x_t, t, tt, cond):
        return (x_t - cond) / t[:, None] + self.shift


def test_fake_score_regresses_on_the_velocity_of_the_generators_samples():
    """The fake score learns the generator's distribution by flow matching: target v = noise − x̂ at
    x_t = (1 − t)·x̂ + t·noise. A generator whose samples x̂ sit at their condition c has the exact velocity
    (x_t − c)/t = noise − c, so that velocity plus a constant k has loss k² (and d loss/dk = 2k) whatever the noise.
    The target's sign flipped (x̂ − noise) gives mean(2·(noise − c) + k)², about 4·E‖noise‖² more."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    batch = Batch(torch.randn(4, 3, generator=g, dtype=torch.float64), c, torch.zeros_like(c))
    score = ShiftedDiracVelocity(0.3)
    obj = DMD2(critic_steps=1)
    obj.networks = {"fake_score": Network(score)}
    student = lambda z, t, tt, cond: z - cond  # noqa: E731 -- x̂ = c
    torch.manual_seed(1)
    loss, logs = obj.loss(student, None, batch, step=0)
    assert not obj.generator_step(0) and logs["nfe/rows_grad"] == 4
    assert loss.item() == pytest.approx(0.09, rel=1e-9) and logs["loss/fake_score"].item() == loss.item()
    loss.backward()
    assert score.shift.grad.item() == pytest.approx(0.6, rel=1e-9)


class SignHead(torch.nn.Module):
    """A GAN head whose logits are parameters: ``real`` on noised data, ``fake`` on noised generator samples (told
    apart by the sign of x_t: the data sit at +1e4, the samples at −1e4). Records which it saw per call."""

    def __init__(self, real: list[float], fake: list[float]):
        super().__init__()
        self.real = torch.nn.Parameter(torch.tensor(real, dtype=torch.float64))
        self.fake = torch.nn.Parameter(torch.tensor(fake, dtype=torch.float64))
        self.seen: list[list[bool]] = []

    def forward(self, x_t, velocity, t):
        is_real = x_t.flatten(1).mean(dim=1) > 0
        self.seen.append(is_real.tolist())
        return torch.where(is_real, self.real, self.fake)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_gan_losses_push_real_logits_up_and_fake_logits_down():
    """Non-saturating GAN (DMD2 §4.3): the critic minimises softplus(−l_real) + softplus(l_fake) (row means), so its
    gradient raises real logits and lowers fake ones; the generator minimises softplus(−l_fake), raising them.
    Numbers for logits real = [1, −1], fake = [0, 2]; the gradients are the weights times ∓sigmoid(∓l)/B."""
    real, fake = [1.0, -1.0], [0.0, 2.0]
    x = torch.full((2, 3), 1e4, dtype=torch.float64)
    batch = Batch(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    zero_velocity = lambda x_t, t, tt, cond: torch.zeros_like(x_t)  # noqa: E731
    student = lambda z, t, tt, cond: z + 1e4  # noqa: E731 -- x̂ = −1e4

    class ZeroScore(torch.nn.Module):
        def forward(self, x_t, t, tt, cond):
            return torch.zeros_like(x_t)

    obj = DMD2(critic_steps=1, gan=True, gan_weight=0.5, gan_critic_weight=0.25)
    obj.real_score = zero_velocity

    # critic step: softplus(l_fake).mean() + softplus(−l_real).mean(), weighted by gan_critic_weight
    head = SignHead(real, fake)
    obj.networks = {"fake_score": Network(ZeroScore()), "gan_head": Network(head)}
    torch.manual_seed(0)
    total, logs = obj.loss(student, None, batch, step=0)
    assert head.seen == [[False, False], [True, True]] or head.seen == [[True, True], [False, False]]
    want = (softplus(0.0) + softplus(2.0)) / 2 + (softplus(-1.0) + softplus(1.0)) / 2
    assert logs["loss/gan_critic"].item() == pytest.approx(want, rel=1e-12)
    assert total.item() == pytest.approx(logs["loss/fake_score"].item() + 0.25 * want, rel=1e-12)
    total.backward()
    assert head.real.grad.tolist() == pytest.approx([-0.25 * sigmoid(-v) / 2 for v in real], rel=1e-12)
    assert head.fake.grad.tolist() == pytest.approx([0.25 * sigmoid(v) / 2 for v in fake], rel=1e-12)
    assert (head.real.grad < 0).all() and (head.fake.grad > 0).all()  # a descent step: real up, fake down

    # generator step: softplus(−l_fake).mean(), weighted by gan_weight (the distribution-matching term is 0 here)
    head = SignHead(real, fake)
    obj.networks["gan_head"] = Network(head)
    total, logs = obj.loss(student, None, batch, step=1)
    assert head.seen == [[False, False]] and logs["loss/dm"].item() == 0
    want = (softplus(-0.0) + softplus(-2.0)) / 2
    assert logs["loss/gan_generator"].item() == pytest.approx(want, rel=1e-12)
    assert total.item() == pytest.approx(0.5 * want, rel=1e-12)
    total.backward()
    assert head.fake.grad.tolist() == pytest.approx([-0.5 * sigmoid(-v) / 2 for v in fake], rel=1e-12)
    assert head.real.grad.eq(0).all()  # no real logits in a generator step


def test_real_score_guidance_is_one_batched_pass():
    obj = DMD2(guidance_scale=3.0)
    calls = []

    def real(x, t, tt, c):
        calls.append(len(x))
        return torch.where((c == 9)[:, None], torch.full_like(x, 1.0), torch.full_like(x, 2.0))

    obj.real_score = real
    counter = EvalCounter(batch=2)
    out = obj.real_velocity(torch.zeros(2, 3), torch.rand(2), torch.tensor([0, 1]), torch.tensor([9, 9]), counter)
    assert calls == [4] and counter.rows_nograd == 4
    assert out.eq(1 + 3 * (2 - 1)).all()


def test_schedule_alternates_critic_and_generator_updates():
    obj = DMD2(critic_steps=3, gan=True)
    plan = [obj.stepping(s) for s in range(8)]
    critic = ("fake_score", "gan_head")
    assert plan == [critic, critic, critic, ("student",), critic, critic, critic, ("student",)]
    assert DMD2(critic_steps=5).stepping(0) == ("fake_score",)


def test_copies_share_constant_buffers_but_not_running_statistics():
    """A positional table is held once by the student and both DMD2 copies; BatchNorm statistics, which
    training updates, are each copy's own."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(12.0).reshape(3, 4), persistent=False)
            self.lin = torch.nn.Linear(4, 4)
            self.norm = torch.nn.BatchNorm1d(4)

    student = Net()
    copy = share_frozen_copy(student)
    assert copy.table is student.table
    assert copy.norm.running_mean is not student.norm.running_mean
    assert torch.equal(copy.norm.running_mean, student.norm.running_mean)
    copy.norm.train()(torch.randn(5, 4) + 3.0)
    assert student.norm.running_mean.abs().max() == 0 and copy.norm.running_mean.min() > 0.1


def test_setup_copies_trainable_weights_and_shares_frozen_ones():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3))
    student[0].requires_grad_(False)  # a frozen base layer, as in a LoRA run
    copy = share_frozen_copy(student)
    assert copy[0].weight is student[0].weight  # held once
    assert copy[1].weight is not student[1].weight and torch.equal(copy[1].weight, student[1].weight)
    obj = DMD2(gan=True)
    obj.setup(student, SimpleNamespace(shape=(3,)))
    assert set(obj.networks) == {"fake_score", "gan_head"}
    assert not any(p.requires_grad for p in obj.real_score.parameters())
    assert all(p.requires_grad for p in obj.networks["fake_score"].module[1].parameters())
    assert student[1].weight.requires_grad  # the student's own weights stay trainable
    head = GanHead((1, 8, 8))
    assert head(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2,)


class EmaAux(FlowMatching):
    """A test objective owning one extra network with an EMA: flow matching for the student and, on odd steps,
    a regression of an auxiliary net onto the student's detached output (only the aux optimizer steps)."""

    def setup(self, student, data=None):
        self.networks = {"aux": Network(torch.nn.Linear(2, 2), lr=5e-3, ema=True)}

    def stepping(self, step):
        return ("aux",) if step % 2 else ("student",)

    def loss(self, student, teacher, batch: Batch, step: int):
        if step % 2 == 0:
            return super().loss(student, teacher, batch, step)
        aux = self.network("aux")
        loss = (aux(batch.x) - batch.x.flip(1)).pow(2).mean()
        return loss, {"loss/main": loss.detach(), "times": (torch.ones(len(batch)), torch.ones(len(batch)))}


def final(run):
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def assert_same_checkpoints(a, b, names):
    for name in names:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = (torch.load(c / "optim.pt", weights_only=True) for c in (a, b))
    for key in oa.get("networks", {}):
        sa, sb = oa["networks"][key]["optimizer"]["state"], ob["networks"][key]["optimizer"]["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa), key
    assert all(torch.equal(oa["optimizer"]["state"][i]["exp_avg"], ob["optimizer"]["state"][i]["exp_avg"])
               for i in oa["optimizer"]["state"])  # fmt: skip


@pytest.mark.slow
def test_owned_network_is_averaged_checkpointed_and_resumed_exactly(tmp_path):
    base = [*TOY, "objective=flow_matching", "objective._target_=test_dmd2.EmaAux", "teacher.decay=0.5",
            "trainer.checkpoint_every=4", "trainer.lr_schedule=constant"]  # fmt: skip
    from fewstep.training.loop import train

    train(compose([*base, "trainer.max_steps=8"]), run_dir=tmp_path / "straight")
    train(compose([*base, "trainer.max_steps=4"]), run_dir=tmp_path / "split")
    resumed = train(compose([*base, "trainer.max_steps=8", "trainer.resume=auto"]), run_dir=tmp_path / "split")
    assert (resumed["start_step"], resumed["steps"]) == (4, 8)  # went on from step 4: a fresh run would end alike
    a, b = final(tmp_path / "straight"), final(tmp_path / "split")
    files = ["model.safetensors", "teacher.safetensors", "network_aux.safetensors", "network_aux_ema.safetensors"]
    assert_same_checkpoints(a, b, files)
    state = json.loads((a / "state.json").read_text())
    assert state["networks"]["aux"]["last_step"] == 7  # the aux EMA updates on the aux steps only
    assert state["teacher"]["last_step"] == 6  # and the student's on the student's
    aux, ema = load_file(str(a / "network_aux.safetensors")), load_file(str(a / "network_aux_ema.safetensors"))
    assert not torch.equal(aux["weight"], ema["weight"])


@pytest.fixture(scope="module")
def flow_matching_run(tmp_path_factory):
    from fewstep.training.loop import train

    run = tmp_path_factory.mktemp("fm") / "run"
    train(compose([*TOY, "objective=flow_matching", "trainer.max_steps=6"]), run_dir=run)
    return run


@pytest.mark.slow
def test_dmd2_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, flow_matching_run):
    from fewstep.training.loop import train

    base = [*TOY, "objective=dmd2", f"trainer.init_from={flow_matching_run}", "objective.critic_steps=2",
            "objective.gan=true", "trainer.checkpoint_every=5", "trainer.lr_schedule=constant"]  # fmt: skip
    summary = train(compose([*base, "trainer.max_steps=9"]), run_dir=tmp_path / "straight")
    train(compose([*base, "trainer.max_steps=5"]), run_dir=tmp_path / "split")
    resumed = train(compose([*base, "trainer.max_steps=9", "trainer.resume=auto"]), run_dir=tmp_path / "split")
    assert (resumed["start_step"], resumed["steps"]) == (5, 9)  # went on from step 5: a fresh run would end alike
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["start_step"] == 5
    a, b = final(tmp_path / "straight"), final(tmp_path / "split")
    assert a.name == b.name == "step_0000009"
    files = ["model.safetensors", "teacher.safetensors", "network_fake_score.safetensors",
             "network_gan_head.safetensors"]  # fmt: skip
    assert_same_checkpoints(a, b, files)
    # the generator moved away from its flow-matching start, the fake score too
    start = load_file(str(final(flow_matching_run) / "teacher.safetensors"))
    gen, fake = load_file(str(a / "model.safetensors")), load_file(str(a / "network_fake_score.safetensors"))
    assert any(not torch.equal(gen[k], start[k]) for k in start)
    assert any(not torch.equal(fake[k], gen[k]) for k in fake)
    assert (summary["start_step"], summary["steps"]) == (0, 9)


@pytest.mark.slow
def test_every_network_follows_the_runs_lr_schedule_on_the_training_step(tmp_path, flow_matching_run):
    """The generator steps every 3rd step here: its cosine stopped at 2 of 6 steps (LR factor 0.78 where the run
    ends at 0.1) when its schedule advanced with its own updates. Now every schedule reads the training step."""
    from fewstep.training.loop import train
    from fewstep.training.trainables import lr_factor

    over = [*TOY, "objective=dmd2", f"trainer.init_from={flow_matching_run}", "objective.critic_steps=2",
            "trainer.max_steps=6", "trainer.checkpoint_every=6", "trainer.lr_schedule=cosine", "trainer.warmup_steps=0",
            "trainer.min_lr_ratio=0.1", "trainer.lr=0.001", "objective.fake_lr=0.002"]  # fmt: skip
    cfg = compose(over)
    train(cfg, run_dir=tmp_path / "run")
    optim = torch.load(final(tmp_path / "run") / "optim.pt", weights_only=True)
    end = lr_factor(6, cfg.trainer)
    assert end == pytest.approx(0.1)
    assert optim["scheduler"]["last_epoch"] == 6 == optim["networks"]["fake_score"]["scheduler"]["last_epoch"]
    assert optim["scheduler"]["_last_lr"] == [pytest.approx(0.001 * end)]
    assert optim["networks"]["fake_score"]["scheduler"]["_last_lr"] == [pytest.approx(0.002 * end)]


class OwnGradientsDMD2(DMD2):
    """DMD2 that also records, per training step, the gradient of that step's loss alone (torch.autograd.grad) for
    the parameters of the networks it steps; :func:`test_each_step_applies_the_gradient_of_its_own_loss_only`
    compares it with what the optimizers step with."""

    records: list[dict] = []

    def loss(self, student, teacher, batch: Batch, step: int):
        total, logs = super().loss(student, teacher, batch, step)
        names = ["student", *self.networks]
        params = [(name, p) for name in names
                  for p in unwrap(student if name == "student" else self.network(name)).parameters()
                  if p.requires_grad]  # fmt: skip
        grads = torch.autograd.grad(total, [p for _, p in params], retain_graph=True, allow_unused=True)
        stepped = self.stepping(step)
        own = {id(p): torch.zeros_like(p) if g is None else g
               for (name, p), g in zip(params, grads, strict=True) if name in stepped}  # fmt: skip
        others = sum(float(g.abs().sum()) for (name, _), g in zip(params, grads, strict=True)
                     if name not in stepped and g is not None)  # fmt: skip
        self.records.append({"step": step, "own": own, "others": others, "applied": {}})
        return total, logs


def test_each_step_applies_the_gradient_of_its_own_loss_only(tmp_path, flow_matching_run):
    """A generator step with the GAN back-propagates into the fake score and the GAN head too (not stepped there,
    their gradients discarded): the loop clears every network's gradients after every step, so the next critic
    step steps them with its own loss's gradient only. Cleared for the stepped networks alone, the generator
    step's GAN gradient was added to the critic step after it. Checked on every step (critic, generator, critic):
    the gradients each optimizer steps with equal torch.autograd.grad of that step's loss (no clipping)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fewstep.training.loop import train

    def seen(optimizer, args, kwargs):  # what each optimizer.step uses
        applied = OwnGradientsDMD2.records[-1]["applied"]
        for group in optimizer.param_groups:
            applied.update({id(p): p.grad.detach().clone() for p in group["params"] if p.grad is not None})

    OwnGradientsDMD2.records = []
    handle = register_optimizer_step_pre_hook(seen)
    try:
        train(compose([*TOY, "objective=dmd2", "objective._target_=test_dmd2.OwnGradientsDMD2",
                       f"trainer.init_from={flow_matching_run}", "objective.critic_steps=1", "objective.gan=true",
                       "objective.gan_weight=1.0", "trainer.max_steps=3", "trainer.max_grad_norm=0"]),
              run_dir=tmp_path / "run")  # fmt: skip
    finally:
        handle.remove()
    records = OwnGradientsDMD2.records
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert set(r["applied"]) <= set(r["own"]) and len(r["applied"]) > 0, r["step"]
        for key, grad in r["applied"].items():
            assert torch.allclose(grad, r["own"][key], rtol=1e-5, atol=1e-9), r["step"]
    # the generator step's loss reaches the fake score and the head (the gradients step 2 must not apply)
    assert records[1]["others"] > 0 and records[0]["others"] == 0


def test_init_from_a_folder_without_checkpoints_names_init_from_not_resume(tmp_path):
    """The sweep/objectives preset's dmd2 point alone (job 0 is itself) gave "trainer.resume=...: no valid
    checkpoint found there", a key the user never set."""
    from fewstep.training.checkpoint import CheckpointError, load_initial_weights

    with pytest.raises(CheckpointError, match=r"^trainer.init_from=.*: no valid checkpoint found there"):
        load_initial_weights(tmp_path, torch.nn.Linear(1, 1))


@pytest.mark.slow
def test_init_from_loads_the_runs_ema_weights(tmp_path, flow_matching_run):
    from fewstep.training.checkpoint import CheckpointError, load_initial_weights
    from fewstep.training.trainables import build_components

    ckpt = final(flow_matching_run)
    _, _, model, _, _ = build_components(compose([*TOY, "objective=flow_matching"]))
    assert load_initial_weights(flow_matching_run, model) == ckpt
    ema = load_file(str(ckpt / "teacher.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    load_initial_weights(flow_matching_run, model, use_ema=False)
    raw = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())
    # a narrower net is refused
    _, _, other, _, _ = build_components(compose([*TOY, "objective=flow_matching", "model.width=32"]))
    with pytest.raises(CheckpointError, match="tensors do not fit this model.*use the same model config"):
        load_initial_weights(flow_matching_run, other)
    # TinyMLP with TwinFlow's time-pair input starts from the flow-matching run: zero target-time columns, so it
    # computes what the flow-matching model does, whatever tt (and t < 0 adds the zero sign row)
    _, _, twin, _, _ = build_components(compose([*TOY, "objective=twinflow"]))
    load_initial_weights(flow_matching_run, twin, use_ema=False)  # as model holds now
    x, t = torch.randn(64, 2), torch.rand(64)
    label = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        want = model(x, t, t, label)
        for tt in (torch.zeros(64), torch.rand(64) * t):
            assert torch.allclose(twin(x, t, tt, label), want, rtol=0, atol=1e-6)  # summation order only
            assert torch.allclose(twin(x, -t, -tt, label), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.critic_steps=0", "objective.critic_steps=0 must lie in [1, inf)"),
        ("objective.guidance_scale=0.5", "objective.guidance_scale=0.5 must lie in [1, inf)"),
        ("objective.time_min=0.99", "objective.time_min=0.99, time_max=0.98 must satisfy"),
        ("objective.fake_lr=0", "objective.fake_lr=0.0 must lie in (0, inf)"),
        ("objective.gan_weight=-1", "objective.gan_weight=-1.0 must lie in [0, inf)"),
        ("objective.target_step_count=2", "multi-step backward simulation is not implemented"),
        ("trainer.init_from=/nonexistent/run", "trainer.init_from=/nonexistent/run: no such run"),
    ],
)
def test_bad_dmd2_options_fail_in_one_line(override, message, tmp_path):
    from fewstep.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["objective=dmd2", f"trainer.init_from={tmp_path}", override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dmd2_on_a_random_model_asks_for_init_from():
    from fewstep.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match="objective=dmd2 needs a pretrained teacher.*trainer.init_from=RUN_DIR"):
        validate(compose(["objective=dmd2"]))


@pytest.mark.slow
def test_dmd2_trains_two_steps_on_digits_from_a_flow_matching_run(tmp_path):
    from fewstep.training.loop import train

    digits = ["data.batch_size=16", "trainer.max_steps=2", *FAST]
    train(compose(["objective=flow_matching", *digits]), run_dir=tmp_path / "fm")
    cfg = compose(["objective=dmd2", f"trainer.init_from={tmp_path / 'fm'}", "objective.critic_steps=1",
                   "objective.gan=true", "objective.guidance_scale=1.5", *digits])  # fmt: skip
    summary = train(cfg, run_dir=tmp_path / "dmd2")
    assert summary["steps"] == 2 and summary["objective"] == "DMD2"
    rows = [json.loads(line) for line in (tmp_path / "dmd2" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/dm", "loss/fake_score", "loss/gan_generator", "loss/gan_critic"} <= set(rows[-1])


@pytest.mark.slow
def test_two_process_ddp_runs_the_owned_networks(tmp_path, flow_matching_run):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): DMD2's fake score + GAN head (prepared,
    stepped on their own steps) train without a reducer error. (MeanFlow's JVP on the unwrapped module under 2-process
    DDP, once a case here, is the DDP run of tests/training/test_distributed.py::
    test_meanflow_with_grad_accumulation_under_two_process_fsdp_equals_ddp, with gradient accumulation besides.)"""
    import subprocess
    import sys

    extra = [f"trainer.init_from={flow_matching_run}", "objective.critic_steps=1", "objective.gan=true"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fewstep", *TOY,
           "objective=dmd2", *extra, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 4


def test_fp16_loss_scaling_leaves_every_stepping_network_unchanged(tmp_path, flow_matching_run, monkeypatch):
    """fp16 (a GradScaler; accelerate builds one only on a GPU, so one is put in on the CPU here) with a
    power-of-two scale that does not overflow must train exactly as fp32: scaling and unscaling by 2^10 is exact.
    DMD2 with the GAN head steps two optimizers at a critic step (fake score, head). Before the fix each
    AcceleratedOptimizer.step ran its own scaler.update(), so the second optimizer's gradients were unscaled a
    second time (divided by 2^10 again): after 3 steps the GAN head's weights differed from fp32 by up to 3.5e-3,
    and through it the generator's by 2.8e-3."""
    import accelerate
    from accelerate.state import AcceleratorState

    from fewstep.training.loop import train

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

        def unscale_gradients(self, optimizer=None):  # what accelerate does for native fp16
            for opt in self._optimizers:
                self.scaler.unscale_(opt.optimizer)

    base = [*TOY, "objective=dmd2", f"trainer.init_from={flow_matching_run}", "objective.critic_steps=2",
            "objective.gan=true", "trainer.max_steps=3", "trainer.max_grad_norm=0"]  # fmt: skip
    train(compose(base), run_dir=tmp_path / "fp32")
    AcceleratorState._reset_state(True)
    monkeypatch.setattr(fewstep.training.loop, "Accelerator", ScaledAccelerator)
    train(compose(base), run_dir=tmp_path / "scaled")
    AcceleratorState._reset_state(True)
    for name in ("model", "network_fake_score", "network_gan_head"):
        a = load_file(str(final(tmp_path / "fp32") / f"{name}.safetensors"))
        b = load_file(str(final(tmp_path / "scaled") / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
