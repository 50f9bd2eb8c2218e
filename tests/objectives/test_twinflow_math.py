"""TwinFlow/RCGM math pinned with numbers (SPEC §2)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.data.base import Batch
from fewstep.objectives.base import EvalCounter, barron_distance, l2_distance, sample_time, time_weight
from fewstep.objectives.flow_matching import FlowMatching
from fewstep.objectives.twinflow import TwinFlow, partition_sizes
from fewstep.teachers import EMATeacher, RngState, StudentTeacher
from fewstep.teachers.base import Teacher


class Oracle(Teacher):
    """A teacher whose model is the given callable (no weights)."""

    def __init__(self, fn):
        self.fn = fn

    @property
    def model(self):
        return self.fn


def straight_path_teacher(x0: torch.Tensor):
    """Exact velocity of the straight path to each row's data point: v = (x − x0)/s, for any target time.
    The condition carries the row index, so the oracle also works on row subsets."""
    return lambda x, s, s_next, c: (x - x0[c]) / s.abs().reshape(-1, *([1] * (x.ndim - 1)))


def make_inputs(t, tt, x0, z):
    x_t = t.reshape(-1, 1) * z + (1 - t.reshape(-1, 1)) * x0
    masks = {k: torch.zeros(len(t), dtype=torch.bool) for k in ("e2e", "mul", "any", "adv")}
    cond = torch.arange(len(t))
    return {"x_t": x_t, "t": t, "tt": tt, "masks": masks, "cond": cond, "uncond": cond + 1}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_rcgm_target_equals_v_for_perfect_straight_teacher(order, dtype, tol):
    """Float32 rounding is amplified by 1/delta_t = 100, hence the float64 run for the exact check."""
    g = torch.Generator().manual_seed(0)
    # far branch (t >= tt + delta), near branch (t < tt + delta), t == tt, the e2e jump (1 -> 0)
    t = torch.tensor([0.9, 0.5, 0.3, 0.305, 0.7, 0.7, 1.0, 0.02], dtype=dtype)
    tt = torch.tensor([0.1, 0.0, 0.295, 0.3, 0.7, 0.2, 0.0, 0.0], dtype=dtype)
    x0, z = torch.randn(8, 5, generator=g, dtype=dtype), torch.randn(8, 5, generator=g, dtype=dtype)
    v = z - x0
    obj = TwinFlow(estimate_order=order, delta_t=0.01)
    inp = make_inputs(t, tt, x0, z)
    y = obj.rcgm_target(straight_path_teacher(x0), v.clone(), inp, v, RngState.capture(), EvalCounter())
    assert y.dtype == dtype
    assert (y - v).abs().max().item() < tol


def test_near_branch_target_is_v_for_any_student_output():
    """With t < tt + delta the rollout has zero length, so y = F − clamp(F − v) = v within the clamp."""
    t, tt = torch.tensor([0.5, 0.5]), torch.tensor([0.495, 0.5])
    g = torch.Generator().manual_seed(1)
    x0, z = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    v = z - x0
    F = v + 0.3 * torch.randn(2, 3, generator=g).clamp(-1, 1)
    calls = []
    obj = TwinFlow(estimate_order=2, delta_t=0.01)
    y = obj.rcgm_target(lambda *a: calls.append(1), F, make_inputs(t, tt, x0, z), v, RngState.capture(), EvalCounter())
    assert calls == []  # no teacher pass on zero-length rollouts
    assert torch.allclose(y, v, atol=1e-6)


def reference_rcgm(teacher, F, x_t, t, tt, v, cond, order, delta, clamp):
    """An independent, row-by-row evaluation of SPEC §2 steps 1–4."""
    out = []
    for i in range(len(t)):
        ti, tti = float(t[i]), float(tt[i])
        tm = max(ti - delta, tti)
        x = x_t[i : i + 1] - delta * v[i : i + 1]
        s = [tm + (tti - tm) * k / order for k in range(order + 1)]
        integral = torch.zeros_like(x)
        for k in range(order):
            Fk = teacher(x, torch.tensor([s[k]]), torch.tensor([s[k + 1]]), cond[i : i + 1])
            xh, zh = x - s[k] * Fk, x + (1 - s[k]) * Fk
            x = s[k + 1] * zh + (1 - s[k + 1]) * xh
            integral = integral + Fk * (s[k] - s[k + 1])
        if ti >= tti + delta:
            r = ((ti - tti) * F[i : i + 1] - integral) / delta - v[i : i + 1]
        else:
            r = F[i : i + 1] - (integral / (ti - tti) if ti != tti else 0) - v[i : i + 1]
        out.append(F[i : i + 1] - r.clamp(-clamp, clamp))
    return torch.cat(out)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_rcgm_target_matches_independent_formula_for_curved_teacher(order):
    g = torch.Generator().manual_seed(2)
    n = 12
    t = torch.rand(n, generator=g) * 0.9 + 0.1
    tt = t * torch.rand(n, generator=g)
    tt[:3] = t[:3] - 0.004  # near branch
    tt[3] = t[3]  # t == tt
    x0, z = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    v = z - x0
    F = v + 0.5 * torch.randn(n, 4, generator=g)
    W = torch.randn(4, 4, generator=g) * 0.3

    def curved(x, s, s_next, c):
        s, s_next = s.reshape(-1, 1), s_next.reshape(-1, 1)
        return torch.tanh(x @ W) * (1 + s) + torch.sin(3 * x) * s_next + 0.1 * c.reshape(-1, 1)

    cond = torch.arange(n) % 3
    inp = make_inputs(t, tt, x0, z)
    inp["cond"] = cond
    obj = TwinFlow(estimate_order=order, delta_t=0.05, target_clamp=0.7)
    y = obj.rcgm_target(curved, F, inp, v, RngState.capture(), EvalCounter())
    expected = reference_rcgm(curved, F, inp["x_t"], t, tt, v, cond, order, 0.05, 0.7)
    assert (y - expected).abs().max().item() < 1e-5
    assert (expected - F).abs().max().item() <= 0.7 + 1e-6  # clamp: target stays within kappa of F


def test_clamp_limits_the_residual():
    obj = TwinFlow(estimate_order=1, delta_t=0.01, target_clamp=0.25)
    t, tt = torch.tensor([0.8]), torch.tensor([0.2])
    x0, z = torch.zeros(1, 2), torch.ones(1, 2)
    v = z - x0
    F = v + 10.0  # far off: residual huge
    y = obj.rcgm_target(straight_path_teacher(x0), F, make_inputs(t, tt, x0, z), v, RngState.capture(), EvalCounter())
    assert torch.allclose(y, F - 0.25)


def test_barron_and_l2_numbers():
    pred, target = torch.tensor([[0.0, 0.0], [1.0, 3.0]]), torch.zeros(2, 2)
    assert torch.allclose(l2_distance(pred, target), torch.tensor([0.0, 5.0]))
    mse = torch.tensor([0.0, 5.0])
    c = 1e-3
    expected = mse * ((mse / c**2) / 1.0 + 1.0) ** -0.5 / c  # alpha = 1
    assert torch.allclose(barron_distance(pred, target, 1.0, c), expected)
    assert abs(barron_distance(pred, target, 1.0, c)[1].item() - math.sqrt(5.0)) < 1e-3  # ~ RMSE for mse >> c^2
    # alpha = 2 is plain L2 / c
    assert torch.allclose(barron_distance(pred, target, 2.0, 0.5), mse / 0.5)


def test_time_weighting_numbers():
    t, tt = torch.tensor([1.0, 0.5, 0.8, -0.3]), torch.tensor([0.0, 0.5, 0.3, -0.3])
    w = time_weight(t, tt, "tan")
    assert torch.allclose(
        w, torch.tensor([1.0, math.tan(math.pi / 2.5) + 1, math.tan(0.5 * math.pi / 2.5) + 1, 4.0776835])
    )
    assert torch.equal(time_weight(t, tt, "none"), torch.ones(4))


@pytest.mark.parametrize(
    "batch, probs, expected",
    [
        (128, {"e2e": 1, "mul": 1, "any": 1, "adv": 1}, [32, 32, 32, 32]),
        (10, {"e2e": 1, "mul": 1, "any": 1, "adv": 1}, [3, 2, 3, 2]),
        (3, {"e2e": 1, "mul": 1, "any": 1, "adv": 1}, [1, 1, 0, 1]),
        (1, {"e2e": 1, "mul": 1, "any": 1, "adv": 1}, [0, 1, 0, 0]),
        (129, {"e2e": 1, "mul": 1, "any": 1, "adv": 0}, [43, 43, 43, 0]),
        (64, {"e2e": 0, "mul": 1, "any": 0, "adv": 0}, [0, 64, 0, 0]),
        (100, {"e2e": 2, "mul": 1, "any": 1, "adv": 0}, [50, 25, 25, 0]),
    ],
)
def test_partition_sizes(batch, probs, expected):
    sizes = partition_sizes(batch, probs)
    assert [sizes[k] for k in ("e2e", "mul", "any", "adv")] == expected
    assert sum(sizes.values()) == batch


def test_partition_rejects_all_zero():
    with pytest.raises(ValueError, match="probs"):
        partition_sizes(8, {"e2e": 0, "mul": 0, "any": 0, "adv": 0})


def five_updates(teacher: EMATeacher) -> tuple[list[float], list[float]]:
    """Bind to a 1-weight student, set the weight to 1, 2, ..., 5 before updates 0-4 (each twice: idempotent
    within a step); returns the (teacher, sampling) decays each update used."""
    student = torch.nn.Linear(2, 1, bias=False)
    teacher.bind(student)
    decays, sampling_decays = [], []
    for step in range(5):
        decays.append(teacher.current_decay)
        sampling_decays.append(teacher.current_sampling_decay)
        with torch.no_grad():
            student.weight.fill_(float(step + 1))
        teacher.update(student, step)
        teacher.update(student, step)
    return decays, sampling_decays


def ema_of_steps(decays: list[float]) -> float:
    """w_1 = 1 (decay 0), w_{k+1} = d_k·w_k + (1 − d_k)·(k + 1), for weights 1..5."""
    w = 0.0
    for d, k in zip(decays, range(1, 6)):
        w = d * w + (1 - d) * k
    return w


def test_ema_warmup_first_five_decays_and_weights():
    teacher = EMATeacher(decay=0.99)
    decays, _ = five_updates(teacher)
    assert decays == pytest.approx([0.0, 0.495, 0.6199875, 0.69029220, 0.73670311], abs=1e-7)
    assert teacher.shadow["weight"].flatten()[0].item() == pytest.approx(ema_of_steps(decays), abs=1e-6)


def test_sampling_ema_warms_up_on_its_own_schedule_and_is_what_the_run_samples_with():
    """teacher.sampling_decay: a second average with the same warm-up rule towards its own decay; the teacher
    passes keep the decay-0.9 EMA, sampling uses the 0.99 one."""
    teacher = EMATeacher(decay=0.9, sampling_decay=0.99)
    decays, sampling_decays = five_updates(teacher)
    assert decays == pytest.approx([0.0, 0.45, 0.57375, 0.64328203, 0.68906999], abs=1e-7)
    assert sampling_decays == pytest.approx([0.0, 0.495, 0.6199875, 0.69029220, 0.73670311], abs=1e-7)
    expected = {"shadow": ema_of_steps(decays), "sampling_shadow": ema_of_steps(sampling_decays)}
    assert teacher.shadow["weight"].flatten()[0].item() == pytest.approx(expected["shadow"], abs=1e-6)
    assert teacher.sampling_shadow["weight"].flatten()[0].item() == pytest.approx(expected["sampling_shadow"], abs=1e-6)
    assert teacher.sampling_key == "sampling_shadow"
    x = torch.ones(1, 2)
    assert teacher.sampling_model(x).item() == pytest.approx(2 * expected["sampling_shadow"], abs=1e-5)
    assert teacher.model(x).item() == pytest.approx(2 * expected["shadow"], abs=1e-5)
    assert abs(expected["shadow"] - expected["sampling_shadow"]) > 0.1


def test_sampling_ema_round_trips_through_a_checkpoint(tmp_path):
    """Saved as teacher_sampling_shadow.safetensors with its warm-up counter; a resumed teacher continues exactly
    as the uninterrupted one; a checkpoint without it refuses to resume a sampling_decay run."""
    from fewstep.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    def fresh(sampling_decay=0.99):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        teacher = EMATeacher(decay=0.9, sampling_decay=sampling_decay)
        teacher.bind(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, teacher, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step(model, teacher, opt, i):
        teacher.update(model, i)
        model(torch.full((4, 3), float(i))).square().mean().backward()
        opt.step()
        opt.zero_grad()

    model, teacher, opt, sched = fresh()
    for i in range(3):
        step(model, teacher, opt, i)
    ckpt = save_checkpoint(tmp_path / "ckpts", 3, model, teacher, opt, sched, data_position=3)
    assert (ckpt / "teacher_sampling_shadow.safetensors").exists()
    resumed = fresh()
    load_checkpoint(ckpt, *resumed[:2], optimizer=resumed[2], scheduler=resumed[3], restore_rng=False)
    assert resumed[1].current_sampling_decay == teacher.current_sampling_decay == pytest.approx(0.6902922, abs=1e-7)
    for i in range(3, 5):
        step(model, teacher, opt, i)
        step(*resumed[:3], i)
    for name in ("shadow", "sampling_shadow"):
        for k, v in getattr(teacher, name).items():
            assert torch.equal(v, getattr(resumed[1], name)[k]), (name, k)

    plain = fresh(sampling_decay=None)
    plain_ckpt = save_checkpoint(tmp_path / "plain", 1, *plain, data_position=1)
    with pytest.raises(CheckpointError, match="resume with teacher.sampling_decay=null"):
        load_checkpoint(plain_ckpt, *fresh()[:2], restore_rng=False)


def test_sampling_key_names_the_weights_a_run_is_judged_by():
    """fewstep.sample, fewstep.eval and fewstep.export all take the teacher's sampling_key."""
    from fewstep.teachers import FrozenTeacher

    student = torch.nn.Linear(2, 1)
    cases = [
        (EMATeacher(decay=0.99), "shadow"),
        (EMATeacher(decay=0.99, sampling_decay=0.999), "sampling_shadow"),
        (EMATeacher(decay=0.0, sampling_decay=0.9), "sampling_shadow"),
        (EMATeacher(decay=0.0), None),
        (FrozenTeacher(), None),
        (StudentTeacher(allow_student_teacher=True), None),
    ]
    for teacher, key in cases:
        teacher.bind(student)
        assert teacher.sampling_key == key
        assert (teacher.sampling_model is student) == (key is None)


