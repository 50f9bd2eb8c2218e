"""``python -m fewstep.export run_dir=DIR out=DIR2 [weights=ema|student]``: a run as a diffusers pipeline.

Reads the run's ``.hydra/config.yaml`` and newest valid checkpoint (by default the weights ``fewstep.sample``
and ``fewstep.eval`` use: the sampling EMA with ``teacher.sampling_decay``, else the teacher EMA) and writes
``DIR2/``: the pretrained pipeline of the run's model family (SD3: ``StableDiffusion3Pipeline``, SANA:
``SanaPipeline``, Qwen-Image: ``QwenImagePipeline``, OpenUni: fewstep's ``OpenUniPipeline``) with its components
(VAE, text encoders, tokenizers) saved
again, the trained transformer (LoRA merged) as the family's TwinFlow class (e.g.
:class:`fewstep.models.sd3.SD3TwinFlowTransformer2DModel`) when the run used the target-time / sign
embeddings (else the vanilla class), and ``TwinFlowScheduler`` set up like the run's sampler. The code of
those classes is copied into their component folders (:mod:`fewstep.export.code`), so the folder loads
without fewstep (``DiffusionPipeline.from_pretrained(DIR2, trust_remote_code=True)``; not OpenUni, whose pipeline
class is fewstep's) and, with fewstep, after a bare ``import fewstep``::

    import fewstep
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(DIR2)
    image = pipe("a cat", num_inference_steps=2, guidance_scale=0.0).images[0]

Every export also gets a model card (``README.md``, :mod:`fewstep.export.card`); ``hub_repo=USER/NAME``
pushes it (:mod:`fewstep.export.hub`).

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

from fewstep.cli import parse_kv
from fewstep.config.validate import sampling_guidance
from fewstep.export.card import load_code, write_model_card
from fewstep.export.code import fewstep_pipeline_classes, vendor_components
from fewstep.export.hub import check_push_args, push_export
from fewstep.export.pipeline import EMBEDDINGS_FILE, ExportError, load_run_model, pipeline_class, scheduler_for_run
from fewstep.models.family import PretrainedNotFound, families, load_error, lora_config_of, parse_dtype
from fewstep.training.checkpoint import CheckpointError
from fewstep.training.runs import RunDirError

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
    "hub_repo": "",  # push the export (fewstep.export.hub) after writing it
    "hub_push": "auto",  # auto: the LoRA of a LoRA run, else the pipeline
    "hub_private": False,
}


def export(args) -> dict:
    """Write the run's pipeline folder (and its LoRA, card, record; push it): the phases below, in order."""
    check_args(args)
    run_dir = Path(os.path.expanduser(args.run_dir))
    out = Path(os.path.expanduser(args.out))
    cfg, model, ckpt, step, used = load_run_model(run_dir, args.checkpoint, args.weights)
    dtype = model.weight_dtype if args.dtype == "model" else parse_dtype(args.dtype, "dtype")
    scheduler = scheduler_for_run(cfg, model=model)
    family = next(f for f in families().values() if f.model_class is type(model))
    pipeline_source = args.pipeline or str(cfg.model.pretrained)
    pipe = build_pipeline(family, pipeline_source, model.export_transformer(dtype), scheduler)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    vendor_components(out)  # the custom classes' code travels in their folders (trust_remote_code without fewstep)
    # the style whose target time the transformer must read from the scheduler ("few": tt = 0, its default; a
    # transformer without the time-pair embeddings has no target time)
    style = str(scheduler.config.sampling_style) if model.has_time_pair() else "few"
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
        "load": load_instructions(family, out, style),
    }
    if model.lora_enabled:
        info.update(write_lora(out / "lora", model, family, scheduler, dtype))
    write_card(out, args.hub_repo, cfg, family, info, scheduler.config.default_num_inference_steps, style)
    (out / "fewstep_export.json").write_text(json.dumps(info, indent=2))
    log.info("exported step %d (%s weights) of %s to %s", step, used, run_dir, out)
    if args.hub_repo:
        info["hub"] = push_export(out, args.hub_repo, args.hub_push, bool(args.hub_private))
        log.info("pushed %s to https://huggingface.co/%s", info["hub"]["folder"], args.hub_repo)
    return info


