"""TwinFlow / RCGM (SPEC §2, §10) pinned further with numbers: its defaults, the one-line config errors and the
batch-size warning a user sees, the random draws of a step reproduced from the seed (any-step target times, the
condition dropout strict at its rate), the devices and dtypes the inputs are made in, the one-step samples of the
adversarial and image-free rows, and the rows each pass runs on (nfe/rows/<pass>), paired under dropout."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from test_twinflow_math import tiny_model

import fewstep.objectives.twinflow as twinflow
from fewstep.config.checks import ConfigError
from fewstep.data.base import Batch
from fewstep.objectives.base import EvalCounter, barron_distance
from fewstep.objectives.twinflow import RCGM, TwinFlow, TwinFlowConfig, partition_sizes
from fewstep.teachers import EMATeacher

from helpers import compose

# -- defaults and constructor errors ------------------------------------------------------------------------------


def test_defaults_match_the_config_schema():
    obj, schema = TwinFlow(), TwinFlowConfig()
    for f in dataclasses.fields(TwinFlowConfig):
        if f.name in ("_target_", "loss"):
            continue
        want = getattr(schema, f.name)
        if f.name == "probs":
            want = dataclasses.asdict(want)
        elif isinstance(want, list):
            want = tuple(want)
        assert getattr(obj, f.name) == want, f.name
    assert (obj.target_step_count, obj.estimate_order, obj.enhanced_ratio, obj.delta_t) == (2, 2, 0.5, 0.01)
    assert (obj.target_clamp, obj.consistency_ratio, obj.dist_match_coef, obj.real_velocity_weight) == (1, 1, 0.5, 1)
    assert obj.allow_diff2flow is False and obj.adversarial is True
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert torch.equal(obj.distance(p, t), barron_distance(p, t, alpha=1.0, c=1e-3))


def test_options_are_kept_with_their_types():
    obj = TwinFlow(target_step_count=3.0, allow_diff2flow=1, estimate_order=3)
    assert obj.target_step_count == 3 and type(obj.target_step_count) is int and obj.estimate_order == 3
    assert obj.allow_diff2flow is True
    assert TwinFlow(allow_diff2flow=True).allow_diff2flow is True


def test_rcgm_is_twinflow_without_the_adversarial_branch():
    obj = RCGM(estimate_order=3, adversarial=True, probs={"e2e": 1.0, "mul": 2.0, "any": 1.0, "adv": 5.0})
    assert obj.adversarial is False and obj.estimate_order == 3
    assert obj.probs == {"e2e": 1.0, "mul": 2.0, "any": 1.0, "adv": 0.0}
    assert partition_sizes(8, obj.probs) == {"e2e": 2, "mul": 4, "any": 2, "adv": 0}
    default = RCGM()
    assert default.adversarial is False and default.probs == {"e2e": 1.0, "mul": 1.0, "any": 1.0, "adv": 0.0}
    assert default.estimate_order == 2 and default.target_clamp == 1.0


def test_constructor_errors_word_for_word():
    with pytest.raises(ValueError) as err:
        TwinFlow(null_condition="empty")
    assert str(err.value) == "objective.null_condition='empty' is unknown; use 'null' or 'shuffled'"
    with pytest.raises(ValueError) as err:
        TwinFlow(image_free=True, enhanced_ratio=0)
    assert str(err.value) == (
        "objective.image_free=true needs objective.enhanced_ratio != 0 (its target is the frozen teacher's "
        "guided velocity f_T(null) + w*(f_T(c) - f_T(null)); the reference uses 4.0)"
    )


def test_partition_reads_a_missing_group_as_zero():
    assert partition_sizes(6, {"mul": 1.0}) == {"e2e": 0, "mul": 6, "any": 0, "adv": 0}
    assert partition_sizes(4, {"adv": 2.0, "e2e": 2.0}) == {"e2e": 2, "mul": 0, "any": 0, "adv": 2}
    with pytest.raises(ValueError) as err:
        partition_sizes(4, {"e2e": 0.0, "adv": -1.0})
    assert str(err.value) == "objective.probs are all zero; give at least one of e2e/mul/any/adv a positive share"


# -- check_config -------------------------------------------------------------------------------------------------


def config(batch_size=8, teacher=None, drop=(), **objective):
    """The parts of a composed config TwinFlow.check_config reads: the objective (the schema's defaults, without
    the keys in ``drop``), data.batch_size and the teacher."""
    obj = dataclasses.asdict(TwinFlowConfig())
    obj.update(objective)
    for key in drop:
        del obj[key]
    teacher = teacher if teacher is not None else {"_target_": "fewstep.teachers.EMATeacher", "decay": 0.999}
    return OmegaConf.create({"objective": obj, "data": {"batch_size": batch_size}, "teacher": teacher})


def check(**kwargs) -> list[str]:
    """Run the check; the warnings it gave."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        TwinFlow.check_config(config(**kwargs))
    return [str(r.message) for r in records]