def test_ema_decay_edges():
    student = torch.nn.Linear(2, 1)
    frozen = EMATeacher(decay=1.0)
    frozen.bind(student)
    w0 = student.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    frozen.update(student, 0)
    assert torch.equal(frozen.shadow["weight"], w0)
    live = EMATeacher(decay=0.0)
    live.bind(student)
    assert live.shadow is None and live.model is student


def tiny_model(time_pair=True, dropout=0.0, seed=0):
    from fewstep.models.tiny import TinyMLP

    torch.manual_seed(seed)
    m = TinyMLP([6], num_classes=3, width=32, depth=2, emb_dim=16, dropout=dropout, time_pair=time_pair)
    with torch.no_grad():  # the zero-initialised output layer would make every test trivial
        m.out.weight.normal_(0, 0.3)
    return m


def test_adversarial_group_flips_sign_and_uses_model_samples():
    model = tiny_model()
    obj = TwinFlow()
    torch.manual_seed(3)
    x = torch.randn(16, 6)
    batch = Batch(x.clone(), torch.arange(16) % 3, torch.full((16,), 3))
    inp = obj.sample_inputs(model, batch, EvalCounter())
    adv = inp["masks"]["adv"]
    assert adv.sum() == 4
    assert (inp["t"][adv] < 0).all() and torch.equal(inp["t"][adv], inp["tt"][adv])
    assert (inp["t"][~adv] >= 0).all()
    assert not torch.allclose(inp["x"][adv], x[adv])  # fake data replaced the real rows
    assert torch.equal(inp["x"][~adv], x[~adv])
    e2e = inp["masks"]["e2e"]
    assert (inp["t"][e2e] == 1).all() and (inp["tt"][e2e] == 0).all()
    mul = inp["masks"]["mul"]
    assert ((inp["t"][mul] - inp["tt"][mul]) <= 0.05 * inp["t"][mul] + 1e-7).all()


