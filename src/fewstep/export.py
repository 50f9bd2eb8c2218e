"""``python -m fewstep.export run_dir=DIR out=DIR2 [weights=ema|student]``: a run as a diffusers pipeline.

Reads the run's ``.hydra/config.yaml`` and newest valid checkpoint (by default the weights ``fewstep.sample``
and ``fewstep.eval`` use: the sampling EMA with ``teacher.sampling_decay``, else the teacher EMA) and writes
``DIR2/``: the pretrained pipeline of the run's model family (SD3: ``StableDiffusion3Pipeline``, SANA:
``SanaPipeline``, Qwen-Image: ``QwenImagePipeline``, OpenUni: fewstep's ``OpenUniPipeline``) with its components
(VAE, text encoders, tokenizers) saved
again, the trained transformer (LoRA merged) as the family's TwinFlow class (e.g.
:class:`fewstep.models.sd3.SD3TwinFlowTransformer2DModel`) when the run used the target-time / sign
embeddings (else the vanilla class), and ``TwinFlowScheduler`` set up like the run's sampler. The code of
those classes is copied into their component folders (:mod:`fewstep.export_code`), so the folder loads
without fewstep (``DiffusionPipeline.from_pretrained(DIR2, trust_remote_code=True)``; not OpenUni, whose pipeline
class is fewstep's) and, with fewstep, after a bare ``import fewstep``::

    import fewstep
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(DIR2)
    image = pipe("a cat", num_inference_steps=2, guidance_scale=0.0).images[0]

Every export also gets a model card (``README.md``, :mod:`fewstep.export_card`); ``hub_repo=USER/NAME``
pushes it (:mod:`fewstep.hub`).

LoRA runs also get ``DIR2/lora/``: the adapter in the diffusers LoRA format
(``pytorch_lora_weights.safetensors``, via the pipeline class's ``save_lora_weights``), the embeddings
(``twinflow_embeddings.safetensors``) and the scheduler config; :func:`load_lora_pipeline` puts them on a
base pipeline of the family.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from fewstep.cli import parse_kv
from fewstep.errors import FewstepError

log = logging.getLogger("fewstep.export")

USAGE = (
    "usage: python -m fewstep.export run_dir=DIR out=DIR2 [weights=ema|student] [checkpoint=PATH] "
    "[pipeline=DIR_OR_HUB_ID] [dtype=model|float32|bfloat16|float16] [hub_repo=USER/NAME "
    "[hub_push=auto|pipeline|lora] [hub_private=false]]"
)
DEFAULTS = {
    "run_dir": "",
    "out": "",
    "weights": "ema",
    "checkpoint": None,
    "pipeline": "",
    "dtype": "model",
    "hub_repo": "",  # push the export (fewstep.hub) after writing it
    "hub_push": "auto",  # auto: the LoRA of a LoRA run, else the pipeline
    "hub_private": False,
}
EMBEDDINGS_FILE = "twinflow_embeddings.safetensors"


class ExportError(FewstepError, ValueError):
    """A bad argument or run; the message is one line naming the fix."""


def _import_classes() -> None:
    """Import every family module and the scheduler: diffusers resolves exported class names from sys.modules."""
    import fewstep.samplers.scheduler  # noqa: F401 - registers the scheduler class for diffusers' loader
    from fewstep.models.family import families

    families()


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _family_of_folder(path) -> object:
    """The family of a diffusers pipeline folder (or hub id), from its ``model_index.json``."""
    from diffusers import DiffusionPipeline

    from fewstep.models.family import family_for_pipeline

    return family_for_pipeline(str(DiffusionPipeline.load_config(str(path)).get("_class_name", "")))


def scheduler_for_run(cfg, sampler=None):
    """A ``TwinFlowScheduler`` that samples as the run's sampler, for its target step count: the UCGM sampler's
    settings (at most 8 steps by default), or for ``sampler=euler`` the noiseless "mul" style on the uniform
    (shifted) grid, which is the Euler step with ``tt = t`` (``target_step_count`` steps)."""
    from hydra.utils import instantiate

    from fewstep.samplers.euler import EulerSampler
    from fewstep.samplers.scheduler import TwinFlowScheduler
    from fewstep.samplers.ucgm import UCGMSampler

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
    return TwinFlowScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_matching",
        default_num_inference_steps=min(max(steps, 1), max_steps),
        **{"shift": 1.0, **kwargs},
    )


def load_run_model(run_dir: Path, checkpoint: str | None, weights: str):
    """The run's model with the chosen weights loaded; returns (cfg, model, checkpoint, step, weights used)."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from fewstep import checkpoint as ckpt_io
    from fewstep.runs import refuse_random_init

    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.exists():
        raise ExportError(f"run_dir={run_dir} is not a fewstep run dir (no .hydra/config.yaml)")
    cfg = OmegaConf.load(cfg_path)
    refuse_random_init(cfg, run_dir, "export")
    from fewstep.models.family import DiffusersFamilyModel

    try:
        model_class = get_class(str(cfg.model.get("_target_", "")))
    except Exception:  # noqa: BLE001 - hydra raises several types for unknown targets
        model_class = None
    if not (isinstance(model_class, type) and issubclass(model_class, DiffusersFamilyModel)):
        raise ExportError(
            f"run_dir={run_dir} trained {cfg.model.get('_target_')}; fewstep.export writes diffusers pipelines of "
            "the transformer families (model=sd35, sana, qwenimage, openuni and their _lora); "
            "use fewstep.sample for others"
        )
    if checkpoint:
        ckpt = Path(checkpoint)
        ckpt_io.verify(ckpt)
    else:
        ckpt = ckpt_io.latest_valid(run_dir / "checkpoints", warn=log.warning)
        if ckpt is None:
            raise ExportError(f"{run_dir}/checkpoints holds no valid checkpoint; train longer or pass checkpoint=")
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
        if shadow_file is not None:
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


