"""The model card ``fewstep.export`` writes beside an exported pipeline (``README.md``, diffusers style).

YAML front matter (``license`` and ``license_name``/``license_link`` copied from the base model's card,
``base_model``, ``library_name: diffusers``, ``pipeline_tag: text-to-image``, tags), then: the base model,
the objective with its key options, the sampler and its number of network evaluations, the training
steps / batch / learning rate, the run's final sample grid (copied in as ``samples.png``), the evaluation
when the run has one, the base model's license and how to load the folder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from fewstep.export.code import fewstep_pipeline_classes

CARD = "README.md"
GRID = "samples.png"
OBJECTIVE_KEYS = (  # the options that define the few-step model, in the card's order
    "target_step_count", "estimate_order", "enhanced_ratio", "enhanced_range", "delta_t", "target_clamp",
    "consistency_ratio", "probs", "adversarial", "dist_match_coef", "time_dist", "time_weighting", "loss",
)  # fmt: skip
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _front_matter(text: str) -> dict:
    """The YAML block between the leading ``---`` lines of a card ({} without one)."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model_card(base: str) -> dict:
    """The front matter of the base model's ``README.md``: the local folder's, or the hub's when cached
    (nothing is downloaded for the card)."""
    local = Path(base).expanduser()
    path = local / CARD if local.is_dir() else None
    if path is None and _HUB_ID.fullmatch(base):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, CARD)
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - no cache, no card
            path = None
    if path is None or not path.exists():
        return {}
    return _front_matter(path.read_text(errors="replace"))


def _final_grid(run_dir: Path, nfe: int) -> Path | None:
    """The run's final grid at ``nfe`` steps, else its smallest-NFE final grid, else its last training grid."""
    samples = run_dir / "samples"
    if (samples / f"nfe_{nfe}.png").exists():
        return samples / f"nfe_{nfe}.png"
    finals = sorted(samples.glob("nfe_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    steps = sorted(samples.glob("step_*.png"))
    return finals[0] if finals else (steps[-1] if steps else None)


def _value(v) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=True)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    return json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)


def model_card(cfg, info: dict, base: str, license_info: dict, grid: str | None, summary: dict | None) -> str:
    """The card's text (see the module docstring)."""
    import yaml

    family, objective = info.get("family", "sd3"), str(cfg.objective._target_).rsplit(".", 1)[-1]
    nfe = int(info.get("default_steps") or cfg.objective.get("target_step_count", 2))
    lora = bool(info.get("lora"))
    license_id = license_info.get("license") or "other"
    meta = {"license": license_id}
    for key in ("license_name", "license_link"):
        if license_info.get(key):
            meta[key] = license_info[key]
    if _HUB_ID.fullmatch(base) and not Path(base).expanduser().exists():
        meta["base_model"] = base
    meta.update(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["text-to-image", "diffusers", "fewstep", objective.lower(), "few-step", *(["lora"] if lora else [])],
    )
    tr, data, sampler = cfg.trainer, cfg.data, cfg.sampler
    sampler_name = str(sampler.get("_target_", "")).rsplit(".", 1)[-1]
    sampler_opts = {k: v for k, v in sampler.items() if k != "_target_" and v is not None}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(info.get('out', 'export')).name}: {objective} few-step {family}" + (" (LoRA)" if lora else ""),
        "",
        f"A {nfe}-step ({f'guidance {_guided(info):g}' if _guided(info) else 'guidance 0'}) text-to-image model "
        "trained with fewstep from "
        f"`{base}` by {objective}: a {'LoRA adapter on the' if lora else 'full fine-tune of the'} transformer, "
        f"{info.get('weights', 'ema')} weights at step {info.get('step')}.",
        "",
        "## Training",
        "",
        f"- **Base model**: `{base}`",
        f"- **Objective**: `{objective}`",
    ]
    lines += [f"  - `{k}`: {_value(cfg.objective[k])}" for k in OBJECTIVE_KEYS if k in cfg.objective]
    lines += [
        f"- **Steps**: {info.get('step')} of `trainer.max_steps={tr.max_steps}`; batch {data.batch_size} per process"
        f" × `grad_accum={tr.grad_accum}`; learning rate {tr.lr} ({tr.lr_schedule}, betas {_value(tr.betas)}); "
        f"mixed precision `{tr.mixed_precision}`",
        f"- **Teacher**: `{str(cfg.teacher.get('_target_', '')).rsplit('.', 1)[-1]}`"
        + (f" (decay {cfg.teacher.decay})" if "decay" in cfg.teacher else ""),
    ]
    if lora:
        lines.append(f"- **LoRA**: rank {cfg.model.lora.rank}, alpha {cfg.model.lora.alpha}, targets "
                     f"{_value(cfg.model.lora.target_modules)}")  # fmt: skip
    lines += [
        "",
        "## Sampling",
        "",
        (
            f"- **NFE**: {2 * nfe} network evaluations per image (`num_inference_steps={nfe}`, "
            f"`{_kwargs(info.get('guidance'))}`: a conditional and an unconditional pass per step, as the run sampled)"
            if _guided(info)
            else f"- **NFE**: {nfe} network evaluations per image (`num_inference_steps={nfe}`, `guidance_scale=0`); "
            "other step counts work too (any-step model)"
        ),
        f"- **Scheduler**: `TwinFlowScheduler`, set up like the run's `{sampler_name}` sampler: {_value(sampler_opts)}",
    ]
    evaluation = (summary or {}).get("eval") or {}
    if evaluation:
        lines += ["", "## Evaluation (the run's own)", "", "| sampler | metrics |", "|---|---|"]
        lines += [f"| {k} | {_value(v) if isinstance(v, dict) else v} |" for k, v in evaluation.items()]
    if grid:
        lines += ["", "## Samples", "", f"![samples at the end of training]({grid})"]
    license_text = f"`{license_id}`" + (
        f" ({license_info['license_name']})" if license_info.get("license_name") else ""
    )
    if license_info.get("license_link"):
        license_text += f", {license_info['license_link']}"
    if not license_info:
        license_text += f": the base model's card was not found; `{base}`'s license applies to these weights"
    lines += [
        "",
        "## License",
        "",
        f"These weights derive from `{base}` and carry its license: {license_text}.",
        "",
        "## How to load",
        "",
        "```python",
        *info.get("load_code", []),
        "```",
        "",
    ]
    return "\n".join(lines)