def test_flow_matching_equals_twinflow_with_only_mul_and_no_consistency():
    model = tiny_model()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(4))
    batch = Batch(x, torch.arange(32) % 3, torch.full((32,), 3))
    teacher = StudentTeacher(allow_student_teacher=True)
    teacher.bind(model)
    fm = FlowMatching(loss={"type": "barron", "alpha": 1.0, "c": 1e-3}, time_weighting="tan")
    tf = TwinFlow(
        probs={"e2e": 0, "mul": 1, "any": 0, "adv": 0}, consistency_ratio=0.0, enhanced_ratio=0.0, adversarial=False
    )
    torch.manual_seed(5)
    a, _ = fm.loss(model, teacher, batch, 0)
    torch.manual_seed(5)
    b, _ = tf.loss(model, teacher, batch, 0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_rng_restore_aligns_dropout_passes():
    model = tiny_model(dropout=0.5)
    model.train()
    x, t = torch.randn(8, 6), torch.rand(8)
    c = torch.zeros(8, dtype=torch.long)
    rng = RngState.capture()
    a = model(x, t, t, c)
    b = model(x, t, t, c)
    assert not torch.allclose(a, b)  # dropout draws differ without restore
    rng.restore()
    c1 = model(x, t, t, c)
    rng.restore()
    c2 = model(x, t, t, c)
    assert torch.equal(c1, c2) and torch.equal(c1, a)


def test_enhanced_target_cond_and_uncond_passes_draw_the_same_dropout_masks():
    """SPEC §1/§2: both teacher passes of the enhanced target start from the captured RNG state, so a model with
    dropout sees the same masks in both. With cond == uncond the guidance f_T(c) − f_T(∅) is then exactly 0 and the
    loss equals the loss without enhancement. One batched 2B forward drew different masks for its two halves:
    before the fix the loss was 863.55 against 840.35 without enhancement."""
    from fewstep.objectives.twinflow import has_active_dropout

    model = tiny_model(dropout=0.3, seed=3)
    model.train()
    ema = EMATeacher(decay=0.9)
    ema.bind(model)
    assert has_active_dropout(model) and not has_active_dropout(tiny_model(dropout=0.0))
    null = torch.full((8,), 3)
    batch = Batch(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), null.clone(), null)
    losses = []
    for ratio in (1.0, 0.0):
        obj = TwinFlow(
            enhanced_ratio=ratio, probs={"any": 1.0}, adversarial=False, target_clamp=100.0, loss={"type": "l2"}
        )
        torch.manual_seed(4)
        losses.append(obj.loss(model, ema, batch, 0)[0].item())
    assert losses[0] == losses[1]
    model.eval()
    assert not has_active_dropout(model)


