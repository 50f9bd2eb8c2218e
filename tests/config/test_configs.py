"""Every shipped YAML composes and instantiates; every bad value fails with a one-line fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.utils import instantiate

from fewstep.config.searchpath import CONF_DIR
from fewstep.config.validate import ConfigError, validate

from helpers import compose

CONF = CONF_DIR
GROUPS = ["objective", "teacher", "sampler", "model", "data", "trainer", "logger"]
NEEDS_FILES = {
    "model": {"sd35", "sd35_lora", "sd15", "sdxl", "sdxl_lora", "qwenimage", "qwenimage_lora", "sana", "sana_lora"}
    | {"openuni", "openuni_lora"},  # need a converted OpenUni folder (python -m fewstep.convert_openuni)
    "data": {"latents"},
}


def choices(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_group_choice_composes_and_instantiates(group, choice):
    cfg = compose([f"{group}={choice}"])
    node = cfg[group]
    if choice in NEEDS_FILES.get(group, set()) or group in ("trainer", "logger"):
        assert node  # composes; building needs weights/data files the tests create elsewhere
        return
    if group == "model":
        data = instantiate(cfg.data)
        instantiate(node, data_shape=list(data.shape), num_classes=data.num_classes, time_pair=True, _convert_="all")
    elif group == "teacher" and choice == "student":
        assert instantiate(node).allow_student_teacher is False
    else:
        instantiate(node, _convert_="all")


def test_every_experiment_composes():
    exps = sorted(
        str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml")
    )
    for exp in exps:
        if Path(exp).name.startswith("_"):
            continue
        cfg = compose([f"experiment={exp}"])
        assert cfg.objective is not None


# Every check of fewstep.config.validate.validate(): (overrides, the key the one-line error must name, the rest of the
# message). Tested beside their features: the MeanFlow / sCM ranges (tests/objectives/test_meanflow.py,
# test_scm.py) and a latent cache of another model family (tests/models/test_families.py).
RANGE_CHECKS = [
    (["objective.estimate_order=0"], "objective.estimate_order=0", "must be >= 1"),
    (["objective.delta_t=0.0"], "objective.delta_t=0.0", "must lie in (0, 0.5]"),
    (["objective.delta_t=0.7"], "objective.delta_t=0.7", "must lie in (0, 0.5]"),
    (["objective.target_clamp=0"], "objective.target_clamp=0.0", "must be > 0"),
    (["objective.target_step_count=9"], "objective.target_step_count=9", "must lie in [1, 8]"),
    (["objective.target_step_count=0"], "objective.target_step_count=0", "must lie in [1, 8]"),
    (["objective.probs.e2e=0", "objective.probs.mul=0", "objective.probs.any=0", "objective.probs.adv=0"],
     "objective.probs", "must be >= 0 with a positive sum"),
    (["objective.probs.adv=-1"], "objective.probs", "must be >= 0 with a positive sum"),
    (["objective.enhanced_range=[0.5,0.5]"], "objective.enhanced_range=[0.5, 0.5]", "0 <= lo < hi <= 1"),
    (["objective.enhanced_range=[-0.1,0.5]"], "objective.enhanced_range=[-0.1, 0.5]", "0 <= lo < hi <= 1"),
    (["objective.enhanced_range=[0.2,1.5]"], "objective.enhanced_range=[0.2, 1.5]", "0 <= lo < hi <= 1"),
    (["objective.time_dist=[1.0,1.0]"], "objective.time_dist=[1.0, 1.0]", "must be [a, b, c]"),
    # t > 1 (past pure noise) and tt < 0 (a negative, i.e. fake-trajectory, target time on real rows) before
    (["objective.time_dist=[1.0,1.0,1.5]"], "objective.time_dist=[1.0, 1.0, 1.5]", "a, b > 0 and 0 < c <= 1"),
    (["objective.time_dist=[0.0,1.0,1.0]"], "objective.time_dist=[0.0, 1.0, 1.0]", "a, b > 0 and 0 < c <= 1"),
    (["objective.consistency_ratio=2.0"], "objective.consistency_ratio=2.0", "must lie in [0, 1]"),
    (["objective.consistency_ratio=-0.5"], "objective.consistency_ratio=-0.5", "must lie in [0, 1]"),
    (["objective.cond_dropout=1.0"], "objective.cond_dropout=1.0", "must lie in [0, 1)"),
    (["objective=flow_matching", "objective.cond_dropout=-0.1"], "objective.cond_dropout=-0.1", "must lie in [0, 1)"),
    (["model.prediction_type=x0"], "model.prediction_type='x0'", "is unknown"),
    (["model.prediction_type=epsilon"], "diff2flow.enabled=true", "and objective.allow_diff2flow=true"),
    (["model.prediction_type=epsilon", "diff2flow.enabled=true"], "objective.allow_diff2flow=true", "bridge"),
    (["model=sd35", "model.pretrained=/no/such/pipe"], "model.pretrained=/no/such/pipe", "no such folder"),
    (["teacher=student"], "teacher.allow_student_teacher=true", "use teacher=ema"),
    (["objective.image_free=true"], "objective.image_free=true", "use teacher=frozen or teacher=ema teacher.decay=1.0"),
    (["objective.image_free=true", "teacher=student", "teacher.allow_student_teacher=true"],
     "objective.image_free=true", "needs a frozen teacher (got teacher"),
    (["objective.image_free=true", "teacher=ema", "teacher.decay=0.999"], "objective.image_free=true",
     "needs a frozen teacher (got teacher"),
    (["objective.image_free=true", "teacher=frozen", "objective.enhanced_ratio=0"], "objective.enhanced_ratio != 0",
     "guided velocity"),
    (["trainer.mixed_precision=fp8"], "trainer.mixed_precision='fp8'", "must be no, bf16 or fp16"),
    (["model=sana", "model.dtype=float16"], "model.dtype=float16", "full fine-tuning trains float16 weights"),
    (["model=sd35", "model.dtype=fp16"], "model.dtype=fp16", "use model.dtype=bfloat16"),
    *[([f"trainer.{key}=0"], f"trainer.{key}=0", "must be >= 1")
      for key in ("grad_accum", "log_every", "checkpoint_every", "sample_every", "keep_last", "max_nonfinite")],
    (["trainer.max_steps=-1"], "trainer.max_steps=-1", "must be >= 0"),
    (["trainer.lr_schedule=step"], "trainer.lr_schedule='step'", "must be constant, cosine or linear"),
    (["trainer.lr=0"], "trainer.lr=0.0", "must be > 0"),
    (["trainer.betas=[0.9]"], "trainer.betas=[0.9]", "must be two numbers in [0, 1)"),
    (["trainer.betas=[0.9,1.0]"], "trainer.betas=[0.9, 1.0]", "must be two numbers in [0, 1)"),
    (["trainer.final_nfe=[1,0]"], "trainer.final_nfe=[1, 0]", "must be positive step counts"),
    (["objective=flow_matching", "data.batch_size=0"], "data.batch_size=0", "must be >= 1"),
    (["trainer.resume=/no/such/ckpt"], "trainer.resume=/no/such/ckpt", "no such checkpoint or run dir"),
    (["logger.kind=csv"], "logger.kind='csv'", "must be jsonl, wandb or none"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, key, message", RANGE_CHECKS, ids=[" ".join(r[0]) for r in RANGE_CHECKS])
def test_every_range_check_fails_in_one_line_naming_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    text = str(err.value)
    assert key in text and message in text and "\n" not in text, text


@pytest.mark.parametrize("teacher", [["teacher=frozen"], ["teacher=ema", "teacher.decay=1.0"]])
@pytest.mark.parametrize("objective", ["twinflow", "rcgm"])
def test_image_free_allows_exactly_the_frozen_teachers(teacher, objective):
    overrides = [f"objective={objective}", "objective.image_free=true", "objective.enhanced_ratio=4.0", *teacher]
    cfg = validate(compose(overrides))
    assert instantiate(cfg.objective).image_free


def test_float16_frozen_base_under_lora_passes_the_weight_dtype_check():
    from fewstep.config.validate import check_weight_dtype

    for overrides in (["model=sana_lora", "model.dtype=float16"], ["model=sd35", "model.dtype=bfloat16"]):
        check_weight_dtype(compose(overrides))  # LoRA's trainables stay float32; bf16 full weights are allowed


def test_fp16_on_the_cpu_warns_that_it_does_nothing():
    """accelerate builds no autocast and no loss scaler for fp16 on the CPU: the run would silently be float32."""
    with pytest.warns(UserWarning, match="mixed_precision=fp16 does nothing on the CPU"):
        validate(compose(["trainer.mixed_precision=fp16"]))


def test_student_teacher_allowed_with_opt_in():
    validate(compose(["teacher=student", "teacher.allow_student_teacher=true"]))


def test_guidance_is_forced_to_zero_for_few_step_objectives():
    with pytest.warns(UserWarning, match="forced to 0"):
        cfg = validate(compose(["sampler=euler", "sampler.guidance_scale=3.0"]))
    assert cfg.sampler.guidance_scale == 0.0
    cfg = validate(compose(["objective=flow_matching", "sampler=euler", "sampler.guidance_scale=3.0"]))
    assert cfg.sampler.guidance_scale == 3.0  # the multi-step baseline may use CFG


def test_small_batch_is_handled_with_a_warning():
    with pytest.warns(UserWarning, match="smaller than the 4 active"):
        validate(compose(["data.batch_size=3"]))


def test_scm_on_the_tiny_nets_warns_unless_time_scale_is_1():
    import warnings

    with pytest.warns(UserWarning, match="pass model.time_scale=1"):
        validate(compose(["objective=scm"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(compose(["objective=scm", "model.time_scale=1"]))
        validate(compose(["objective=meanflow"]))  # MeanFlow is fine at 1000


def test_flow_matching_leaves_the_model_vanilla():
    from fewstep.training.trainables import build_components

    _, _, model, _, _ = build_components(compose(["objective=flow_matching"]))
    assert not hasattr(model, "sign_emb") and model.time_pair is False
    _, _, model, _, _ = build_components(compose(["objective=twinflow"]))
    assert model.sign_emb.weight.abs().sum() == 0  # zero-initialised


@pytest.mark.parametrize(
    "override, message",
    [
        ("+trainer.max_step=20", "unknown config key trainer.max_step (did you mean trainer.max_steps?)"),
        ("+objective.delta=1", "unknown config key objective.delta (did you mean objective.delta_t?)"),
        ("+objective.probs.foo=1", "unknown config key objective.probs.foo"),
        ("+foo=1", "unknown config key 'foo'"),
    ],
)
def test_keys_added_with_plus_are_checked_too(override, message):
    """Hydra's `+key=value` bypasses the compose-time schema check; validate catches it."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose([override]))


