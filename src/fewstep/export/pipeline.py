"""A run's trained model, and exported pipelines loaded back (:func:`load_pipeline`, :func:`load_lora_pipeline`).

:func:`load_run_model` reads a run's model and the weights ``fewstep.sample`` / ``fewstep.eval`` use;
:func:`scheduler_for_run` is the ``TwinFlowScheduler`` that samples as the run's sampler.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import diffusers
import torch
from hydra.utils import get_class, instantiate
from safetensors.torch import load_file

from fewstep.errors import FewstepError
from fewstep.models.family import DiffusersFamilyModel, TwinFlowTransformerMixin, families, family_for_pipeline
from fewstep.samplers.euler import EulerSampler
from fewstep.samplers.scheduler import TwinFlowScheduler
from fewstep.samplers.ucgm import UCGMSampler
from fewstep.training import checkpoint as ckpt_io
from fewstep.training import sharded_checkpoint
from fewstep.training.runs import find_checkpoint, read_run_config

log = logging.getLogger("fewstep.export")

EMBEDDINGS_FILE = "twinflow_embeddings.safetensors"


class ExportError(FewstepError, ValueError):
    """A bad argument or run; the message is one line naming the fix."""


def _import_classes() -> None:
    """Import every family module (the scheduler is imported above): diffusers resolves exported class names from
    sys.modules."""
    families()


def pipeline_class(name: str):
    return getattr(diffusers, name)


def _family_of_folder(path) -> object:
    """The family of a diffusers pipeline folder (or hub id), from its ``model_index.json``."""
    return family_for_pipeline(str(diffusers.DiffusionPipeline.load_config(str(path)).get("_class_name", "")))


def scheduler_for_run(cfg, sampler=None, model=None):
    """A ``TwinFlowScheduler`` that samples as the run's sampler, for its target step count: the UCGM sampler's
    settings (at most 8 steps by default), or for ``sampler=euler`` the noiseless "mul" style on the uniform
    (shifted) grid, which is the Euler step with ``tt = t`` (``target_step_count`` steps). A diffusion ``model``
    (diff2flow) gives its prediction type and training schedule (``model.scheduler_kwargs()``)."""
    sampler = sampler if sampler is not None else instantiate(cfg.sampler, _convert_="all")
    kwargs = {}
    steps = int(cfg.objective.get("target_step_count", 2))
    max_steps = 8
    if isinstance(sampler, EulerSampler):
        # UCGM "mul" with s = 0: x ← (1 − t')(x − t·F) + t'(x + (1 − t)·F) = x + (t' − t)·F at tt = t, and gaps
        # (0, 0) give the grid 1, 1 − 1/n, ..., 1/n, 0 (then shifted): Euler's
        kwargs = dict(
            shift=sampler.shift,
            sampling_style="mul",
            stochast_ratio=0.0,
            time_dist_ctrl=[1.0, 1.0, 1.0],
            rfba_gap_steps=[0.0, 0.0],
        )
        max_steps = max(steps, 1)
        if sampler.guidance_scale > 0:
            log.warning(
                "the run samples with guidance_scale=%s (CFG): the model card's code passes the pipeline its own "
                "guidance argument (guidance_scale=%s; Qwen-Image: true_cfg_scale with a negative_prompt), which "
                "diffusers' pipelines apply above 1 only",
                sampler.guidance_scale,
                sampler.guidance_scale,
            )
    if isinstance(sampler, UCGMSampler):
        kwargs = dict(
            shift=sampler.shift,
            sampling_style=sampler.style,
            stochast_ratio=sampler.stochast_ratio,
            extrapol_ratio=sampler.extrapol_ratio,
            time_dist_ctrl=list(sampler.time_dist_ctrl),
            rfba_gap_steps=None if sampler.rfba_gap_steps is None else list(sampler.rfba_gap_steps),
        )
        if sampler.sampling_order != 1:
            log.warning(
                "the run samples with sampling_order=%d (Heun); the exported TwinFlowScheduler steps first-order "
                "(one transformer call per step), so the pipeline's samples differ from fewstep.sample's",
                sampler.sampling_order,
            )
    diffusion = model.scheduler_kwargs() if hasattr(model, "scheduler_kwargs") else {}
    return TwinFlowScheduler(
        default_num_inference_steps=min(max(steps, 1), max_steps),
        **{"num_train_timesteps": 1000, "prediction_type": "flow_matching", "shift": 1.0, **diffusion, **kwargs},
    )


def _load_sharded_shadow(ckpt: Path, key: str, model) -> None:
    """The teacher's ``key`` average of a sharded checkpoint, read straight into the model's parameters (in their
    dtype, one tensor at a time)."""
    names = sharded_checkpoint.stored(ckpt, f"teacher.{key}")
    if not names:
        raise ExportError(f"{ckpt} holds no teacher {key} (the run's sampling weights); export weights=student")
    params = dict(model.named_parameters())
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ExportError(
            f"{ckpt}'s teacher {key} does not match the model (e.g. {unknown[0]}); export weights=student"
        )
    with torch.no_grad():
        sharded_checkpoint.load_into(ckpt, f"teacher.{key}", {k: params[k].data for k in names})


def load_run_model(run_dir: Path, checkpoint: str | None, weights: str):
    """The run's model with the chosen weights loaded; returns (cfg, model, checkpoint, step, weights used). The
    model alone (no data, objective or teacher is built), from the run dir :mod:`fewstep.training.runs` reads."""
    cfg = read_run_config(run_dir, "export")
    try:
        model_class = get_class(str(cfg.model.get("_target_", "")))
    except Exception:  # noqa: BLE001 - hydra raises several types for unknown targets
        model_class = None
    exportable = {f.model_class for f in families().values() if f.model_class is not None}
    if not (
        isinstance(model_class, type) and (issubclass(model_class, DiffusersFamilyModel) or model_class in exportable)
    ):
        raise ExportError(
            f"run_dir={run_dir} trained {cfg.model.get('_target_')}; fewstep.export writes diffusers pipelines of "
            "the transformer families (model=sd35, sana, qwenimage, openuni and their _lora) and of the diffusion "
            "families (model=sd15); use fewstep.sample for others"
        )
    ckpt = find_checkpoint(run_dir, checkpoint, warn=log.warning)
    if weights not in ("ema", "student"):
        raise ExportError(f"weights={weights!r} must be ema or student")
    time_pair = bool(getattr(get_class(cfg.objective._target_), "needs_time_pair", False))
    model = instantiate(cfg.model, data_shape=None, num_classes=0, time_pair=time_pair, _convert_="all")
    state = ckpt_io.load_checkpoint(ckpt, model, teacher=None, restore_rng=False)
    used = "student"
    if weights == "ema":
        # the weights fewstep.sample / fewstep.eval use: the teacher's sampling_key (the sampling EMA with
        # teacher.sampling_decay, else the teacher EMA), read from its file without building the teacher
        key = instantiate(cfg.teacher).sampling_key
        shadow_file = ckpt / ckpt_io.teacher_file(key) if key is not None else None
        if shadow_file is not None and sharded_checkpoint.is_sharded_checkpoint(state):
            _load_sharded_shadow(ckpt, key, model)
            used = "ema"
        elif shadow_file is not None:
            if not shadow_file.exists():
                raise ExportError(f"{ckpt} has no {shadow_file.name} (the run's {key}); export weights=student")
            shadow = load_file(str(shadow_file))
            params = dict(model.named_parameters())
            unknown = sorted(set(shadow) - set(params))
            if unknown:
                raise ExportError(f"{shadow_file} does not match the model (e.g. {unknown[0]}); export weights=student")
            with torch.no_grad():
                for k, v in shadow.items():
                    params[k].copy_(v)
            used = "ema"
        else:
            log.info("the run samples with the student (%s): exporting the student weights", cfg.teacher._target_)
    return cfg, model, ckpt, int(state["step"]), used


def load_pipeline(path: str | os.PathLike, **kwargs):
    """``<Family>Pipeline.from_pretrained`` of an exported folder (imports the fewstep classes first);
    the transformer reads its target time from the pipeline's scheduler."""
    _import_classes()
    family = _family_of_folder(path)
    pipe = pipeline_class(family.pipeline_class).from_pretrained(path, **kwargs)
    _attach_target_time(pipe)
    return pipe