def test_rcgm_rollout_under_dropout_draws_the_student_pass_masks_row_for_row():
    """With active dropout the rollout runs on the whole batch from the captured RNG state (the reference layout),
    so each row's teacher passes draw the masks the student pass drew for it. Run on the subset of rows with
    t − δ > tt instead, the rows after a skipped (near) row drew another row's masks: on this batch the unclamped
    targets on the rollout rows differed from the whole-batch ones by 7.49 on average, 33.9 at most (targets ~28)."""
    from fewstep.objectives.twinflow import has_active_dropout

    model = tiny_model(dropout=0.1, seed=3)
    model.train()
    obj = TwinFlow(enhanced_ratio=0.0, adversarial=False, target_clamp=1e9, probs={"e2e": 1, "mul": 1, "any": 1})
    batch = Batch(torch.randn(24, 6, generator=torch.Generator().manual_seed(1)), torch.arange(24) % 3,
                  torch.full((24,), 3))  # fmt: skip
    torch.manual_seed(5)
    inp = obj.sample_inputs(model, batch, EvalCounter())
    t, tt, v, d = inp["t"], inp["tt"], inp["v"], obj.delta_t
    rows = t - d > tt
    assert not rows.all() and rows[-1]  # a skipped row before a rollout row: the case under test
    rng = RngState.capture()
    with torch.no_grad():
        F = model(inp["x_t"], t, tt, inp["cond"])
    got = obj.rcgm_target(model, F, inp, v, rng, EvalCounter(), paired=has_active_dropout(model))
    # whole-batch reference: N sub-steps from t_m = max(t − δ, tt) on every row, each from the captured state
    x, t_m, S = inp["x_t"] - d * v, torch.maximum(t - d, tt), torch.zeros_like(v)
    for i in range(obj.estimate_order):
        s0 = t_m + (tt - t_m) * i / obj.estimate_order
        s1 = t_m + (tt - t_m) * (i + 1) / obj.estimate_order
        rng.restore()
        with torch.no_grad():
            Fi = model(x, s0, s1, inp["cond"])
        x_hat, z_hat = x - s0[:, None] * Fi, x + (1 - s0[:, None]) * Fi
        x = s1[:, None] * z_hat + (1 - s1[:, None]) * x_hat
        S += Fi * (s0 - s1)[:, None]
    gap = (t - tt)[:, None]
    expected = F - ((gap * F - S) / d - v)
    assert (got - expected)[rows].abs().max().item() < 1e-3


