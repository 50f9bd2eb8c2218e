"""Every check on a combination of config values, in one place, before any weight loads.

Each failure is one line that names the setting to change.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from fewstep.config.checks import ConfigError, choice
from fewstep.config.schema import Config, TrainerConfig, schemas
from fewstep.config.schema import compose_config as run
from fewstep.config.searchpath import config_dirs, given_search_path
from fewstep.data.latents import cached_latent_shapes, read_manifest
from fewstep.errors import FewstepError
from fewstep.models import architectures
from fewstep.models.family import family_for_pipeline, family_of_model_class, weight_dtype_name
from fewstep.models.pretrained_config import max_latent_side, pretrained_config
from fewstep.objectives.base import Objective


def objective_class(cfg: DictConfig) -> type[Objective] | None:
    """The run's objective class (``objective._target_``); None where it is not an :class:`Objective` (its
    instantiation reports that)."""
    try:
        cls = get_class(str(cfg.objective.get("_target_", "")))
    except Exception:  # noqa: BLE001 - hydra raises several types for unknown targets
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Objective) else None


def sampling_guidance(cfg: DictConfig) -> float:
    """The CFG scale a run samples with: ``sampler.guidance_scale``, which few-step objectives force to 0 (their
    enhanced target bakes guidance in; :func:`validate` warns). A saved run config keeps the value given."""
    cls = objective_class(cfg)
    if cls is not None and not cls.samples_with_guidance:
        return 0.0
    return float(cfg.sampler.get("guidance_scale", 0.0) or 0.0)


def check_distributed(cfg: DictConfig, objective: type[Objective] | None) -> None:
    """``trainer.distributed`` and what FSDP supports (:mod:`fewstep.training.distributed`): full fine-tunes of the
    student
    with a single-network objective, fp32 or bf16."""
    tr = cfg.trainer
    if tr.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"trainer.distributed={tr.distributed!r} must be ddp or fsdp")
    if tr.checkpoint_format not in ("auto", "full", "sharded"):
        raise ConfigError(f"trainer.checkpoint_format={tr.checkpoint_format!r} must be auto, full or sharded")
    if tr.async_checkpoint and (tr.distributed != "fsdp" or tr.checkpoint_format == "full"):
        raise ConfigError(
            "trainer.async_checkpoint=true writes sharded checkpoints in the background: it needs "
            "trainer.distributed=fsdp with trainer.checkpoint_format=auto or sharded"
        )
    if tr.checkpoint_format == "sharded" and tr.distributed != "fsdp":
        raise ConfigError(
            "trainer.checkpoint_format=sharded needs trainer.distributed=fsdp (unsharded weights have no shards to "
            "write apart); use trainer.checkpoint_format=auto or full"
        )
    if tr.distributed != "fsdp":
        return
    lora = cfg.model.get("lora") or {}
    if lora.get("enabled", False):
        raise ConfigError(
            "trainer.distributed=fsdp with a LoRA model: LoRA trains a few adapter weights over a frozen base that "
            "every process holds anyway; use trainer.distributed=ddp"
        )
    if objective is not None and objective.fsdp_problem:
        raise ConfigError(
            f"trainer.distributed=fsdp with objective={objective.name}: {objective.fsdp_problem}; "
            "use trainer.distributed=ddp"
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
    lora = cfg.model.get("lora") or {}
    dtype = weight_dtype_name(cfg.model.get("dtype", "float32"), bool(lora.get("enabled", False)),
                              str(cfg.trainer.get("mixed_precision", "no")))  # fmt: skip
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

    known = schemas()

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
            candidates = [type(field.default_factory())]
        else:  # a registry group: the schemas whose _target_ this node names
            target = node.get("_target_")
            candidates = [s for s in known.get(group, {}).values() if getattr(s(), "_target_", None) == target]
        misses = [_unknown_key(node, s) for s in candidates]
        if candidates and all(m is not None for m in misses):
            key = misses[0]
            valid = [f.name for f in dataclasses.fields(candidates[0])]
            close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
            hint = f" (did you mean {group}.{close[0]}?)" if close and "." not in key else ""
            if not hint:  # a key of another choice of the group (data.path with data=digits)
                top = key.split(".")[0]
                owners = sorted(
                    name
                    for name, schema in known.get(group, {}).items()
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
    objective = objective_class(cfg)
    check_distributed(cfg, objective)  # config only: before the objective's and the model's own checks
    check_weight_dtype(cfg)
    if objective is not None:
        objective.check_config(cfg)  # its own options (fewstep.objectives: each objective's check_config)
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
    if tr.dist_timeout_s <= 0:
        raise ConfigError(
            f"trainer.dist_timeout_s={tr.dist_timeout_s} must be > 0 (seconds a rank waits for the others)"
        )
    if tr.peak_tflops is not None and tr.peak_tflops <= 0:
        raise ConfigError(
            f"trainer.peak_tflops={tr.peak_tflops} must be > 0 (the GPU's dense bf16 TFLOP/s) or null (a known GPU's)"
        )
    catchable = sorted(n for n in signal.Signals.__members__ if n not in ("SIGKILL", "SIGSTOP"))
    unknown = [str(n) for n in tr.stop_signals if str(n) not in catchable]
    if unknown:
        raise ConfigError(
            f"trainer.stop_signals: {', '.join(unknown)} is not a signal a process can catch; give names such as "
            "SIGINT, SIGTERM, SIGUSR1"
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
            f"{choice(cfg, 'data')} holds VAE latents of a diffusers model, which {choice(cfg, 'model')} does "
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
            f"{choice(cfg, 'model')} with model.random_init=true trains on latents of its architecture's shapes, "
            f"not {choice(cfg, 'data')}: give data=synthetic (or data=latents data.path=CACHE)"
        )
    elif not latents:
        problems.append(
            f"{choice(cfg, 'model')} trains on VAE latents, not {choice(cfg, 'data')}: give data=latents "
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
        raise ConfigError(f"{choice(cfg, 'model')} {head}: " + "; and ".join(problems))
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

        try:
            cls = get_class(str(model._target_))
        except Exception:  # noqa: BLE001 - an unknown target is reported elsewhere
            cls = None
        if hasattr(cls, "shipped_architecture"):  # a family model: the architecture must be its transformer class
            return cls.shipped_architecture(model.get("architecture")).with_layers(model.get("num_layers")).config
        return architectures.load(str(model.architecture)).with_layers(model.get("num_layers")).config

    return pretrained_config(model)


def _latent_manifest(data: DictConfig) -> dict:
    """The cache's ``manifest.json`` (``data=latents``), or its equivalent for ``data=synthetic``."""
    if str(data.get("_target_", "")).endswith(".SyntheticData"):
        shape = architectures.load(str(data.architecture)).latent_shape(int(data.resolution))
        return {"resolution": int(data.resolution), "shards": [{"count": 1, "latent_shape": list(shape)}]}

    return read_manifest(str(data.get("path") or ""))[1]