def export(args) -> dict:
    from safetensors.torch import save_file

    from fewstep.models.family import PretrainedNotFound, families, load_error, lora_config_of, parse_dtype

    for key in ("run_dir", "out"):
        if not args[key]:
            raise ExportError(f"{key}= is required; {' '.join(USAGE.split())}")
    if args.hub_repo:
        from fewstep.hub import check_push_args

        check_push_args(args.hub_repo, args.hub_push)
    run_dir = Path(os.path.expanduser(args.run_dir))
    out = Path(os.path.expanduser(args.out))
    cfg, model, ckpt, step, used = load_run_model(run_dir, args.checkpoint, args.weights)
    dtype = model.weight_dtype if args.dtype == "model" else parse_dtype(args.dtype, "dtype")
    transformer = model.export_transformer(dtype)
    scheduler = scheduler_for_run(cfg)
    family = next(f for f in families().values() if f.model_class is type(model))
    pipeline_cls = _pipeline_class(family.pipeline_class)
    pipeline_source = args.pipeline or str(cfg.model.pretrained)
    local = Path(os.path.expanduser(pipeline_source))
    if local.exists() and not (local / "model_index.json").exists():
        raise ExportError(
            f"{pipeline_source} is not a pipeline folder (no model_index.json): pass pipeline=<the "
            f"{family.pipeline_class} folder or hub id> for the VAE and text encoders"
        )
    try:
        pipe = pipeline_cls.from_pretrained(
            str(local) if local.exists() else pipeline_source, transformer=transformer, scheduler=scheduler
        )
    except (OSError, ValueError) as err:
        if isinstance(err, PretrainedNotFound):
            raise
        raise load_error("pipeline", pipeline_source, err) from err
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    from fewstep.export_code import fewstep_pipeline_classes, vendor_components

    vendor_components(out)  # the custom classes' code travels in their folders (trust_remote_code without fewstep)
    info = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "step": step,
        "weights": used,
        "objective": str(cfg.objective._target_),
        "family": family.name,
        "time_pair": model.has_time_pair(),
        "lora": bool(model.lora_enabled),
        "pipeline": pipeline_source,
        "load": f"import fewstep; {family.pipeline_class}.from_pretrained({str(out)!r})"
        + (
            ""
            if family.pipeline_class in fewstep_pipeline_classes()
            else f" (without fewstep: DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True))"
        ),
    }
    # the style whose target time the transformer must read from the scheduler ("few": tt = 0, its default; a
    # transformer without the time-pair embeddings has no target time)
    style = str(scheduler.config.sampling_style) if model.has_time_pair() else "few"
    if style != "few" and family.pipeline_class not in fewstep_pipeline_classes():
        # 'any' / 'mul' steps land on tt != 0: the transformer must read it from the scheduler (load_pipeline does)
        info["load"] = (
            f"from fewstep.export import load_pipeline; load_pipeline({str(out)!r}) (or after from_pretrained: "
            "pipe.transformer.use_scheduler_target_time(pipe.scheduler))"
        )
    if model.lora_enabled:
        from peft.utils import get_peft_model_state_dict

        lora_dir = out / "lora"
        lora_dir.mkdir(exist_ok=True)
        config = lora_config_of(model.transformer)
        metadata = None
        if config is not None:
            metadata = json.loads(
                json.dumps(config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o))
            )
        layers = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(model.transformer).items()}
        pipeline_cls.save_lora_weights(
            lora_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
        embeddings = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.time_pair_state_dict().items()}
        if embeddings:
            save_file(embeddings, str(lora_dir / EMBEDDINGS_FILE), metadata={"format": "fewstep-twinflow-embeddings"})
        scheduler.save_pretrained(lora_dir / "scheduler")
        info["lora_dir"] = str(lora_dir)
        info["lora_files"] = sorted(p.name for p in lora_dir.iterdir())
    from fewstep.export_card import load_code, write_model_card

    nfe = scheduler.config.default_num_inference_steps
    from fewstep.validate import sampling_guidance

    scale = sampling_guidance(cfg)  # a guided Euler run's (the saved config of a few-step run keeps what was given)
    guidance = family.pipeline_guidance(scale) if scale > 0 else None
    if guidance:
        info["guidance"] = guidance
    code = load_code(family.pipeline_class, args.hub_repo or str(out), nfe, bool(model.lora_enabled), style, guidance)
    write_model_card(out, cfg, {**info, "default_steps": nfe, "load_code": code}, run_dir, pipeline_source)
    (out / "fewstep_export.json").write_text(json.dumps(info, indent=2))
    log.info("exported step %d (%s weights) of %s to %s", step, used, run_dir, out)
    if args.hub_repo:
        from fewstep.hub import push_export

        info["hub"] = push_export(out, args.hub_repo, args.hub_push, bool(args.hub_private))
        log.info("pushed %s to https://huggingface.co/%s", info["hub"]["folder"], args.hub_repo)
    return info