@pytest.mark.parametrize(
    "options",
    [
        {"estimate_order": 1},
        {"delta_t": 0.5},
        {"target_step_count": 1},
        {"target_step_count": 8},
        {"probs": {"e2e": 0.5, "mul": 0.0, "any": 0.0, "adv": 0.0}},  # a positive sum below 1
        {"consistency_ratio": 0.0},
        {"consistency_ratio": 0.5},
        {"time_dist": [0.5, 3.0, 1.0]},
        {"enhanced_range": [0.0, 1.0]},
    ],
)
def test_edge_values_that_are_allowed(options):
    assert check(**options) == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"estimate_order": 0}, "objective.estimate_order=0 must be >= 1 (2 is the paper default)"),
        ({"delta_t": 0.51}, "objective.delta_t=0.51 must lie in (0, 0.5] (0.01 is the default)"),
        ({"target_step_count": 0}, "objective.target_step_count=0 must lie in [1, 8] (1-4 recommended)"),
        ({"target_step_count": 9}, "objective.target_step_count=9 must lie in [1, 8] (1-4 recommended)"),
        ({"probs": {"e2e": 1.0, "mul": -0.5, "any": 1.0, "adv": 1.0}},
         "objective.probs={'e2e': 1.0, 'mul': -0.5, 'any': 1.0, 'adv': 1.0} must be >= 0 with a positive sum, "
         "e.g. {e2e: 1, mul: 1, any: 1, adv: 1}"),
        ({"time_dist": [1.0, 0.0, 1.0]},
         "objective.time_dist=[1.0, 0.0, 1.0] must have a, b > 0 and 0 < c <= 1 (t ~ Beta(a, b)*c must stay in "
         "[0, 1]; [1, 1, 1] is the default)"),
        ({"time_dist": [1.0, 1.0, 0.0]},
         "objective.time_dist=[1.0, 1.0, 0.0] must have a, b > 0 and 0 < c <= 1 (t ~ Beta(a, b)*c must stay in "
         "[0, 1]; [1, 1, 1] is the default)"),
        ({"consistency_ratio": 1.5},
         "objective.consistency_ratio=1.5 must lie in [0, 1] (tt = t - u*r*t must stay in [0, t]; 1.0 is the "
         "default)"),
    ],
)  # fmt: skip
def test_config_errors_word_for_word(options, message):
    with pytest.raises(ConfigError) as err:
        check(**options)
    assert str(err.value) == message


FROZEN = {"_target_": "fewstep.teachers.FrozenTeacher"}


def test_image_free_needs_a_frozen_teacher_word_for_word():
    assert check(image_free=True, enhanced_ratio=4.0, teacher=FROZEN) == []
    ema_one = {"_target_": "fewstep.teachers.EMATeacher", "decay": 1.0}
    assert check(image_free=True, enhanced_ratio=4.0, teacher=ema_one) == []
    for teacher in ({"_target_": "fewstep.teachers.EMATeacher", "decay": 0.99}, {"decay": 1.0}):
        with pytest.raises(ConfigError) as err:
            check(image_free=True, enhanced_ratio=4.0, teacher=teacher)
        assert str(err.value) == (
            f"objective.image_free=true needs a frozen teacher (got teacher._target_={teacher.get('_target_')}): "
            "use teacher=frozen or teacher=ema teacher.decay=1.0"
        )
    with pytest.raises(ConfigError) as err:
        check(image_free=True, enhanced_ratio=0.0, teacher=FROZEN)
    assert str(err.value) == (
        "objective.image_free=true needs objective.enhanced_ratio != 0: its target is the frozen teacher's guided "
        "velocity f_T(null) + w*(f_T(c) - f_T(null)), w = enhanced_ratio (the reference uses 4.0)"
    )