def _latent_shape_problems(model: DictConfig, data: DictConfig, config: dict, manifest: dict) -> list[str]:

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


# Hydra flags that change which primary config is composed, or answer without composing it: the check leaves
# those command lines to Hydra
_OWN_PRIMARY = ("config_path", "config_name", "config_dir", "experimental_rerun", "shell_completion")


def hydra_command_line(argv: list[str]):
    """``argv`` as Hydra's own argparse parser reads it (``.overrides``, ``.multirun``, ``.cfg``, ``.package``,
    ...), so flags in any position and form (``--cfg job``, ``-c=all``, ``--info``, ``-p objective``) are told
    apart from overrides; None where Hydra refuses the command line itself or answers without composing
    (``--version``): Hydra reports those in its own words."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return get_args_parser().parse_args(argv)
        except SystemExit:
            return None


def check_overrides(argv: list[str]) -> str | None:
    """Compose ``python -m fewstep`` overrides as Hydra will and return a one-line error naming the fix
    (an unknown key with the closest valid one, a group choice that does not exist with the valid ones, a
    value of the wrong type, an override that does not parse, a model without reachable weights or data it
    cannot take: :func:`check_model_data`), or None. Hydra's flags (``-m``, ``--cfg``, ``--package``,
    ``--info``, ``--help``) do not skip the check, nor do ``hydra.*`` overrides (checked as well: a misspelt
    ``hydra/launcher=`` choice or ``hydra.`` key is one line too). In a multirun every value of every swept key is
    checked (:func:`sweep_points`); an experiment name is checked too (Hydra silently skips a missing optional
    experiment)."""
    args = hydra_command_line(argv)
    if args is None or any(getattr(args, flag, None) for flag in _OWN_PRIMARY):
        return None
    modes = [f"--{m.replace('_', '-')}" for m in ("run", "multirun", "cfg", "info", "shell_completion")
             if getattr(args, m)]  # fmt: skip
    if len(modes) > 1:  # Hydra raises a ValueError with a traceback
        return (
            f"{' and '.join(modes)}: Hydra takes only one of --run, --multirun (-m), --cfg, --info; to print the "
            "config of one sweep point, give that point's values without -m"
        )
    overrides = list(args.overrides)
    package = args.package if args.cfg and args.package not in (None, "_global_") else None
    if not overrides and package is None:
        return None
    multirun = args.multirun or "hydra.mode=MULTIRUN" in overrides
    points = sweep_points(overrides) if multirun else [overrides]
    if isinstance(points, str):
        return points
    if multirun:  # and the grid an experiment file declares (hydra.sweeper.params), where the command line
        declared = _declared_sweeps(points[0])  # does not replace that axis
        points = sweep_points([*overrides, *declared]) if declared else points
        if isinstance(points, str):
            return f"{points} (hydra.sweeper.params of the experiment)"
    for point in points:
        problem = _check_point(point, argv, package)
        if problem is not None:
            return problem
    return None


def sweep_points(overrides: list[str]) -> list[list[str]] | str:
    """The single-run override lists that cover every value a multirun sweeps: every swept key at its first value,
    then one list per other value of each key (the rest at their first), so each value is composed once (not
    their product). An interval (Optuna) is checked at its lower end; ``glob(...)`` picks existing choices and
    sweeps of ``hydra.`` keys are Hydra's: both are left out. A string: an override that does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    base, swept = [], []
    for text in overrides:
        try:
            override = parser.parse_overrides([text])[0]
        except OverrideParseException as err:
            return f"cannot parse the overrides: {str(err).splitlines()[0]} (Hydra syntax: key=value, lists as [a,b])"
        if not override.is_sweep_override():
            base.append(text)
            continue
        sweep = override.value()
        if isinstance(sweep, Glob) or override.key_or_group.startswith(("hydra.", "hydra/")):
            continue
        if override.is_discrete_sweep():
            values = list(override.sweep_string_iterator())
        else:  # an interval: its lower end, as the key's type takes it (1.0 -> 1)
            values = [f"{sweep.start:g}"]
        if not values:
            continue
        key = override.get_key_element()
        swept.append((len(base), [f"{key}={v}" for v in values]))
        base.append(swept[-1][1][0])
    points = [base]
    for position, values in swept:
        for value in values[1:]:
            points.append([*base[:position], value, *base[position + 1 :]])
    return points