def load_code(
    pipeline_class: str, where: str, nfe: int, lora: bool, style: str = "few", guidance: dict | None = None
) -> list[str]:
    """The card's loading snippet: the folder (or hub repo) as a diffusers pipeline, ``nfe`` steps at guidance 0
    (``guidance``: the pipeline's guidance arguments of a run that sampled with CFG, ``Family.pipeline_guidance``),
    with fewstep installed or (its code travels in the folder) without; a pipeline class of fewstep's own
    (OpenUni) needs fewstep installed. A LoRA run also shows :func:`fewstep.export.load_lora_pipeline` on the
    base pipeline. ``style``: the exported scheduler's sampling style; for ``any`` / ``mul`` the transformer reads
    its target time from the scheduler (a pipeline passes only the timestep; without that it would use ``tt = 0``,
    the few-step jump), which the snippet switches on after each ``from_pretrained`` (OpenUni's pipeline and
    ``load_lora_pipeline`` do it themselves)."""

    own = pipeline_class in fewstep_pipeline_classes()
    attach = []
    if style != "few" and not own:
        attach = [f"pipe.transformer.use_scheduler_target_time(pipe.scheduler)  # '{style}' steps: tt from it"]
    lines = [
        "import torch",
        f"import fewstep  # lets diffusers find fewstep's {'pipeline, ' if own else ''}transformer and "
        "TwinFlowScheduler classes",
        f"from diffusers import {pipeline_class}",
        "",
        f'pipe = {pipeline_class}.from_pretrained("{where}", torch_dtype=torch.bfloat16).to("cuda")',
        *attach,
        "generator = torch.Generator().manual_seed(0)  # one seed, one image (step noise follows the initial latents)",
        f'image = pipe("a photo of a red fox in snow", num_inference_steps={nfe}, {_kwargs(guidance)}, '
        "generator=generator).images[0]",
    ]
    if not own:
        lines += [
            "",
            "# without fewstep installed: the classes' code ships in the component folders",
            "from diffusers import DiffusionPipeline",
            f'pipe = DiffusionPipeline.from_pretrained("{where}", trust_remote_code=True, torch_dtype=torch.bfloat16)',
            *attach,
        ]
    if lora:
        lines += [
            "",
            "# or the LoRA (lora/) on the base pipeline, with the TwinFlow embeddings and scheduler:",
            "from fewstep.export import load_lora_pipeline",
            f'pipe = load_lora_pipeline("BASE_PIPELINE", "{where}/lora", torch_dtype=torch.bfloat16).to("cuda")',
        ]
    return lines


def _kwargs(guidance: dict | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (guidance or {"guidance_scale": 0.0}).items())


def _guided(info: dict) -> float:
    """The CFG scale the card's code passes to the pipeline (0: the model samples unguided)."""
    guidance = info.get("guidance") or {}
    return float(guidance.get("guidance_scale", guidance.get("true_cfg_scale", 0.0)))


def write_model_card(out: Path, cfg, info: dict, run_dir: Path, base: str) -> Path:
    """Write ``out/README.md`` (and copy the run's final grid to ``out/samples.png``); returns the card's path."""
    nfe = int(info.get("default_steps") or cfg.objective.get("target_step_count", 2))
    grid = _final_grid(run_dir, nfe)
    if grid is not None:
        shutil.copyfile(grid, out / GRID)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    text = model_card(cfg, {**info, "out": str(out)}, base, base_model_card(base), GRID if grid else None, summary)
    for folder in (out, out / "lora"):  # a LoRA pushed alone carries the card too
        if folder.is_dir():
            (folder / CARD).write_text(text)
            if grid is not None and folder != out:
                shutil.copyfile(grid, folder / GRID)
    return out / CARD