def test_a_config_without_image_free_is_not_image_free():
    """An objective config from before the option (no image_free key) trains on data: any teacher is fine."""
    assert check(drop=("image_free",)) == []
    assert check(drop=("image_free",), enhanced_ratio=0.0) == []


def small_batch(batch_size: int, active: int) -> str:
    return (
        f"data.batch_size={batch_size} is smaller than the {active} active objective.probs groups: "
        "some groups will be empty in every step"
    )


@pytest.mark.parametrize(
    "batch_size, options, warned",
    [
        (1, {}, [small_batch(1, 4)]),
        (3, {}, [small_batch(3, 4)]),
        (4, {}, []),
        (0, {}, []),  # below 1 is refused by the common checks, not warned about here
        (1, {"probs": {"e2e": 1.0, "mul": 0.0, "any": 0.0, "adv": 0.0}}, []),  # zero shares are not active
        (2, {"probs": {"e2e": 1.0, "mul": 0.0, "any": 2.0, "adv": 0.0}}, []),
        (1, {"probs": {"e2e": 1.0, "mul": 0.0, "any": 2.0, "adv": 0.0}}, [small_batch(1, 2)]),
        (2, {"adversarial": False}, [small_batch(2, 3)]),  # adv is inactive without the adversarial branch
        (3, {"adversarial": False}, []),
    ],
)
def test_batch_smaller_than_the_active_groups_warns(batch_size, options, warned):
    assert check(batch_size=batch_size, **options) == warned


def test_batch_size_warning_points_at_the_caller_of_validate():
    from fewstep.config.validate import validate

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        validate(compose(["data.batch_size=2"]))
    ours = [r for r in records if str(r.message).startswith("data.batch_size=")]
    assert [str(r.message) for r in ours] == [small_batch(2, 4)]
    # (under mutation testing a trampoline frame of mutmut's sits between validate() and the check)
    assert ours[0].filename == __file__ or "/mutmut/" in ours[0].filename, ours[0].filename


# -- the inputs of a step ------------------------------------------------------------------------------------------


def toy_model(calls: list | None = None):
    """``f(x, t, tt, c) = 0.5·x + 0.1·t + 0.01·c`` (no weights), recording (rows, t dtype, tt dtype, t, tt)."""

    def f(x, t, tt, c):
        if calls is not None:
            calls.append((x.shape[0], t.dtype, tt.dtype, t.clone(), tt.clone()))
        shape = (-1, *([1] * (x.ndim - 1)))
        return 0.5 * x + 0.1 * t.reshape(shape).to(x.dtype) + 0.01 * c.reshape(shape).to(x.dtype)

    return f


def batch_of(n: int, dtype=torch.float32, seed: int = 0) -> Batch:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return Batch(x, torch.arange(n) % 3, torch.full((n,), 3))


def test_any_step_and_multi_step_target_times_by_hand():
    """tt = t − u·r·t on the any rows and t − u'·t·min(0.05, r) on the mul rows, u and u' the draws after the
    times and the noise; with r = 0.5 the any rows keep tt in [t/2, t]."""
    obj = TwinFlow(consistency_ratio=0.5, probs={"e2e": 1, "mul": 2, "any": 3, "adv": 0}, time_dist=(2.0, 1.0, 1.0))
    batch = batch_of(12)
    torch.manual_seed(3)
    inp = obj.sample_inputs(None, batch, EvalCounter())
    torch.manual_seed(3)
    t = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(1.0)).sample((12,))
    z = torch.randn_like(batch.x)
    u, u_mul = torch.rand_like(t), torch.rand_like(t)
    e2e, mul, any_ = slice(0, 2), slice(2, 6), slice(6, 12)
    assert torch.equal(inp["z"], z)
    assert torch.equal(inp["t"][e2e], torch.ones(2)) and torch.equal(inp["tt"][e2e], torch.zeros(2))
    assert torch.equal(inp["t"][2:], t[2:])
    assert torch.equal(inp["tt"][any_], t[any_] - u[any_] * 0.5 * t[any_])
    assert torch.equal(inp["tt"][mul], t[mul] - u_mul[mul] * t[mul] * 0.05)
    assert (inp["tt"][any_] >= inp["t"][any_] / 2).all()
    assert (u[any_] > 0.5).any()  # where r·u and u/r part