@pytest.mark.slow
def test_cli_prints_user_errors_as_one_line(tmp_path):
    from helpers import run_cli

    proc = run_cli(["trainer.resume=/no/such/ckpt", f"hydra.run.dir={tmp_path}/r"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.resume=/no/such/ckpt: no such checkpoint or run dir; give an existing path, auto or none"
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trainer.max_step=5"], "unknown config key trainer.max_step (did you mean trainer.max_steps?)"),
        (
            ["sampler=ucgm_anyy"],
            "sampler=ucgm_anyy is not a choice (did you mean ucgm_any?); choose one of: euler, ucgm",
        ),
        (["experiment=table6/sd35_ful"], "experiment=table6/sd35_ful does not exist (did you mean table6/sd35_full?)"),
        (["trainer.lr=abc"], "trainer.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["trainer.lr=[1"], "cannot parse the overrides"),
        (["objective=flow_matching", "objective.delta_t=0.1"], "unknown config key objective.delta_t"),
        (["data.path=/cache"], "unknown config key data.path (data.path belongs to data=latents)"),
        (["objective.critic_steps=3"], "(objective.critic_steps belongs to objective=dmd2)"),
        (["+experiment=sweep/toy2d_smoke"], "drop the '+': experiment=sweep/toy2d_smoke"),
        (["+model=tiny_toy"], "+model=tiny_toy: model already has a slot in the defaults; drop the '+'"),
    ],
)
def test_cli_overrides_are_checked_before_hydra_runs(argv, message):
    from fewstep.config.validate import check_overrides

    assert message in check_overrides(argv)


def test_valid_overrides_flags_and_multiruns_pass_the_check():
    from fewstep.config.validate import check_overrides

    assert check_overrides(["objective=rcgm", "trainer.lr=1e-3", "hydra.run.dir=/tmp/x"]) is None
    assert check_overrides(["-m", "trainer.lr=1e-3,2e-3"]) is None  # Hydra's own parser handles sweeps
    assert check_overrides([]) is None


@pytest.mark.slow
def test_cli_typo_is_one_line_with_exit_2(tmp_path):
    from helpers import run_cli

    proc = run_cli(["sampler=ucgm_anyy"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: sampler=ucgm_anyy is not a choice (did you mean ucgm_any?); choose one of: euler, ucgm, ucgm_any"
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sampler.style=foo"], "sampler.style='foo' is unknown; use one of few, any, mul"),
        (["teacher.decay=1.5"], "teacher.decay=1.5 must lie in [0, 1]"),
        (["data=toy2d", "data.name=spiral"], "data.name='spiral' is unknown; use one of moons"),
    ],
)
def test_a_value_a_component_refuses_is_a_one_line_user_error(overrides, message):
    """Refused in the component's constructor (inside Hydra's instantiate), these printed Hydra's four-line
    "Error executing job ... Error in call to target ..." instead of one error line."""
    from fewstep.errors import user_error
    from fewstep.training.trainables import build_components

    with pytest.raises(Exception) as err:
        build_components(compose(overrides))
    found = user_error(err.value)
    assert found is not None and str(found).startswith(message), (found, err.value)


def test_batch_size_zero_is_refused_without_a_warning_about_empty_groups_first():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match=r"data.batch_size=0 must be >= 1"):
            validate(compose(["data.batch_size=0"]))
