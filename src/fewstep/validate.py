"""Every check on a combination of config values, in one place, before any weight loads.

Each failure is one line that names the setting to change.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from fewstep.errors import FewstepError


class ConfigError(FewstepError, ValueError):
    """A bad config value or combination; the message names the fix."""


_KINDS = {"MeanFlow": "meanflow", "SCM": "scm", "DMD2": "dmd2"}


def _objective_kind(cfg: DictConfig) -> str:
    """twinflow (also rcgm) | meanflow | scm | dmd2 | flow_matching."""
    if "estimate_order" in cfg.objective:
        return "twinflow"
    return _KINDS.get(str(cfg.objective.get("_target_", "")).rsplit(".", 1)[-1], "flow_matching")


def sampling_guidance(cfg: DictConfig) -> float:
    """The CFG scale a run samples with: ``sampler.guidance_scale``, which few-step objectives force to 0 (their
    enhanced target bakes guidance in; :func:`validate` warns). A saved run config keeps the value given."""
    return 0.0 if _objective_kind(cfg) != "flow_matching" else float(cfg.sampler.get("guidance_scale", 0.0) or 0.0)


def _check_range(key: str, value, lo=None, hi=None, lo_open=False, hi_open=False, hint: str = "") -> None:
    """One line ``objective.<key>=<value> must lie in ...`` when ``value`` is outside [lo, hi] (or open ends)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        left = "-inf" if lo is None else lo
        right = "inf" if hi is None else hi
        span = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise ConfigError(f"objective.{key}={value} must lie in {span}{hint}")


def check_dmd2(cfg: DictConfig) -> None:
    """Ranges of the DMD2 options, and its pretrained teacher (SPEC §11)."""
    obj = cfg.objective
    if obj.target_step_count != 1:
        raise ConfigError(
            f"objective.target_step_count={obj.target_step_count}: DMD2 trains a one-step generator here "
            "(multi-step backward simulation is not implemented); use 1"
        )
    _check_range("critic_steps", obj.critic_steps, 1, None, hint=" (fake-score updates per generator update)")
    if obj.fake_lr is not None:
        _check_range("fake_lr", obj.fake_lr, 0, None, lo_open=True)
    _check_range("guidance_scale", obj.guidance_scale, 1, None, hint=" (1 = no CFG on the real score)")
    if not 0.0 <= obj.time_min < obj.time_max <= 1.0:
        raise ConfigError(
            f"objective.time_min={obj.time_min}, time_max={obj.time_max} must satisfy 0 <= min < max <= 1"
        )
    _check_range("gan_weight", obj.gan_weight, 0, None)
    _check_range("gan_critic_weight", obj.gan_critic_weight, 0, None)
    pretrained = cfg.model.get("pretrained") is not None and not cfg.model.get("random_init", False)
    if not pretrained and not cfg.trainer.get("init_from"):
        raise ConfigError(
            "objective=dmd2 needs a pretrained teacher and this model starts from random weights: set "
            "trainer.init_from=RUN_DIR (a finished run, e.g. objective=flow_matching on the same model and data)"
        )


def check_image_free(cfg: DictConfig) -> None:
    """``objective.image_free=true`` (SPEC §10) allows exactly the frozen teachers: ``teacher=frozen`` or
    ``teacher=ema teacher.decay=1.0`` (the reference pairs it with EMA 1.0). A moving teacher would chase the
    student's own samples with no data behind them; the guided velocity needs ``enhanced_ratio != 0``."""
    teacher = cfg.teacher
    target = str(teacher.get("_target_", ""))
    frozen = target.endswith("FrozenTeacher") or (target.endswith("EMATeacher") and teacher.get("decay") == 1.0)
    if not frozen:
        raise ConfigError(
            f"objective.image_free=true needs a frozen teacher (got {_choice(cfg, 'teacher')}): "
            "use teacher=frozen or teacher=ema teacher.decay=1.0"
        )
    if cfg.objective.enhanced_ratio == 0:
        raise ConfigError(
            "objective.image_free=true needs objective.enhanced_ratio != 0: its target is the frozen teacher's "
            "guided velocity f_T(null) + w*(f_T(c) - f_T(null)), w = enhanced_ratio (the reference uses 4.0)"
        )