def test_inputs_are_the_path_of_the_returned_noise():
    obj = TwinFlow()
    batch = batch_of(8)
    torch.manual_seed(1)
    inp = obj.sample_inputs(toy_model(), batch, EvalCounter())
    ta = inp["t"].abs()[:, None]
    assert torch.allclose(inp["x_t"], ta * inp["z"] + (1 - ta) * inp["x"], atol=1e-6)
    assert torch.equal(inp["v"], inp["z"] - inp["x"])
    assert (inp["t"] < 0).sum() == 2  # the adversarial rows


def test_condition_dropout_is_strict_at_its_rate():
    """cond → null on the rows whose uniform draw is below cond_dropout: a row whose draw equals it keeps cond."""
    batch = batch_of(6)
    torch.manual_seed(5)
    u = torch.rand(6)
    rate = sorted(u.tolist())[3]
    obj = TwinFlow(cond_dropout=rate, probs={"e2e": 0, "mul": 1, "any": 1, "adv": 0})
    torch.manual_seed(5)
    inp = obj.sample_inputs(None, batch, EvalCounter())
    dropped = u < rate
    assert dropped.sum() == 3
    assert torch.equal(inp["cond"], torch.where(dropped, batch.null_cond, batch.cond))


def test_one_adversarial_row_is_a_one_step_sample_on_negative_time():
    obj = TwinFlow(probs={"e2e": 0, "mul": 3, "any": 0, "adv": 1})
    batch = batch_of(4)
    calls, counter = [], EvalCounter(batch=4)
    torch.manual_seed(2)
    inp = obj.sample_inputs(toy_model(calls), batch, counter)
    torch.manual_seed(2)
    t = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((4,))
    z = torch.randn_like(batch.x)
    torch.rand_like(t), torch.rand_like(t)
    z_fake = torch.randn(1, 3)
    assert counter.by_pass == {"adv_generate": 1} and counter.calls_nograd == 1
    assert torch.equal(calls[0][3], torch.ones(1)) and torch.equal(calls[0][4], torch.zeros(1))
    F = 0.5 * z_fake + 0.1 + 0.01 * 0  # cond of row 3 is 3 % 3 = 0
    assert torch.allclose(inp["x"][3:], z_fake - F, atol=1e-7) and torch.equal(inp["x"][:3], batch.x[:3])
    assert torch.equal(inp["z"], z)
    assert inp["t"][3] == -t[3] and inp["tt"][3] == -t[3]


@pytest.mark.parametrize("image_free", [False, True])
def test_one_step_samples_keep_a_low_precision_datas_dtype(image_free):
    """bf16 data: the generated samples (formed in float32) are stored back in bf16."""
    obj = TwinFlow(image_free=image_free)
    batch = batch_of(8, dtype=torch.bfloat16)
    torch.manual_seed(0)
    inp = obj.sample_inputs(toy_model(), batch, EvalCounter())
    assert inp["x"].dtype == torch.bfloat16 and inp["x_t"].dtype == torch.bfloat16
    adv = inp["masks"]["adv"]
    assert not torch.equal(inp["x"][adv], batch.x[adv])
    assert torch.equal(inp["x"][~adv], batch.x[~adv]) != image_free  # image-free: every row is generated


@pytest.mark.parametrize("image_free", [False, True])
def test_one_step_samples_are_called_with_times_in_the_datas_dtype(image_free):
    """float64 data: the generation passes see float64 times 1 and 0 (the dtype of every other time)."""
    obj = TwinFlow(image_free=image_free)
    batch = batch_of(8, dtype=torch.float64)
    calls, counter = [], EvalCounter(batch=8)
    torch.manual_seed(0)
    inp = obj.sample_inputs(toy_model(calls), batch, counter)
    assert inp["t"].dtype == torch.float64
    expected = {"adv_generate": 2, **({"image_free_generate": 6} if image_free else {})}
    assert counter.by_pass == expected and [c[0] for c in calls] == sorted(expected.values(), reverse=True)
    for _, t_dtype, tt_dtype, t, tt in calls:
        assert t_dtype == tt_dtype == torch.float64
        assert (t == 1).all() and (tt == 0).all()