def _attach_target_time(pipe) -> None:
    # (a TwinFlow UNet reads its times from the tensors the scheduler's scale_model_input returns)
    if isinstance(getattr(pipe, "transformer", None), TwinFlowTransformerMixin):
        pipe.transformer.use_scheduler_target_time(pipe.scheduler)


def load_lora_pipeline(base: str | os.PathLike, lora_dir: str | os.PathLike, torch_dtype=None, **kwargs):
    """A base pipeline of the run's family with an exported LoRA: the transformer gets the TwinFlow
    embeddings (``twinflow_embeddings.safetensors``), the adapter is loaded with ``load_lora_weights`` and the
    scheduler is the exported ``TwinFlowScheduler``."""
    _import_classes()
    family = _family_of_folder(base)
    lora_dir = Path(lora_dir)
    extra = {}
    emb_file = lora_dir / EMBEDDINGS_FILE
    if emb_file.exists():
        denoiser = getattr(family, "denoiser", "transformer")
        options = {}
        if (lora_dir / "scheduler").exists() and denoiser == "unet":  # the UNet's time pair needs the schedule
            options["diffusion_schedule"] = _diffusion_schedule(lora_dir / "scheduler")
        transformer = family.model_class.export_class.from_pretrained(
            base, subfolder=denoiser, time_pair=True, low_cpu_mem_usage=False, torch_dtype=torch_dtype, **options
        )
        embeddings = load_file(str(emb_file))
        result = transformer.load_state_dict(embeddings, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{emb_file} does not fit the {denoiser}: {result.unexpected_keys[:3]}")
        extra[denoiser] = transformer
    if (lora_dir / "scheduler").exists():
        extra["scheduler"] = TwinFlowScheduler.from_pretrained(lora_dir, subfolder="scheduler")
    pipe = pipeline_class(family.pipeline_class).from_pretrained(base, torch_dtype=torch_dtype, **extra, **kwargs)
    pipe.load_lora_weights(lora_dir)
    _attach_target_time(pipe)
    return pipe


def _diffusion_schedule(folder: Path) -> dict:
    """The beta-schedule keys of a diff2flow ``TwinFlowScheduler`` config (what a TwinFlow UNet records)."""
    config = TwinFlowScheduler.load_config(str(folder))
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas")
    return {k: config[k] for k in keys if config.get(k) is not None}