def check_jvp_objective(obj: DictConfig, kind: str) -> None:
    """Ranges of the MeanFlow / sCM options (SPEC §11)."""
    _check_range("target_step_count", obj.target_step_count, 1, 8, hint=" (1-4 recommended)")
    _check_range("time_sigma", obj.time_sigma, 0, None, lo_open=True)
    if kind == "scm":
        _check_range("tangent_norm_c", obj.tangent_norm_c, 0, None, hint=" (0 = no normalisation)")
        _check_range("warmup_steps", obj.warmup_steps, 0, None, hint=" (0 = no warm-up)")
    if kind == "meanflow":
        _check_range("equal_time_ratio", obj.equal_time_ratio, 0, 1)
        _check_range("adaptive_p", obj.adaptive_p, 0, None)
        _check_range("adaptive_c", obj.adaptive_c, 0, None, lo_open=True)
        _check_range("guidance_scale", obj.guidance_scale, 0, None, lo_open=True, hint=" (1 = no CFG-in-training)")
        _check_range("guidance_mix", obj.guidance_mix, 0, 1, hi_open=True)
        interval = list(obj.guidance_interval)
        if len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0:
            raise ConfigError(f"objective.guidance_interval={interval} must be [lo, hi] with 0 <= lo < hi <= 1")
        if (obj.guidance_scale != 1 or obj.guidance_mix != 0) and obj.cond_dropout <= 0:
            raise ConfigError(
                f"objective.guidance_scale={obj.guidance_scale} / guidance_mix={obj.guidance_mix} use the null "
                "condition: set objective.cond_dropout > 0 (e.g. 0.1) so the network learns it"
            )