def load_pipeline(path: str | os.PathLike, **kwargs):
    """``<Family>Pipeline.from_pretrained`` of an exported folder (imports the fewstep classes first);
    the transformer reads its target time from the pipeline's scheduler."""
    _import_classes()
    family = _family_of_folder(path)
    pipe = _pipeline_class(family.pipeline_class).from_pretrained(path, **kwargs)
    _attach_target_time(pipe)
    return pipe


def _attach_target_time(pipe) -> None:
    from fewstep.models.family import TwinFlowTransformerMixin

    if isinstance(pipe.transformer, TwinFlowTransformerMixin):
        pipe.transformer.use_scheduler_target_time(pipe.scheduler)


def load_lora_pipeline(base: str | os.PathLike, lora_dir: str | os.PathLike, torch_dtype=None, **kwargs):
    """A base pipeline of the run's family with an exported LoRA: the transformer gets the TwinFlow
    embeddings (``twinflow_embeddings.safetensors``), the adapter is loaded with ``load_lora_weights`` and the
    scheduler is the exported ``TwinFlowScheduler``."""
    _import_classes()
    from safetensors.torch import load_file

    from fewstep.samplers.scheduler import TwinFlowScheduler

    family = _family_of_folder(base)
    lora_dir = Path(lora_dir)
    extra = {}
    emb_file = lora_dir / EMBEDDINGS_FILE
    if emb_file.exists():
        transformer = family.model_class.export_class.from_pretrained(
            base, subfolder="transformer", time_pair=True, low_cpu_mem_usage=False, torch_dtype=torch_dtype
        )
        embeddings = load_file(str(emb_file))
        result = transformer.load_state_dict(embeddings, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{emb_file} does not fit the transformer: {result.unexpected_keys[:3]}")
        extra["transformer"] = transformer
    if (lora_dir / "scheduler").exists():
        extra["scheduler"] = TwinFlowScheduler.from_pretrained(lora_dir, subfolder="scheduler")
    pipe = _pipeline_class(family.pipeline_class).from_pretrained(base, torch_dtype=torch_dtype, **extra, **kwargs)
    pipe.load_lora_weights(lora_dir)
    _attach_target_time(pipe)
    return pipe


def main(argv: list[str] | None = None) -> dict:
    from fewstep.checkpoint import CheckpointError
    from fewstep.models.family import PretrainedNotFound

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_kv(argv, DEFAULTS, USAGE)
    try:
        return export(args)
    except (ExportError, PretrainedNotFound, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from fewstep.errors import run_cli

    run_cli(main)