def reference_loss(obj: TwinFlow, model, teacher_fn, batch: Batch) -> torch.Tensor:
    """The SPEC §2 loss the plain way: teacher passes on the whole batch, cond and uncond as separate
    passes, rectify fake and real as separate passes, the real-velocity term on its own pass. Same random
    draws as the objective: condition dropout, the shuffled null's permutation, t ~ Beta(a, b)·c, z, ..."""
    x, cond = batch.x.clone(), batch.cond.clone()
    b = len(x)
    if obj.cond_dropout > 0:  # rows trained on the null condition
        drop = torch.rand(b) < obj.cond_dropout
        cond[drop] = batch.null_cond[drop]
    uncond = cond[torch.randperm(b)] if obj.null_condition == "shuffled" else batch.null_cond
    a, bb, c = obj.time_dist
    t = torch.distributions.Beta(torch.tensor(a), torch.tensor(bb)).sample((b,)).clamp(0, 1) * c
    t = t.to(torch.promote_types(x.dtype, torch.float32))  # times in float32, float64 for float64 data
    z = torch.randn_like(x)
    tt = t - torch.rand_like(t) * obj.consistency_ratio * t
    tt_mul = t - torch.rand_like(t) * t * min(0.05, obj.consistency_ratio)
    sizes = partition_sizes(b, obj.probs)
    e2e, mul, _, adv = (torch.arange(b) < sizes["e2e"]), None, None, torch.arange(b) >= b - sizes["adv"]
    mul = (torch.arange(b) >= sizes["e2e"]) & (torch.arange(b) < sizes["e2e"] + sizes["mul"])
    t[e2e], tt[e2e] = 1.0, 0.0
    tt[mul] = tt_mul[mul]
    with torch.no_grad():
        if obj.image_free:  # SPEC §10: non-adv rows' data = the model's one-step samples x̂ = z' − f(z', 1, 0)
            zg, n = torch.randn_like(x[~adv]), int((~adv).sum())
            x[~adv] = zg - model(zg, torch.ones(n), torch.zeros(n), cond[~adv])
        zf = torch.randn_like(x[adv])
        if adv.any():
            x[adv] = zf - model(zf, torch.ones(adv.sum()), torch.zeros(adv.sum()), cond[adv])
    t[adv] = -t[adv]
    tt[adv] = t[adv]
    ta = t.abs().reshape(-1, 1)
    x_t = ta * z + (1 - ta) * x
    v = z - x
    F = model(x_t, t, tt, cond)
    with torch.no_grad():
        target = v.clone()
        Fc = teacher_fn(x_t, t, t, cond)
        Fu = teacher_fn(x_t, t, t, uncond)
        lo, hi = obj.enhanced_range
        enh = (~adv) & (t > lo) & (t < hi)
        if obj.image_free:  # the frozen teacher's guided velocity replaces v; the rollout uses the live model
            target[enh] = (Fu + obj.enhanced_ratio * (Fc - Fu))[enh]
        else:
            target[enh] += obj.enhanced_ratio * (Fc - Fu)[enh]
        rollout = model if obj.image_free else teacher_fn
        y = reference_rcgm(
            rollout, F.detach(), x_t, t, tt, target, cond, obj.estimate_order, obj.delta_t, obj.target_clamp
        )
        target[~adv] = y[~adv]
    w = time_weight(t, tt, "tan")
    w[adv] = 1
    loss = (barron_distance(F, target) * w).mean()
    if obj.adversarial:  # RCGM (adversarial off) has no rectify term
        xf = (x_t[e2e] - F[e2e]).detach()
        t2 = sample_time(int(e2e.sum()), (1, 1, 1), xf)
        x2 = t2.reshape(-1, 1) * torch.randn_like(xf) + (1 - t2.reshape(-1, 1)) * xf
        with torch.no_grad():
            fake = model(x2, -t2, -t2, cond[e2e])
            real = model(x2, t2, t2, cond[e2e])
        delta = (fake - real).clamp(-1, 1)
        loss = loss + obj.dist_match_coef * barron_distance(F[e2e], (F[e2e] - delta).detach()).mean()
    if obj.real_velocity:  # d(f(x_t, t, t), v) on the real (non-adversarial) rows
        real_rows = ~adv
        F_real = model(x_t[real_rows], t[real_rows], t[real_rows], cond[real_rows])
        loss = loss + obj.real_velocity_weight * barron_distance(F_real, v[real_rows]).mean()
    return loss