def check_distributed(cfg: DictConfig, kind: str) -> None:
    """``trainer.distributed`` and what FSDP supports (:mod:`fewstep.distributed`): full fine-tunes of the student
    with a single-network objective, fp32 or bf16."""
    tr = cfg.trainer
    if tr.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"trainer.distributed={tr.distributed!r} must be ddp or fsdp")
    if tr.distributed != "fsdp":
        return
    lora = cfg.model.get("lora") or {}
    if lora.get("enabled", False):
        raise ConfigError(
            "trainer.distributed=fsdp with a LoRA model: LoRA trains a few adapter weights over a frozen base that "
            "every process holds anyway; use trainer.distributed=ddp"
        )
    if kind == "dmd2":
        raise ConfigError(
            "trainer.distributed=fsdp with objective=dmd2: its own networks (fake score, frozen real score) are not "
            "sharded; use trainer.distributed=ddp"
        )
    if tr.mixed_precision == "fp16":
        raise ConfigError(
            "trainer.distributed=fsdp with trainer.mixed_precision=fp16: the loss scaler does not handle sharded "
            "gradients; use bf16"
        )
    if tr.compile:
        raise ConfigError("trainer.distributed=fsdp with trainer.compile=true is untested; turn one of them off")
    if cfg.model.get("no_grad_chunk", 0) > 0:
        raise ConfigError(
            "trainer.distributed=fsdp with model.no_grad_chunk > 0: its number of calls depends on each process's "
            "rows, and every sharded call is a collective; set model.no_grad_chunk=0"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_weight_dtype(cfg: DictConfig) -> None:
    """float16 *trainable* weights (a full fine-tune with ``model.dtype=float16``) are refused: AdamW's second moment
    and epsilon (1e-8) underflow in float16, an EMA in float16 loses most of its updates to rounding, and the fp16
    loss scaler refuses float16 gradients ("Attempting to unscale FP16 gradients") at the first step, after the
    model has loaded. LoRA keeps its trainable weights in float32, so a float16 frozen base is fine."""
    dtype = str(cfg.model.get("dtype", "float32"))
    lora = cfg.model.get("lora") or {}
    if dtype in ("float16", "fp16") and not lora.get("enabled", False):
        raise ConfigError(
            f"model.dtype={dtype} with full fine-tuning trains float16 weights (AdamW and the EMA underflow, the fp16 "
            "loss scaler refuses them); use model.dtype=bfloat16, or model.dtype=float32 with "
            "trainer.mixed_precision=fp16, or a LoRA model (its trainable weights stay float32)"
        )


def _unknown_key(node: DictConfig, schema) -> str | None:
    """The first key of ``node`` (recursively, dotted) that the dataclass ``schema`` does not declare."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            return str(key)
        default = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        sub = default() if default is not None else None
        child = node.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(child, DictConfig):
            inner = _unknown_key(child, type(sub))
            if inner is not None:
                return f"{key}.{inner}"
    return None


def check_known_keys(cfg: DictConfig) -> None:
    """Every key must belong to its group's schema, also keys added with Hydra's ``+key=value``
    (which bypasses the compose-time check); the error suggests the closest valid key."""
    import dataclasses
    import difflib

    from fewstep.schema import SCHEMAS, Config

    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key in cfg:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; `python -m fewstep --help` lists the keys")
    for group, field in fields.items():
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        if field.default_factory is not dataclasses.MISSING:
            schemas = [type(field.default_factory())]
        else:  # a registry group: the schemas whose _target_ this node names
            target = node.get("_target_")
            schemas = [s for s in SCHEMAS.get(group, {}).values() if getattr(s(), "_target_", None) == target]
        misses = [_unknown_key(node, s) for s in schemas]
        if schemas and all(m is not None for m in misses):
            key = misses[0]
            valid = [f.name for f in dataclasses.fields(schemas[0])]
            close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
            hint = f" (did you mean {group}.{close[0]}?)" if close and "." not in key else ""
            if not hint:  # a key of another choice of the group (data.path with data=digits)
                top = key.split(".")[0]
                owners = sorted(
                    name
                    for name, schema in SCHEMAS.get(group, {}).items()
                    if top in {f.name for f in dataclasses.fields(schema)}
                )
                if owners:
                    hint = f" ({group}.{top} belongs to {' or '.join(f'{group}={o}' for o in owners)})"
            raise ConfigError(
                f"unknown config key {group}.{key}{hint}; `python -m fewstep --help` lists the keys of every group"
            )


def check_cache_family(cfg: DictConfig) -> None:
    """A latent cache precomputed with one model family, given to a model of another, stops here (one line); so
    does a prompt-only cache without ``objective.image_free=true``."""
    if not str(cfg.data.get("_target_", "")).endswith("LatentData") or not cfg.data.get("path"):
        return
    import json

    manifest_path = Path(os.path.expanduser(str(cfg.data.path))) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return  # LatentData reports a missing or broken cache with its own message
    if manifest.get("prompt_only") and not cfg.objective.get("image_free", False):
        raise ConfigError(
            f"data.path={cfg.data.path} is a prompt-only cache (no latents): train it with "
            "objective.image_free=true teacher=frozen objective.enhanced_ratio=W (docs/twinflow.md), or precompute "
            "images= / dataset= for this objective"
        )
    from hydra.utils import get_class

    from fewstep.models.family import family_for_pipeline, family_of_model_class

    try:
        model_family = family_of_model_class(get_class(str(cfg.model.get("_target_", ""))))
    except Exception:  # noqa: BLE001 - hydra raises several types for targets it cannot import
        return
    pipeline = str(manifest.get("pipeline_class", "?"))
    cache_family = manifest.get("family") or family_for_pipeline(pipeline).name
    if model_family and cache_family != model_family:
        raise ConfigError(
            f"data.path={cfg.data.path} was precomputed for the {cache_family} family ({pipeline}) but the model "
            f"({cfg.model._target_}) is the {model_family} family; precompute a cache with the model's own pipeline "
            f"(python -m fewstep.precompute pretrained=<the {model_family} pipeline> ...) or choose the matching model"
        )


def validate(cfg: DictConfig) -> DictConfig:
    """Raise ConfigError on the first bad value; return cfg with forced settings applied (with a warning)."""
    check_known_keys(cfg)
    obj, tr = cfg.objective, cfg.trainer
    kind = _objective_kind(cfg)
    check_distributed(cfg, kind)  # config only: before the objective's and the model's own checks
    check_weight_dtype(cfg)
    if kind in ("meanflow", "scm"):
        check_jvp_objective(obj, kind)
    if kind == "scm" and cfg.model.get("time_scale", 1.0) != 1.0:  # the tiny nets' time features (default 1000)
        warnings.warn(
            f"objective=scm with model.time_scale={cfg.model.time_scale}: dF/dt scales with it and sCM's tangent "
            "explodes once the warm-up ramps in (measured on digits: 1-NFE FD 171 vs 2.55 with 1); "
            "pass model.time_scale=1 (docs/objectives.md)",
            stacklevel=2,
        )
    if kind == "dmd2":
        check_dmd2(cfg)
    if kind == "twinflow":
        if obj.estimate_order < 1:
            raise ConfigError(f"objective.estimate_order={obj.estimate_order} must be >= 1 (2 is the paper default)")
        if not 0.0 < obj.delta_t <= 0.5:
            raise ConfigError(f"objective.delta_t={obj.delta_t} must lie in (0, 0.5] (0.01 is the default)")
        if obj.target_clamp <= 0:
            raise ConfigError(f"objective.target_clamp={obj.target_clamp} must be > 0 (1.0 is the default)")
        if not 1 <= obj.target_step_count <= 8:
            raise ConfigError(
                f"objective.target_step_count={obj.target_step_count} must lie in [1, 8] (1-4 recommended)"
            )
        probs = obj.probs
        if any(v < 0 for v in probs.values()) or sum(probs.values()) <= 0:
            raise ConfigError(
                f"objective.probs={dict(probs)} "
                "must be >= 0 with a positive sum, e.g. {e2e: 1, mul: 1, any: 1, adv: 1}"
            )
        lo, hi = obj.enhanced_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"objective.enhanced_range={list(obj.enhanced_range)} must satisfy 0 <= lo < hi <= 1")
        if len(obj.time_dist) != 3:
            raise ConfigError(f"objective.time_dist={list(obj.time_dist)} must be [a, b, c] for t ~ Beta(a, b)*c")
        a, b, c = obj.time_dist
        if not (a > 0 and b > 0 and 0 < c <= 1):
            raise ConfigError(
                f"objective.time_dist={list(obj.time_dist)} must have a, b > 0 and 0 < c <= 1 "
                "(t ~ Beta(a, b)*c must stay in [0, 1]; [1, 1, 1] is the default)"
            )
        if not 0.0 <= obj.consistency_ratio <= 1.0:
            raise ConfigError(
                f"objective.consistency_ratio={obj.consistency_ratio} must lie in [0, 1] "
                "(tt = t - u*r*t must stay in [0, t]; 1.0 is the default)"
            )
        if obj.get("image_free", False):
            check_image_free(cfg)
        active = sum(1 for k, v in probs.items() if v > 0 and (k != "adv" or obj.adversarial))
        if 1 <= cfg.data.batch_size < active:  # (below 1: refused further down)
            warnings.warn(
                f"data.batch_size={cfg.data.batch_size} is smaller than the {active} active objective.probs groups: "
                "some groups will be empty in every step",
                stacklevel=2,
            )
    if not 0.0 <= obj.get("cond_dropout", 0.0) < 1.0:
        raise ConfigError(f"objective.cond_dropout={obj.cond_dropout} must lie in [0, 1)")

    # The model family must speak flow matching, or go through the bridge with both flags set.
    prediction = cfg.model.get("prediction_type", "flow")
    if prediction not in ("flow", "epsilon", "v_prediction"):
        raise ConfigError(f"model.prediction_type={prediction!r} is unknown; use flow, epsilon or v_prediction")
    if prediction != "flow":
        if not (cfg.diff2flow.enabled and obj.allow_diff2flow):
            raise ConfigError(
                f"model predicts {prediction!r}, not a flow velocity: set diff2flow.enabled=true and "
                "objective.allow_diff2flow=true to train it through the diff2flow bridge"
            )

    check_model_data(cfg)  # weights reachable, data of the kind (and size) the model takes: before any load

    check_cache_family(cfg)

    teacher_target = str(cfg.teacher.get("_target_", ""))
    if teacher_target.endswith("StudentTeacher") and not cfg.teacher.allow_student_teacher:
        raise ConfigError(
            "teacher=student needs teacher.allow_student_teacher=true (the seed requires an EMA teacher; "
            "use teacher=ema otherwise)"
        )

    if tr.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"trainer.mixed_precision={tr.mixed_precision!r} must be no, bf16 or fp16")
    if tr.mixed_precision == "fp16" and not _cuda_available():
        warnings.warn(
            "trainer.mixed_precision=fp16 does nothing on the CPU (accelerate keeps float32 there, with no loss "
            "scaling); use trainer.mixed_precision=bf16 for reduced precision on the CPU",
            stacklevel=2,
        )
    for key in ("grad_accum", "log_every", "checkpoint_every", "sample_every", "keep_last", "max_nonfinite"):
        if tr[key] < 1:
            raise ConfigError(f"trainer.{key}={tr[key]} must be >= 1")
    if tr.max_steps < 0:
        raise ConfigError(f"trainer.max_steps={tr.max_steps} must be >= 0")
    if tr.lr_schedule not in ("constant", "cosine", "linear"):
        raise ConfigError(f"trainer.lr_schedule={tr.lr_schedule!r} must be constant, cosine or linear")
    if tr.lr <= 0:
        raise ConfigError(f"trainer.lr={tr.lr} must be > 0")
    if len(tr.betas) != 2 or not all(0 <= b < 1 for b in tr.betas):
        raise ConfigError(f"trainer.betas={list(tr.betas)} must be two numbers in [0, 1)")
    if any(n < 1 for n in tr.final_nfe):
        raise ConfigError(f"trainer.final_nfe={list(tr.final_nfe)} must be positive step counts")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    if tr.resume not in ("auto", "none", "") and not Path(tr.resume).exists():
        raise ConfigError(
            f"trainer.resume={tr.resume}: no such checkpoint or run dir; give an existing path, auto or none"
        )
    if tr.get("init_from") and not Path(tr.init_from).is_dir():
        raise ConfigError(
            f"trainer.init_from={tr.init_from}: no such run or checkpoint folder; give a finished run's directory"
        )
    if cfg.logger.kind not in ("jsonl", "wandb", "none"):
        raise ConfigError(f"logger.kind={cfg.logger.kind!r} must be jsonl, wandb or none")

    if cfg.model.get("random_init", False):
        quiet_random_init(cfg)
    guidance = cfg.sampler.get("guidance_scale", 0.0)
    if guidance != sampling_guidance(cfg):
        warnings.warn(
            f"sampler.guidance_scale={guidance} forced to 0: few-step models have CFG baked in (enhanced target)",
            stacklevel=2,
        )
        with open_dict(cfg):
            cfg.sampler.guidance_scale = 0.0
    return cfg


def quiet_random_init(cfg: DictConfig) -> None:
    """``model.random_init=true`` (time and memory at real size): the final grids and the multi-step baseline at
    their defaults would sample noise from a random model, at real size for minutes; they are turned off, with a
    warning naming how to keep a latent preview. Values the user gave other than the defaults stay."""
    from fewstep.schema import TrainerConfig

    default, tr, off = TrainerConfig(), cfg.trainer, []
    if list(tr.final_nfe) == list(default.final_nfe):
        off.append("trainer.final_nfe=[]")
    if tr.baseline_steps == default.baseline_steps:
        off.append("trainer.baseline_steps=0")
    if not off:
        return
    warnings.warn(
        f"model.random_init=true: {' '.join(off)} (a random model samples noise; at real size its grids take "
        "minutes); pass e.g. trainer.final_nfe=[1] for a latent preview",
        stacklevel=3,
    )
    with open_dict(cfg):
        if "trainer.final_nfe=[]" in off:
            tr.final_nfe = []
        if "trainer.baseline_steps=0" in off:
            tr.baseline_steps = 0


def _choice(cfg: DictConfig, group: str) -> str:
    """``group=<choice>`` as the user wrote it (Hydra's runtime choices), else ``group._target_=<class>``."""
    choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}") if "hydra" in cfg else None
    if choice is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            choice = HydraConfig.get().runtime.choices[group]
        except Exception:  # noqa: BLE001 - no Hydra run (the API, tests): name the class instead
            return f"{group}._target_={cfg[group].get('_target_')}"
    return f"{group}={choice}"


def is_pretrained_family(model: DictConfig) -> bool:
    """A diffusers model family (``model.pretrained``): it trains on VAE latents of a latent cache."""
    return "pretrained" in model


def is_latent_data(data: DictConfig) -> bool:
    """Latents a diffusers family takes: a precomputed cache (``data=latents``) or ``data=synthetic``."""
    return str(data.get("_target_", "")).endswith((".LatentData", ".SyntheticData"))


def check_model_data(cfg: DictConfig) -> None:
    """Before any weight loads: a diffusers family needs reachable weights (or ``model.random_init``) and
    latent data (``data=latents`` with a cache, or ``data=synthetic``) of its channel count and a latent size
    it can take; latent data needs such a family. All problems found are reported together, in one line (the
    flagship ``model=sd35`` with nothing given names weights and data)."""
    model, data = cfg.model, cfg.data
    family, latents = is_pretrained_family(model), is_latent_data(data)
    if not family and not latents:
        return
    weights = str(model.get("pretrained") or "WEIGHTS") if family else "WEIGHTS"
    precompute = f"`python -m fewstep.precompute pretrained={weights} images=DIR out=CACHE`"
    if not family:
        raise ConfigError(
            f"{_choice(cfg, 'data')} holds VAE latents of a diffusers model, which {_choice(cfg, 'model')} does "
            f"not take: give model=sd35 model.pretrained={weights} (the pipeline {precompute} encoded it with), or "
            "data=digits / data=toy2d for this model"
        )
    problems, config, manifest = [], None, None
    try:
        config = _transformer_config(model)
    except FewstepError as err:
        problems.append(str(err) + _pretrained_hint(model))
    if not latents and model.get("random_init", False):
        problems.append(
            f"{_choice(cfg, 'model')} with model.random_init=true trains on latents of its architecture's shapes, "
            f"not {_choice(cfg, 'data')}: give data=synthetic (or data=latents data.path=CACHE)"
        )
    elif not latents:
        problems.append(
            f"{_choice(cfg, 'model')} trains on VAE latents, not {_choice(cfg, 'data')}: give data=latents "
            f"data.path=CACHE, a cache written by {precompute}"
        )
    else:
        try:
            manifest = _latent_manifest(data)
        except FewstepError as err:
            problems.append(str(err))
    if manifest is not None:
        try:  # a cache of another family: say so (with the weights' problem, if any), skip the shape checks
            check_cache_family(cfg)
        except ConfigError as err:
            problems.append(str(err))
            manifest = None
    if config is not None and manifest is not None:
        problems += _latent_shape_problems(model, data, config, manifest)
    problems = list(dict.fromkeys(problems))  # data=synthetic follows model.architecture: one problem, once
    if len(problems) > 1:
        missing = config is None and manifest is None and not model.get("random_init")
        head = "needs its weights and a latent cache" if missing else "cannot start"
        raise ConfigError(f"{_choice(cfg, 'model')} {head}: " + "; and ".join(problems))
    if problems:
        raise ConfigError(problems[0])


def _pretrained_hint(model: DictConfig) -> str:
    """The model class's ``pretrained_hint`` (how to get its weights, e.g. OpenUni's conversion), as a suffix."""
    try:
        from hydra.utils import get_class

        hint = getattr(get_class(str(model._target_)), "pretrained_hint", "")
    except Exception:  # noqa: BLE001 - an unknown target is reported elsewhere
        hint = ""
    return f"; {hint}" if hint and not model.get("random_init") else ""


def _transformer_config(model: DictConfig) -> dict:
    """The transformer config the run will build: the shipped architecture (``model.random_init``) or the
    pretrained one's ``config.json`` (read, not its weights)."""
    if model.get("random_init"):
        from hydra.utils import get_class

        from fewstep.models import architectures

        try:
            cls = get_class(str(model._target_))
        except Exception:  # noqa: BLE001 - an unknown target is reported elsewhere
            cls = None
        if hasattr(cls, "shipped_architecture"):  # a family model: the architecture must be its transformer class
            return cls.shipped_architecture(model.get("architecture")).with_layers(model.get("num_layers")).config
        return architectures.load(str(model.architecture)).with_layers(model.get("num_layers")).config
    from fewstep.models.pretrained_config import pretrained_config

    return pretrained_config(model)


def _latent_manifest(data: DictConfig) -> dict:
    """The cache's ``manifest.json`` (``data=latents``), or its equivalent for ``data=synthetic``."""
    if str(data.get("_target_", "")).endswith(".SyntheticData"):
        from fewstep.models import architectures

        shape = architectures.load(str(data.architecture)).latent_shape(int(data.resolution))
        return {"resolution": int(data.resolution), "shards": [{"count": 1, "latent_shape": list(shape)}]}
    from fewstep.data.latents import read_manifest

    return read_manifest(str(data.get("path") or ""))[1]


def _latent_shape_problems(model: DictConfig, data: DictConfig, config: dict, manifest: dict) -> list[str]:
    from fewstep.data.latents import cached_latent_shapes
    from fewstep.models.pretrained_config import max_latent_side

    shapes = cached_latent_shapes(manifest)
    if not shapes:
        return []  # an empty cache: LatentData names it
    problems = []
    cache = "path" in data
    where = f"data.path={data.path}" if cache else f"data=synthetic at data.resolution={data.get('resolution')}"
    weights = f"model.pretrained={model.pretrained}" if not model.get("random_init") else "the architecture"
    try:
        from hydra.utils import get_class

        data_channels = get_class(str(model._target_)).data_channels  # a family whose latents are packed
    except Exception:  # noqa: BLE001 - the transformer takes the cache's channels as they are
        data_channels = None
    if data_channels is not None:
        from diffusers.configuration_utils import FrozenDict  # attribute access, as a loaded model's .config

        channels = data_channels(FrozenDict(config))
    else:
        channels = config.get("in_channels")
    if channels is not None and shapes[0][0] != int(channels):
        problems.append(
            f"{where} holds {shapes[0][0]}-channel latents but {weights} takes {channels}: precompute the cache "
            f"with the same pipeline (pretrained={model.pretrained})"
        )
    limit = max_latent_side(config)
    too_big = [s for s in shapes if limit is not None and max(s[1:]) > limit]
    if too_big:
        side = max(max(s[1:]) for s in too_big)
        resolution = manifest.get("resolution")
        fix = f"resolution={int(resolution) * limit // side} or lower" if resolution else "a lower resolution"
        fix = f"re-run precompute with {fix} into a new out dir" if cache else f"use data.{fix}"
        problems.append(
            f"{where} holds latents up to {side} wide/high ({len(too_big)} of {len(shapes)} latent sizes) but "
            f"{weights} takes at most {limit} (pos_embed_max_size {config['pos_embed_max_size']} x patch_size "
            f"{config.get('patch_size') or 1}): {fix}"
        )
    return problems


def check_overrides(argv: list[str]) -> str | None:
    """Compose ``python -m fewstep`` overrides as Hydra will and return a one-line error naming the fix
    (an unknown key with the closest valid one, a group choice that does not exist with the valid ones, a
    value of the wrong type, an override that does not parse, a model without reachable weights or data it
    cannot take: :func:`check_model_data`), or None. Hydra flags and multiruns are left
    to Hydra; an experiment name is checked too (Hydra silently skips a missing optional experiment)."""
    import difflib

    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if not argv or any(a.startswith("-") for a in argv):
        return None
    overrides = [
        a
        for a in argv
        if not a.lstrip("+~").startswith(("hydra.", "hydra/")) or a.lstrip("+").startswith("hydra.searchpath=")
    ]  # the search path stays: it decides which choices exist

    def suggest(name: str, options: list[str]) -> str:
        close = difflib.get_close_matches(name, options, n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    for arg in overrides:
        key, _, name = arg.partition("=")
        if key == "experiment" and name not in ("", "null"):
            from fewstep.searchpath import config_dirs, given_search_path

            roots = [*config_dirs(), *given_search_path(argv)]
            options = sorted({n for root in roots if root is not None for n in _yaml_names(root / "experiment")})
            if name not in options and None not in roots:
                return f"experiment={name} does not exist{suggest(name, options)}; choose one of: {', '.join(options)}"

    from fewstep.schema import compose_config as run

    try:
        cfg = run(overrides, return_hydra_config=True)
    except MissingConfigException as err:
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        options = list(err.options or [])
        return f"{group}={name} is not a choice{suggest(name, options)}; choose one of: {', '.join(options)}"
    except OverrideParseException as err:
        return f"cannot parse the overrides: {str(err).splitlines()[0]} (Hydra syntax: key=value, lists as [a,b])"
    except ConfigCompositionException as err:
        cause, text = err.__cause__, str(err).splitlines()[0]
        if text.startswith("Multiple values for "):  # `+experiment=X`: the group already has a defaults slot
            group = text.removeprefix("Multiple values for ").split(".")[0].strip()
            plus = next((o for o in overrides if o.startswith("+") and o.lstrip("+").partition("=")[0] == group), None)
            if plus is not None:
                return f"{plus}: {group} already has a slot in the defaults; drop the '+': {plus.lstrip('+')}"
        bad = next((o for o in overrides if f"'{o.partition('=')[0]}'" in text or text.endswith(f" {o}")), None)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and bad is not None:
            try:  # the same override forced in with '+': check_known_keys then names the closest valid key
                check_known_keys(run([("+" + o) if o == bad else o for o in overrides]))
            except ConfigError as known:
                return str(known)
            except Exception:  # noqa: BLE001 - fall back to Hydra's first line below
                pass
        if isinstance(cause, ValidationError) and bad is not None:
            return f"{bad}: {str(cause).splitlines()[0]}"
        return text
    except Exception:  # noqa: BLE001 - anything else: Hydra reports it in its own words
        return None
    try:  # weights and data, before Hydra makes a run dir: the flagship `model=sd35` alone names both
        check_model_data(cfg)
    except FewstepError as err:
        return str(err)
    return None


def _yaml_names(root, prefix: str = "") -> list[str]:
    names = []
    if not root.is_dir():
        return names
    for entry in root.iterdir():
        if entry.is_dir():
            names += _yaml_names(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(".yaml"):
            names.append(prefix + entry.name[: -len(".yaml")])
    return names