def _declared_sweeps(overrides: list[str]) -> list[str]:
    """``key=values`` for each axis ``hydra.sweeper.params`` declares (a sweep preset, ``experiment=sweep/*``) that
    ``overrides`` does not set; none where the config does not compose (:func:`_check_point` says why)."""
    given = {o.lstrip("+~").partition("=")[0] for o in overrides}
    try:
        params = run(overrides, return_hydra_config=True).hydra.sweeper.get("params") or {}
    except Exception:  # noqa: BLE001 - reported by _check_point
        return []
    return [f"{key}={value}" for key, value in params.items() if key not in given and isinstance(value, str)]


def _check_point(overrides: list[str], argv: list[str], package: str | None) -> str | None:
    """:func:`check_overrides` for one single-run list of overrides (``hydra.*`` among them)."""
    import difflib

    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    def suggest(name: str, options: list[str]) -> str:
        close = difflib.get_close_matches(name, options, n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    for arg in overrides:
        key, _, name = arg.partition("=")
        if key == "experiment" and name not in ("", "null"):
            roots = [*config_dirs(), *given_search_path(argv)]
            options = sorted({n for root in roots if root is not None for n in _yaml_names(root / "experiment")})
            if name not in options and None not in roots:
                return f"experiment={name} does not exist{suggest(name, options)}; choose one of: {', '.join(options)}"

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
        if text.startswith("Ambiguous value for argument"):  # a sweep in a single run
            return (
                f"{text.removeprefix('Ambiguous value for argument ')}: a comma list (or range/choice) sweeps, which "
                "needs -m (python -m fewstep -m ...); a list value is key=[a,b], a string with commas key='a,b'"
            )
        bad = next((o for o in overrides if f"'{o.partition('=')[0]}'" in text or text.endswith(f" {o}")), None)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and bad is not None:
            if bad.lstrip("+~").startswith("hydra."):
                return _unknown_hydra_key(bad, [o for o in overrides if o != bad])
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
    if package is not None and not _has_node(cfg, package):
        keys = [str(k) for k in cfg if k != "hydra"]
        keys += [f"{k}.{sub}" for k in keys if OmegaConf.is_dict(cfg[k]) for sub in cfg[k]]
        return (
            f"--package {package}: no such node in the config{suggest(package, keys)}; give a group "
            "(objective, model, ...) or a dotted key"
        )
    try:  # weights and data, before Hydra makes a run dir: the flagship `model=sd35` alone names both
        check_model_data(cfg)
    except FewstepError as err:
        return str(err)
    return None


def _has_node(cfg, dotted: str) -> bool:
    """``cfg`` has a node at ``dotted`` (resolving nothing: a preset's ``${hydra:...}`` resolves only in a job)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg, resolve=False)
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _unknown_hydra_key(bad: str, others: list[str]) -> str:
    """``hydra.run.dri=x``: one line with the closest key of Hydra's own config."""
    import difflib

    from omegaconf import OmegaConf

    key = bad.lstrip("+~").partition("=")[0]
    parent, _, leaf = key.rpartition(".")
    try:
        node = OmegaConf.select(run(others, return_hydra_config=True), parent)
        options = [str(k) for k in node] if OmegaConf.is_dict(node) else []
    except Exception:  # noqa: BLE001 - without the node: no suggestion
        options = []
    close = difflib.get_close_matches(leaf, options, n=1)
    hint = f" (did you mean {parent}.{close[0]}?)" if close else ""
    return f"{bad}: Hydra's config has no key {key}{hint}; `python -m fewstep --cfg hydra` prints it"


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