def expected_nfe(obj: TwinFlow, times: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """The network evaluations a TwinFlow step must log, counted from the (t, tt) it returns: the adversarial
    rows' one-step generation, cond + uncond on the rows inside the enhanced range, ``estimate_order`` rollout
    passes on the rows with ``t − δ > tt``, fake + real rectify passes on the e2e rows, the student (and the
    real-velocity pass) with grad."""
    t, tt = times
    b = len(t)
    sizes = partition_sizes(b, obj.probs)
    adv = t < 0
    assert int(adv.sum()) == sizes["adv"] and bool((t[: sizes["e2e"]] == 1).all())
    lo, hi = obj.enhanced_range
    n_adv, n_e2e = sizes["adv"], sizes["e2e"]
    n_enh = int(((~adv) & (t > lo) & (t < hi)).sum()) if obj.enhanced_ratio != 0 else 0
    n_roll = int(((~adv) & (t - obj.delta_t > tt)).sum())
    n_rect = n_e2e if obj.adversarial and obj.dist_match_coef != 0 else 0
    passes = [(n_adv, 1), (n_enh, 2), (n_roll, obj.estimate_order), (n_rect, 2)]  # (rows, passes over them)
    rows_grad = b + (b - n_adv if obj.real_velocity else 0)
    rows_nograd = sum(n * k for n, k in passes)
    by_pass = {"student": b, "real_velocity": b - n_adv if obj.real_velocity else 0}
    by_pass.update(zip(("adv_generate", "teacher_enhance", "teacher_rollout", "rectify"), (n * k for n, k in passes)))
    return {
        **{f"nfe/rows/{name}": rows for name, rows in by_pass.items() if rows > 0},  # the passes that ran
        "nfe/calls_grad": 1 + int(obj.real_velocity),
        "nfe/calls_nograd": sum((k if n > 0 else 0) for n, k in [(n_adv, 1), (n_enh, 1), (n_roll, obj.estimate_order),
                                                                  (n_rect, 1)]),
        "nfe/rows_grad": rows_grad,
        "nfe/rows_nograd": rows_nograd,
        "nfe/per_step": (rows_grad + rows_nograd) / b,
    }  # fmt: skip


# Each objective option against the reference, and against the same settings without it: every option must
# change the loss (same weights; cond_dropout's baseline draws the same dropout mask and drops no row). The
# enhanced target reaches the loss only through the RCGM residual, which target_clamp 1 saturates on most
# rows (the residual is divided by delta_t), so the condition options run unclamped.
UNCLAMPED = {"target_clamp": 100.0}
OPTIONS = {
    "default": ({}, None),
    "unclamped": (UNCLAMPED, None),
    "cond_dropout": ({"cond_dropout": 0.4, **UNCLAMPED}, {"cond_dropout": 1e-9, **UNCLAMPED}),
    "null_shuffled": ({"null_condition": "shuffled", **UNCLAMPED}, UNCLAMPED),
    "real_velocity": ({"real_velocity": True, "real_velocity_weight": 0.7}, {}),
    "enhanced_range": ({"enhanced_range": (0.3, 0.8), **UNCLAMPED}, UNCLAMPED),
    "time_dist": ({"time_dist": (2.0, 1.0, 0.8)}, {}),
}


def option_loss(options: dict, reference: bool, dtype: torch.dtype = torch.float32):
    """TwinFlow(enhanced 0.6, order 2, options) on a fixed batch: the objective's loss and logs, or the
    reference loss. Teacher and student have every weight non-zero (the zero-initialised modulation layers
    too, else the label would not reach the output and cond/uncond passes would agree) and differ. Model and
    batch in ``dtype``."""
    model = tiny_model(seed=7).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ema = EMATeacher(decay=0.9)
    ema.bind(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = TwinFlow(**{"enhanced_ratio": 0.6, "estimate_order": 2, **options})
    batch = Batch(torch.randn(24, 6, generator=torch.Generator().manual_seed(5)).to(dtype), torch.arange(24) % 3,
                  torch.full((24,), 3))  # fmt: skip
    torch.manual_seed(11)
    if reference:
        return obj, reference_loss(obj, model, ema.model, batch), None
    return obj, *obj.loss(model, ema, batch, 0)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_batched_loss_equals_unbatched_reference(option):
    options, without = OPTIONS[option]
    obj, got, logs = option_loss(options, reference=False)
    _, expected, _ = option_loss(options, reference=True)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    if without is not None:
        _, baseline, _ = option_loss(without, reference=False)
        assert abs(got.item() - baseline.item()) > 1e-3 * abs(baseline.item()), "the option changed nothing"
    # exact network-evaluation counts; fewer rows than the reference's full-batch passes
    counts = {k: v for k, v in logs.items() if k.startswith("nfe/")}
    assert counts == expected_nfe(obj, logs["times"])
    assert counts["nfe/rows_nograd"] < 6 + 2 * 24 + 2 * 24 + 2 * 6


def test_nfe_counts_of_a_batch_without_adversarial_rows_or_enhancement():
    """RCGM, enhancement off: only rollout passes without grad; counts still follow from the returned times."""
    model = tiny_model(seed=3)
    obj = TwinFlow(adversarial=False, enhanced_ratio=0.0, estimate_order=3)
    teacher = EMATeacher(decay=0.5)
    teacher.bind(model)
    torch.manual_seed(2)
    _, logs = obj.loss(model, teacher, Batch(torch.randn(30, 6), torch.arange(30) % 3, torch.full((30,), 3)), 0)
    t, tt = logs["times"]
    n_roll = int((t - obj.delta_t > tt).sum())
    assert 0 < n_roll < 30
    assert logs["nfe/calls_grad"] == 1 and logs["nfe/rows_grad"] == 30
    assert logs["nfe/calls_nograd"] == 3 and logs["nfe/rows_nograd"] == 3 * n_roll
    assert logs["nfe/per_step"] == (30 + 3 * n_roll) / 30
    assert logs == {**logs, **expected_nfe(obj, logs["times"])}


def test_flow_matching_counts_one_grad_pass():
    model = tiny_model(time_pair=False)
    teacher = StudentTeacher(allow_student_teacher=True)
    teacher.bind(model)
    _, logs = FlowMatching(cond_dropout=0.2).loss(model, teacher, Batch(torch.randn(16, 6), torch.arange(16) % 3,
                                                                         torch.full((16,), 3)), 0)  # fmt: skip
    assert {k: v for k, v in logs.items() if k.startswith("nfe/")} == {
        "nfe/calls_grad": 1, "nfe/calls_nograd": 0, "nfe/rows_grad": 16, "nfe/rows_nograd": 0, "nfe/per_step": 1.0,
        "nfe/rows/student": 16,
    }  # fmt: skip


def test_time_dist_is_a_scaled_beta():
    """objective.time_dist = [a, b, c]: t ~ Beta(a, b)·c. Beta(2, 5)·0.8 has mean 0.8·2/7 = 0.22857 and
    standard deviation 0.8·sqrt(10 / (49·8)) = 0.12778; the standard error of 20,000 draws is 0.0009."""
    torch.manual_seed(0)
    t = sample_time(20_000, (2.0, 5.0, 0.8), torch.zeros(1))
    assert t.dtype == torch.float32 and 0.0 <= t.min().item() and t.max().item() <= 0.8
    assert t.mean().item() == pytest.approx(0.8 * 2 / 7, abs=0.004)
    assert t.std().item() == pytest.approx(0.8 * math.sqrt(10 / (49 * 8)), abs=0.004)


def test_float64_data_stays_float64_through_twinflow():
    """float64 data and model (an analysis run): times, targets and every loss term stay float64 (TwinFlow used
    to cast the target to float32, and the RCGM index-put then failed), and the loss equals the unbatched
    float64 reference to 1e-12, far below float32 rounding (~1e-7)."""
    options = {"real_velocity": True, "real_velocity_weight": 0.7}
    obj, got, logs = option_loss(options, reference=False, dtype=torch.float64)
    _, expected, _ = option_loss(options, reference=True, dtype=torch.float64)
    assert got.dtype == expected.dtype == torch.float64 and all(v.dtype == torch.float64 for v in logs["times"])
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    terms = ("main", "e2e", "mul", "any", "adv", "rectify", "real_velocity")
    assert all(logs[f"loss/{k}"].dtype == torch.float64 for k in terms)
    got.backward()  # the gradient path is float64 too (no dtype mismatch anywhere)


def test_float64_data_stays_float64_through_flow_matching():
    model = tiny_model(seed=2).double()
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batch = Batch(x, torch.arange(16) % 3, torch.full((16,), 3))
    fm = FlowMatching(time_weighting="tan")
    torch.manual_seed(4)
    loss, logs = fm.loss(model, None, batch, 0)
    t = logs["times"][0]
    assert loss.dtype == torch.float64 and t.dtype == torch.float64
    torch.manual_seed(4)
    t_ref = sample_time(16, (1.0, 1.0, 1.0), x)
    z = torch.randn_like(x)
    x_t = t_ref[:, None] * z + (1 - t_ref[:, None]) * x
    with torch.no_grad():
        per_row = (model(x_t, t_ref, t_ref, batch.cond) - (z - x)).pow(2).mean(dim=1)
    expected = (per_row * (torch.tan((1 - (t_ref - t_ref)) * math.pi / 2.5) + 1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["meanflow", "scm"])
def test_float64_data_stays_float64_through_the_jvp_objectives(name):
    """MeanFlow and sCM on float64 data: times, targets and the loss stay float64 (no float32 round trip)."""
    from fewstep.objectives.meanflow import MeanFlow
    from fewstep.objectives.scm import SCM

    torch.manual_seed(0)
    model = tiny_model(seed=3).double()
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    batch = Batch(x, torch.arange(8) % 3, torch.full((8,), 3))
    obj = MeanFlow() if name == "meanflow" else SCM()
    loss, logs = obj.loss(model, None, batch, 0)
    assert loss.dtype == logs["loss/main"].dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in logs["times"])
    loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters() if p.grad is not None)


def image_free_case(options: dict, reference: bool, data_scale: float = 1.0):
    """TwinFlow(image_free, enhanced 4.0 as openuni_full_imgfree) with a frozen teacher; the student has moved
    away from the frozen weights, so a rollout with the wrong model shows in the loss."""
    from fewstep.teachers import FrozenTeacher

    model = tiny_model(seed=7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    frozen = FrozenTeacher()
    frozen.bind(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = TwinFlow(**{"image_free": True, "enhanced_ratio": 4.0, "target_clamp": 100.0, **options})
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(5)) * data_scale
    batch = Batch(x, torch.arange(24) % 3, torch.full((24,), 3))
    torch.manual_seed(11)
    if reference:
        return obj, reference_loss(obj, model, frozen.model, batch), None
    return obj, *obj.loss(model, frozen, batch, 0)


@pytest.mark.parametrize("options", [{}, {"adversarial": False}, {"estimate_order": 1, "enhanced_range": (0.2, 0.9)}])
def test_image_free_loss_equals_reference_formula(options):
    """SPEC §10 pinned: data = the student's one-step samples, target on the enhanced non-adv rows =
    f_T(∅) + w·(f_T(c) − f_T(∅)) with the frozen teacher, then RCGM rolled out with the live student."""
    obj, got, logs = image_free_case(options, reference=False)
    _, expected, _ = image_free_case(options, reference=True)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    n_adv = partition_sizes(24, obj.probs)["adv"]
    assert logs["nfe/rows_nograd"] >= 24 - n_adv  # the image-free generation pass ran on every non-adv row
    # only the shape of the data is used: scaling the batch changes nothing
    _, scaled, _ = image_free_case(options, reference=False, data_scale=5.0)
    assert scaled.item() == got.item()
    # and the image-free target differs from the ordinary enhanced target on the same draws
    torch.manual_seed(0)
    _, plain, _ = image_free_case({**options, "image_free": False}, reference=False)
    assert abs(plain.item() - got.item()) > 1e-3 * abs(got.item())


def test_image_free_target_is_the_guided_teacher_velocity():
    """enhance_target alone: rows in the range get f_T(∅) + w·(f_T(c) − f_T(∅)); the others keep v."""
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.2, 0.5, 0.95, 0.7])
    x0, z = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    inp = make_inputs(t, t.clone(), x0, z)
    inp["masks"]["adv"][3] = True

    def teacher(x, s, s2, c):
        return torch.sin(x) * s.reshape(-1, 1) + 0.5 * c.reshape(-1, 1).float()

    obj = TwinFlow(image_free=True, enhanced_ratio=4.0, enhanced_range=(0.1, 0.9))
    v = z - x0
    target = v.clone()
    obj.enhance_target(teacher, inp, target, RngState.capture(), EvalCounter())
    fc, fu = teacher(inp["x_t"], t, t, inp["cond"]), teacher(inp["x_t"], t, t, inp["uncond"])
    expected = v.clone()
    expected[:2] = (fu + 4.0 * (fc - fu))[:2]  # t = 0.95 is outside the range, row 3 is adversarial
    assert torch.allclose(target, expected, atol=1e-6)
    assert torch.allclose(target[0], torch.sin(inp["x_t"][0]) * 0.2 + 0.5 * (1 - 4.0), atol=1e-6)