def check_args(args) -> None:
    """The required arguments and the Hub push settings, before anything is loaded."""
    for key in ("run_dir", "out"):
        if not args[key]:
            raise ExportError(f"{key}= is required; {' '.join(USAGE.split())}")
    if args.hub_repo:
        check_push_args(args.hub_repo, args.hub_push)


def build_pipeline(family, pipeline_source: str, transformer, scheduler):
    """The family's pretrained pipeline (VAE, text encoders, tokenizers) around the trained transformer and the
    run's scheduler."""
    local = Path(os.path.expanduser(pipeline_source))
    if local.exists() and not (local / "model_index.json").exists():
        raise ExportError(
            f"{pipeline_source} is not a pipeline folder (no model_index.json): pass pipeline=<the "
            f"{family.pipeline_class} folder or hub id> for the VAE and text encoders"
        )
    try:
        return pipeline_class(family.pipeline_class).from_pretrained(
            str(local) if local.exists() else pipeline_source,
            **{getattr(family, "denoiser", "transformer"): transformer},
            scheduler=scheduler,
        )
    except (OSError, ValueError) as err:
        if isinstance(err, PretrainedNotFound):
            raise
        raise load_error("pipeline", pipeline_source, err) from err


def load_instructions(family, out: Path, style: str) -> str:
    """How the export loads (recorded in fewstep_export.json)."""
    if style != "few" and family.pipeline_class not in fewstep_pipeline_classes():
        # 'any' / 'mul' steps land on tt != 0: the transformer must read it from the scheduler (load_pipeline does)
        return (
            f"from fewstep.export import load_pipeline; load_pipeline({str(out)!r}) (or after from_pretrained: "
            "pipe.transformer.use_scheduler_target_time(pipe.scheduler))"
        )
    load = f"import fewstep; {family.pipeline_class}.from_pretrained({str(out)!r})"
    if family.pipeline_class not in fewstep_pipeline_classes():
        load += f" (without fewstep: DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True))"
    return load


def write_lora(lora_dir: Path, model, family, scheduler, dtype) -> dict:
    """A LoRA run's ``lora/``: the adapter in diffusers' LoRA format, the TwinFlow embeddings, the scheduler."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    lora_dir.mkdir(exist_ok=True)
    denoiser = getattr(family, "denoiser", "transformer")  # the pipeline component: transformer, or unet
    network = model.denoiser if hasattr(model, "denoiser") else model.transformer
    config = lora_config_of(network)
    metadata = None
    if config is not None:
        metadata = json.loads(
            json.dumps(config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o))
        )
    layers = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(network).items()}
    pipeline_class(family.pipeline_class).save_lora_weights(
        lora_dir, **{f"{denoiser}_lora_layers": layers, f"{denoiser}_lora_adapter_metadata": metadata}
    )
    embeddings = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.time_pair_state_dict().items()}
    if embeddings:
        save_file(embeddings, str(lora_dir / EMBEDDINGS_FILE), metadata={"format": "fewstep-twinflow-embeddings"})
    scheduler.save_pretrained(lora_dir / "scheduler")
    return {"lora_dir": str(lora_dir), "lora_files": sorted(p.name for p in lora_dir.iterdir())}


def write_card(out: Path, hub_repo: str, cfg, family, info: dict, nfe: int, style: str) -> None:
    """The model card (README.md), with the code that loads the export and samples as the run did (a guided Euler
    run's card passes the pipeline its own guidance argument; ``info`` gains it)."""
    scale = sampling_guidance(cfg)  # a guided Euler run's (the saved config of a few-step run keeps what was given)
    guidance = family.pipeline_guidance(scale) if scale > 0 else None
    if guidance:
        info["guidance"] = guidance
    code = load_code(family.pipeline_class, hub_repo or str(out), nfe, info["lora"], style, guidance)
    card_info = {**info, "default_steps": nfe, "load_code": code}
    write_model_card(out, cfg, card_info, Path(info["run_dir"]), info["pipeline"])


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_kv(argv, DEFAULTS, USAGE)
    try:
        return export(args)
    except (ExportError, RunDirError, PretrainedNotFound, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None