def test_image_free_with_only_adversarial_rows_generates_them_once():
    obj = TwinFlow(image_free=True, enhanced_ratio=4.0, probs={"e2e": 0, "mul": 0, "any": 0, "adv": 1})
    calls, counter = [], EvalCounter(batch=4)
    torch.manual_seed(0)
    obj.sample_inputs(toy_model(calls), batch_of(4), counter)
    assert counter.by_pass == {"adv_generate": 4} and counter.calls_nograd == 1 and len(calls) == 1


@pytest.mark.parametrize("image_free", [False, True])
def test_every_input_is_made_on_the_datas_device(monkeypatch, image_free):
    """Tensors a step creates go on the data's device, not the default one: with the default device set to meta,
    CPU data gives the same CPU inputs as without (the times are fixed so the meta default cannot reach them)."""
    times = torch.rand(12, generator=torch.Generator().manual_seed(0)).double()
    monkeypatch.setattr(twinflow, "sample_time", lambda n, dist, like: times.clone())
    obj = TwinFlow(cond_dropout=0.5, null_condition="shuffled", image_free=image_free, enhanced_ratio=4.0)
    batch = batch_of(12, dtype=torch.float64)
    torch.manual_seed(7)
    expected = obj.sample_inputs(toy_model(), batch, EvalCounter())
    torch.manual_seed(7)
    with torch.device("meta"):
        got = obj.sample_inputs(toy_model(), batch, EvalCounter())
    for key, value in expected.items():
        if key == "masks":
            for k, m in value.items():
                assert got[key][k].device.type == "cpu" and torch.equal(got[key][k], m), k
        else:
            assert got[key].device.type == "cpu" and torch.equal(got[key], value), key
    assert not torch.equal(expected["cond"], batch.cond) and not torch.equal(expected["uncond"], batch.cond)


# -- the passes of a step ------------------------------------------------------------------------------------------


def pass_rows(logs: dict) -> dict:
    return {k.removeprefix("nfe/rows/"): v for k, v in logs.items() if k.startswith("nfe/rows/")}


def test_image_free_step_logs_each_pass():
    """Image-free with a frozen teacher: every non-adversarial row is generated, the guided target runs on the rows
    inside the enhanced range, the RCGM rollout on the rows with t − δ > tt."""
    from fewstep.teachers import FrozenTeacher

    model = tiny_model(seed=1)
    frozen = FrozenTeacher()
    frozen.bind(model)
    obj = TwinFlow(image_free=True, enhanced_ratio=4.0, real_velocity=True, estimate_order=3)
    torch.manual_seed(2)
    _, logs = obj.loss(model, frozen, Batch(torch.randn(16, 6), torch.arange(16) % 3, torch.full((16,), 3)), 0)
    t, tt = logs["times"]
    adv = t < 0
    n_roll = int(((~adv) & (t - obj.delta_t > tt)).sum())
    n_enh = int(((~adv) & (t > 0) & (t < 1)).sum())
    assert 0 < n_roll < 12 and 0 < n_enh < 12
    assert pass_rows(logs) == {
        "image_free_generate": 12,
        "adv_generate": 4,
        "student": 16,
        "teacher_enhance": 2 * n_enh,
        "teacher_rollout": 3 * n_roll,
        "rectify": 2 * 4,
        "real_velocity": 12,
    }


def test_under_dropout_the_teacher_passes_run_on_the_whole_batch():
    """A student with active dropout pairs the passes (has_active_dropout): the enhanced target and the RCGM
    rollout then run on every row, adversarial ones included, to draw the student pass's masks row for row."""
    model = tiny_model(dropout=0.3, seed=2)
    model.train()
    teacher = EMATeacher(decay=0.5)
    teacher.bind(model)
    obj = TwinFlow(estimate_order=2, real_velocity=True)
    torch.manual_seed(4)
    _, logs = obj.loss(model, teacher, Batch(torch.randn(8, 6), torch.arange(8) % 3, torch.full((8,), 3)), 0)
    t, tt = logs["times"]
    assert int(((t >= 0) & (t - obj.delta_t > tt)).sum()) < 8  # unpaired, the rollout would run on fewer rows
    assert pass_rows(logs) == {
        "adv_generate": 2,
        "student": 8,
        "teacher_enhance": 2 * 8,
        "teacher_rollout": 2 * 8,
        "rectify": 2 * 2,
        "real_velocity": 6,
    }
    assert logs["nfe/calls_nograd"] == 1 + 2 + 2 + 1  # adv generation, cond + uncond, 2 rollout steps, rectify