def test_image_free_needs_a_guidance_weight():
    with pytest.raises(ValueError, match="enhanced_ratio"):
        TwinFlow(image_free=True, enhanced_ratio=0.0)


class SignedProbe(torch.nn.Module):
    """``f(x, t, tt) = 0.5·x + 0.25·sign(t)``, plus a zero offset on the grad pass whose gradient is d loss/dF: the
    fake (negative-time) and real passes differ by exactly −0.5 everywhere, so rectify's δ is known."""

    def __init__(self, shape):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))

    def forward(self, x, t, tt, cond):
        out = 0.5 * x + 0.25 * torch.sign(t).reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return out + self.offset if torch.is_grad_enabled() else out


@pytest.mark.parametrize("coef", [0.5, 1.0])
def test_rectify_pulls_the_one_step_output_along_the_fake_minus_real_velocity(coef):
    """Rectify (SPEC §2): ``d(F_e2e, sg(F_e2e) − δ)`` with ``δ = clamp(f(x', −t) − f(x', t), ±1)``; its gradient
    is ``2·δ/(n·D)`` per element (L2), weighted by ``dist_match_coef``. With δ = −0.5 everywhere the rectify part
    of d loss/dF is −coef/(n·D): its sign and size pin the term (``sg(F) + δ`` flips it; coef = 1 was once read as
    "off"). The value ``mean δ² = 0.25`` is logged."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = Batch(x, torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long))
    grads = {}
    for c in (0.0, coef):
        probe = SignedProbe(x.shape)
        teacher = StudentTeacher(allow_student_teacher=True)
        teacher.bind(probe)
        objective = TwinFlow(
            probs={"e2e": 1, "mul": 0, "any": 0, "adv": 0}, consistency_ratio=0.0, enhanced_ratio=0.0,
            loss={"type": "l2"}, time_weighting="none", dist_match_coef=c, adversarial=True,
        )  # fmt: skip
        torch.manual_seed(3)
        loss, logs = objective.loss(probe, teacher, batch, 0)
        loss.backward()
        grads[c] = probe.offset.grad.clone()
        if c:
            assert logs["loss/rectify"].item() == pytest.approx(0.25, rel=1e-12)
    rectify_grad = grads[coef] - grads[0.0]
    assert torch.allclose(rectify_grad, torch.full_like(x, -coef / x.numel()), rtol=1e-9, atol=0)


def test_flow_matching_loss_by_hand_with_condition_dropout():
    """FlowMatching (l2, no time weighting, cond_dropout 0.5) against the same draws by hand: drop = rand(B) <
    p, t ~ Beta(1, 1), z ~ N(0, 1); the network sees the null condition on the dropped rows. ``loss/main`` is the
    loss; one grad pass of B rows."""

    def net(x, t, tt, cond):
        return 0.5 * x + cond.to(x.dtype)[:, None] + 0.1 * t[:, None]

    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond, null = torch.full((16,), 2), torch.full((16,), -3)
    objective = FlowMatching(loss={"type": "l2"}, time_weighting="none", cond_dropout=0.5)
    torch.manual_seed(7)
    loss, logs = objective.loss(net, None, Batch(x, cond, null), 0)
    torch.manual_seed(7)
    drop = torch.rand(16) < 0.5
    t = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((16,)).clamp_(0, 1).double()
    z = torch.randn_like(x)
    seen = torch.where(drop, null, cond)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    expected = (net(x_t, t, t, seen) - (z - x)).pow(2).mean()
    assert 0 < drop.sum() < 16  # both kinds of rows are there
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert logs["loss/main"].item() == loss.item() and logs["nfe/per_step"] == 1.0
