"""``python -m fewstep.convert_openuni checkpoint=FILE.pth out=DIR [internvl=...] [sana=...] [vae=...]``

The reference OpenUni checkpoint (hub ``wusize/openuni``, ``openuni_l_internvl3_2b_sana_1_6b_512_hf_blip3o60k.pth``:
a flat ``torch.save``d state dict of wusize/OpenUni's ``OpenUniInternVL3SANAHF``) → an ``OpenUniPipeline`` folder
(:mod:`fewstep.models.openuni`) that ``model=openuni model.pretrained=DIR``, ``fewstep.precompute pretrained=DIR``
and ``fewstep.export`` use.

Where each weight comes from:

* ``meta_queries``, ``connector.layers.N.*``, ``projector.*`` (always the checkpoint) → ``conditioner/``: its
  parameter names are the checkpoint's, so nothing is renamed;
* the SANA DiT → ``transformer/``: the checkpoint's ``transformer.*`` (the fine-tuned DiT) when it has them, else
  the weights of ``sana=``; its config always comes from ``sana=`` (SANA-1.6B-512px);
* the Qwen2 LM → ``text_encoder/`` (a ``Qwen2Model``): the checkpoint's ``lmm.language_model.model.*`` when it has
  them, else ``language_model.model.*`` of the ``internvl=`` folder's safetensors; its config is that folder's
  ``config.json`` ``llm_config``, the tokenizer its tokenizer files (InternVL's vision tower and ``mlp1`` are not
  used for text-to-image and are left out);
* the DC-AE → ``vae/`` from ``vae=``; ``scheduler/``: ``sana`` (default, the SANA pipeline's own, as the
  reference samples) or ``twinflow`` (``TwinFlowScheduler``, the 30-step multi-step grid).

A top-level ``state_dict`` / ``module`` wrapper and a ``module.`` key prefix are accepted. Every bad input stops
with one line naming the fix before any model is built; the sources are printed and written to
``DIR/fewstep_convert.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderDC, SanaTransformer2DModel
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2Model

from fewstep.cli import parse_kv
from fewstep.errors import FewstepError, describe
from fewstep.models.family import _HUB_ID, PretrainedNotFound, dtype_kwargs, parse_dtype, resolve_pretrained
from fewstep.models.openuni import OpenUniConditioner, OpenUniPipeline
from fewstep.samplers.scheduler import TwinFlowScheduler

log = logging.getLogger("fewstep.convert_openuni")

CHECKPOINT_NAME = "openuni_l_internvl3_2b_sana_1_6b_512_hf_blip3o60k.pth"
USAGE = (
    "usage: python -m fewstep.convert_openuni checkpoint=FILE.pth out=DIR [internvl=DIR_OR_HUB_ID] "
    "[sana=DIR_OR_HUB_ID] [vae=DIR_OR_HUB_ID] [dtype=auto|float32|bfloat16|float16] [scheduler=sana|twinflow] "
    "[connector_heads=24]"
)
DEFAULTS = {
    "checkpoint": "",
    "out": "",
    "internvl": "OpenGVLab/InternVL3-2B",
    "sana": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
    "vae": "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
    "dtype": "auto",  # auto: the checkpoint's (its projector's dtype)
    "scheduler": "sana",
    "connector_heads": 24,  # not recorded in the weights; the reference's 24 (1536 / 64)
}
LLM_PREFIX = "lmm.language_model.model."
INTERNVL_LLM_PREFIX = "language_model.model."
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]


class ConvertError(FewstepError, ValueError):
    """A bad argument or input; the message is one line naming the fix."""


def _is_hub_id(text: str) -> bool:
    return not text.startswith(("/", ".", "~")) and bool(_HUB_ID.fullmatch(text))


# --------------------------------------------------------------------------- the checkpoint


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The reference state dict (memory-mapped; wrappers and the ``module.`` prefix removed), its OpenUni keys
    checked."""
    file = Path(os.path.expanduser(path))
    fix = f"give the reference checkpoint (hub wusize/openuni, {CHECKPOINT_NAME})"
    if not file.is_file():
        raise ConvertError(f"checkpoint={path}: no such file; {fix}")
    try:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # a legacy (non-zip) torch.save cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle / zip / weights_only errors of many types
        raise ConvertError(f"checkpoint={path}: not a torch.save'd state dict ({describe(err)}); {fix}") from None
    for wrapper in ("state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConvertError(f"checkpoint={path}: holds a {type(state).__name__}, not a state dict; {fix}")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for key, what in (("meta_queries", "meta_queries"), ("connector.", "connector.*"), ("projector.", "projector.*")):
        if not any(k == key or (key.endswith(".") and k.startswith(key)) for k in state):
            sample = ", ".join(sorted(state)[:3]) or "none"
            raise ConvertError(
                f"checkpoint={path} has no {what} weights (keys: {sample}, ...): it is not an OpenUni checkpoint; {fix}"
            )
    return state


def conditioner_config(state: dict, heads: int, path: str) -> dict:
    """The :class:`OpenUniConditioner` config the checkpoint's shapes give (heads are not in the weights)."""
    queries = state["meta_queries"]
    projector = state.get("projector.weight")
    if queries.ndim != 2 or projector is None or projector.ndim != 2:
        raise ConvertError(
            f"checkpoint={path}: meta_queries {tuple(queries.shape)} / projector.weight "
            f"{None if projector is None else tuple(projector.shape)} are not the reference's 2-D (num_queries, "
            "hidden) and (caption_channels, hidden) (proj_type enc_proj); give an OpenUni-L checkpoint"
        )
    hidden = int(queries.shape[1])
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("connector.layers.")})
    if not layers or layers != list(range(len(layers))):
        raise ConvertError(f"checkpoint={path}: connector.layers.N are not numbered 0..N-1 ({layers[:8]})")
    fc1 = state.get("connector.layers.0.mlp.fc1.weight")
    if fc1 is None or fc1.shape[1] != hidden or projector.shape[1] != hidden:
        raise ConvertError(
            f"checkpoint={path}: the connector / projector width "
            f"{None if fc1 is None else int(fc1.shape[1])} / {int(projector.shape[1])} does not match meta_queries "
            f"{hidden} (enc_proj: connector as wide as the LM); give an OpenUni-L checkpoint"
        )
    if heads < 1 or hidden % heads:
        raise ConvertError(
            f"connector_heads={heads} does not divide the connector width {hidden}; give connector_heads=N"
        )
    return {
        "num_queries": int(queries.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]),
        "num_layers": len(layers),
        "num_attention_heads": int(heads),
        "caption_channels": int(projector.shape[0]),
    }


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def shape_problem(expected: dict[str, tuple], found: dict[str, tuple], prefix: str, config: str) -> str | None:
    """The first missing / unexpected / mis-shaped key of ``found`` against ``expected`` (key → shape; keys shown
    with ``prefix``, ``config`` names where the expected shapes come from), as a phrase."""
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"{prefix}{missing[0]} is missing ({len(missing)} keys that {config} needs)"
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"{prefix}{extra[0]} is not in the model {config} describes ({len(extra)} such keys)"
    for key in sorted(expected):
        if tuple(found[key]) != tuple(expected[key]):
            return f"{prefix}{key} is {tuple(found[key])} where {config} gives {tuple(expected[key])}"
    return None


def _meta_shapes(build) -> dict[str, tuple[int, ...]]:
    with init_empty_weights():
        module = build()
    return shapes(module.state_dict())


def _materialise(build, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """``build()`` without allocating, then the weights ``state`` (cast to ``dtype``) assigned in."""
    with init_empty_weights():
        module = build()
    weights = {k: v.to(dtype).contiguous() for k, v in state.items()}
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval()


# --------------------------------------------------------------------------- InternVL


def internvl_folder(source: str, weights: bool) -> Path:
    """The InternVL folder (a hub id is downloaded: config and tokenizer files, plus safetensors if ``weights``)."""
    local = Path(os.path.expanduser(source))
    if local.exists():
        if not local.is_dir():
            raise ConvertError(f"internvl={source}: is a file; give the InternVL3 folder (OpenGVLab/InternVL3-2B)")
        return local
    if not _is_hub_id(source):
        raise ConvertError(f"internvl={source}: no such folder (and not a hub id owner/name); fix the path")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=TOKENIZER_FILES + (["*.safetensors"] if weights else [])))
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types for an unreachable id
        raise ConvertError(
            f"internvl={source}: could not fetch it ({describe(err)}); give a local InternVL3 folder, or a hub id "
            "that is cached or downloadable (HF_HUB_OFFLINE unset)"
        ) from None


def llm_config(folder: Path, source: str):
    """The LM's ``Qwen2Config`` from InternVL's ``config.json`` ``llm_config`` (attention: sdpa)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(
            f"internvl={source}: no config.json there; give the InternVL3 folder (OpenGVLab/InternVL3-2B)"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ConvertError(f"internvl={source}: config.json does not parse ({describe(err)})") from None
    llm = config.get("llm_config")
    if not isinstance(llm, dict):
        raise ConvertError(
            f"internvl={source}: config.json has no llm_config (not an InternVL chat model); give "
            "OpenGVLab/InternVL3-2B or its local folder"
        )
    if llm.get("model_type", "qwen2") != "qwen2":
        raise ConvertError(
            f"internvl={source}: llm_config.model_type={llm['model_type']}, but OpenUni-L reads a Qwen2 LM "
            "(InternVL3-2B); give OpenGVLab/InternVL3-2B"
        )
    drop = {"attn_implementation", "_attn_implementation", "architectures", "auto_map", "_name_or_path", "model_type"}
    return Qwen2Config(**{k: v for k, v in llm.items() if k not in drop}, attn_implementation="sdpa")


def internvl_llm_keys(folder: Path, source: str) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """``Qwen2Model`` key → (safetensors file, shape) of InternVL's ``language_model.model.*`` weights (headers
    only)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConvertError(
            f"internvl={source} has no *.safetensors (and the checkpoint has no {LLM_PREFIX}* weights); give the "
            "full InternVL3-2B folder"
        )
    keys = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(INTERNVL_LLM_PREFIX):
                    shape = tuple(handle.get_slice(key).get_shape())
                    keys[key.removeprefix(INTERNVL_LLM_PREFIX)] = (file, shape)
    if not keys:
        raise ConvertError(
            f"internvl={source}: its safetensors hold no {INTERNVL_LLM_PREFIX}* weights; give InternVL3-2B"
        )
    return keys


def read_internvl_llm(keys: dict[str, tuple[Path, tuple]]) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted({where for where, _ in keys.values()}):
        with safe_open(str(file), framework="pt") as handle:
            for key, (where, _) in keys.items():
                if where == file:
                    state[key] = handle.get_tensor(INTERNVL_LLM_PREFIX + key)
    return state


def load_tokenizer(folder: Path, source: str):
    """InternVL's tokenizer, by the class its ``tokenizer_config.json`` names (``Qwen2Tokenizer``; InternVL's own
    ``config.json`` is not a transformers config, so ``AutoTokenizer`` would need remote code), right-padding."""
    config_path = folder / "tokenizer_config.json"
    name = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.is_file() else None
    cls = getattr(transformers, str(name), None) or getattr(transformers, str(name).removesuffix("Fast"), None)
    try:
        tokenizer = (cls or transformers.AutoTokenizer).from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ConvertError(f"internvl={source}: could not load its tokenizer ({describe(err)})") from None
    tokenizer.padding_side = "right"
    return tokenizer


# --------------------------------------------------------------------------- SANA and the VAE


def sana_transformer_config(source: str) -> tuple[dict, str, str | None]:
    """(config, resolved source, subfolder) of ``sana=``'s ``SanaTransformer2DModel``."""
    try:
        where, sub = resolve_pretrained(source, "transformer", key="sana")
        config = dict(SanaTransformer2DModel.load_config(where, subfolder=sub))
    except PretrainedNotFound as err:
        raise ConvertError(f"{err} (SANA-1.6B-512px: Efficient-Large-Model/Sana_1600M_512px_diffusers)") from None
    except (OSError, ValueError) as err:
        raise ConvertError(
            f"sana={source}: could not read its transformer config ({describe(err)}); give the SANA-1.6B-512px "
            "pipeline folder or hub id (cached, or HF_HUB_OFFLINE unset)"
        ) from None
    if config.get("_class_name") not in (None, "SanaTransformer2DModel"):
        raise ConvertError(f"sana={source}: its transformer is a {config['_class_name']}, not a SanaTransformer2DModel")
    return config, where, sub


def vae_source(source: str) -> tuple[str, str | None]:
    """(source, subfolder) of the DC-AE: a local pipeline or bare folder, or a hub id (bare repo, else ``vae/``)."""
    local = Path(os.path.expanduser(source))
    try:
        if local.exists() or not _is_hub_id(source):
            where, sub = resolve_pretrained(source, "vae", key="vae")
            AutoencoderDC.load_config(where, subfolder=sub)
            return where, sub
        for sub in (None, "vae"):
            try:
                AutoencoderDC.load_config(source, subfolder=sub)
                return source, sub
            except (OSError, ValueError) as err:
                last = err
        raise last
    except PretrainedNotFound as err:
        raise ConvertError(f"{err} (the DC-AE: mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers)") from None
    except (OSError, ValueError) as err:
        raise ConvertError(
            f"vae={source}: could not read its config ({describe(err)}); give the DC-AE folder or hub id "
            "(mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers)"
        ) from None


def build_scheduler(kind: str, sana: str, sub: str | None):
    """``sana``: the SANA pipeline's own scheduler (its ``scheduler/``); ``twinflow``: the 30-step multi-step
    ``TwinFlowScheduler`` (SPEC §3)."""
    if kind == "twinflow":
        return TwinFlowScheduler(
            sampling_style="mul",
            stochast_ratio=0.0,
            time_dist_ctrl=[1.17, 0.8, 1.1],
            rfba_gap_steps=[0.001, 0.0],
            default_num_inference_steps=30,
        )
    if sub is None:
        raise ConvertError(f"sana={sana} is a bare transformer folder without scheduler/; give scheduler=twinflow")
    try:
        config = diffusers.DDPMScheduler.load_config(sana, subfolder="scheduler")
        cls = getattr(diffusers, config["_class_name"])
        return cls.from_pretrained(sana, subfolder="scheduler")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ConvertError(
            f"sana={sana}: could not load its scheduler ({describe(err)}); give scheduler=twinflow"
        ) from None


# --------------------------------------------------------------------------- the conversion


class Checked(NamedTuple):
    """Everything a conversion reads, checked against each other before any model is built."""

    cond_cfg: dict
    dtype: torch.dtype
    conditioner_state: dict
    dit_state: dict | None  # the checkpoint's transformer.* weights (None: the SANA's own)
    llm_state: dict | None  # the checkpoint's LLM weights (None: read from InternVL via llm_keys)
    llm_keys: dict | None
    qwen: object  # the InternVL LM's Qwen2 config
    sana: str
    sana_sub: str | None
    sana_config: dict
    vae: str
    vae_sub: str | None
    scheduler: object
    tokenizer: object


def convert(args) -> dict:
    """The reference checkpoint (+ InternVL3, SANA, DC-AE) as an ``OpenUniPipeline`` folder: every check first
    (:func:`check_sources`, before any model is built), then the components built and saved."""
    check_args(args)
    checked = check_sources(args)
    pipe, sources = build_pipeline(args, checked)
    out = Path(os.path.expanduser(args.out))
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    info = {
        "checkpoint": str(Path(os.path.expanduser(args.checkpoint)).resolve()),
        "dtype": str(checked.dtype).replace("torch.", ""),
        "conditioner": f"checkpoint {args.checkpoint} (meta_queries, connector.*, projector.*)",
        "conditioner_config": checked.cond_cfg,
        **sources,
        "tokenizer": f"internvl={args.internvl}",
        "vae": f"vae={args.vae}",
        "scheduler": f"{type(checked.scheduler).__name__} ({args.scheduler})",
        "out": str(out),
    }
    (out / "fewstep_convert.json").write_text(json.dumps(info, indent=2))
    for part in ("conditioner", "transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        log.info("%-12s <- %s", part, info[part])
    log.info("wrote the OpenUniPipeline folder %s (model=openuni model.pretrained=%s)", out, out)
    return info


def check_args(args) -> None:
    for key in ("checkpoint", "out"):
        if not args[key]:
            raise ConvertError(f"{key}= is required; {' '.join(USAGE.split())}")
    if args.scheduler not in ("sana", "twinflow"):
        raise ConvertError(f"scheduler={args.scheduler!r} must be sana or twinflow")
    if str(args.dtype) != "auto":
        try:
            parse_dtype(args.dtype, "dtype")
        except ValueError as err:
            raise ConvertError(str(err)) from None


def check_sources(args) -> Checked:
    """The checkpoint's conditioner, transformer and LLM shapes against the InternVL3 and SANA configs (one line
    naming the model to give instead), and the VAE, scheduler and tokenizer found."""
    state = read_checkpoint(args.checkpoint)
    cond_cfg = conditioner_config(state, int(args.connector_heads), args.checkpoint)
    dtype = state["projector.weight"].dtype if str(args.dtype) == "auto" else parse_dtype(args.dtype, "dtype")
    llm_in_checkpoint = any(k.startswith(LLM_PREFIX) for k in state)
    internvl = internvl_folder(args.internvl, weights=not llm_in_checkpoint)
    qwen = llm_config(internvl, args.internvl)
    if int(qwen.hidden_size) != cond_cfg["hidden_size"]:
        raise ConvertError(
            f"checkpoint={args.checkpoint}: meta_queries are {cond_cfg['hidden_size']} wide but internvl="
            f"{args.internvl}'s LM has hidden_size {qwen.hidden_size}; give the InternVL3 model the checkpoint was "
            "trained with (OpenGVLab/InternVL3-2B)"
        )
    sana_cfg, sana, sana_sub = sana_transformer_config(args.sana)
    caption = int(sana_cfg.get("caption_channels", 0))
    if caption != cond_cfg["caption_channels"]:
        raise ConvertError(
            f"checkpoint={args.checkpoint}: projector.weight gives {cond_cfg['caption_channels']} caption channels "
            f"but sana={args.sana}'s transformer takes {caption}; give the SANA the checkpoint was trained with "
            "(Efficient-Large-Model/Sana_1600M_512px_diffusers)"
        )
    sana_config = {k: v for k, v in sana_cfg.items() if not k.startswith("_")}
    conditioner_state = {
        k: v for k, v in state.items() if k == "meta_queries" or k.startswith(("connector.", "projector."))
    }
    expected = _meta_shapes(lambda: OpenUniConditioner(**cond_cfg))
    problem = shape_problem(expected, shapes(conditioner_state), "", "its meta_queries / connector layout")
    if problem:
        raise ConvertError(f"checkpoint={args.checkpoint}: {problem}; give an OpenUni-L checkpoint")
    dit_state = None
    if any(k.startswith("transformer.") for k in state):
        dit_state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        expected = _meta_shapes(lambda: SanaTransformer2DModel.from_config(sana_config))
        problem = shape_problem(expected, shapes(dit_state), "transformer.", f"sana={args.sana}'s config")
        if problem:
            raise ConvertError(
                f"checkpoint={args.checkpoint}: {problem}; give the SANA the checkpoint was trained with "
                "(Efficient-Large-Model/Sana_1600M_512px_diffusers)"
            )
    llm_shapes = _meta_shapes(lambda: Qwen2Model(qwen))
    llm_state = llm_keys = None
    if llm_in_checkpoint:
        llm_state = {k.removeprefix(LLM_PREFIX): v for k, v in state.items() if k.startswith(LLM_PREFIX)}
        config = f"internvl={args.internvl}'s llm_config"
        problem = shape_problem(llm_shapes, shapes(llm_state), LLM_PREFIX, config)
        where = f"checkpoint={args.checkpoint}: "
    else:
        llm_keys = internvl_llm_keys(internvl, args.internvl)
        found = {k: shape for k, (_, shape) in llm_keys.items()}
        problem = shape_problem(llm_shapes, found, INTERNVL_LLM_PREFIX, "its llm_config")
        where = f"internvl={args.internvl}: "
    if problem:
        raise ConvertError(f"{where}{problem}; give the InternVL3 model the checkpoint was trained with")
    vae, vae_sub = vae_source(args.vae)
    scheduler = build_scheduler(args.scheduler, sana, sana_sub)
    tokenizer = load_tokenizer(internvl, args.internvl)
    return Checked(
        cond_cfg, dtype, conditioner_state, dit_state, llm_state, llm_keys, qwen, sana, sana_sub, sana_config, vae,
        vae_sub, scheduler, tokenizer,
    )  # fmt: skip


def build_pipeline(args, checked: Checked) -> tuple[OpenUniPipeline, dict]:
    """The ``OpenUniPipeline`` of the checked sources, and where its transformer and text encoder came from."""
    dtype = checked.dtype
    conditioner = _materialise(lambda: OpenUniConditioner(**checked.cond_cfg), checked.conditioner_state, dtype)
    if checked.dit_state is not None:
        build = lambda: SanaTransformer2DModel.from_config(checked.sana_config)  # noqa: E731
        transformer = _materialise(build, checked.dit_state, dtype)
        dit_from = f"checkpoint {args.checkpoint} (transformer.*, {len(checked.dit_state)} tensors)"
    else:
        transformer = SanaTransformer2DModel.from_pretrained(
            checked.sana, subfolder=checked.sana_sub, **dtype_kwargs(dtype)
        ).eval()
        dit_from = f"sana={args.sana} (the checkpoint has no transformer.* weights)"
    if checked.llm_state is not None:
        llm_state = checked.llm_state
        llm_from = f"checkpoint {args.checkpoint} ({LLM_PREFIX}*, {len(llm_state)} tensors)"
    else:
        llm_state = read_internvl_llm(checked.llm_keys)
        llm_from = f"internvl={args.internvl} ({INTERNVL_LLM_PREFIX}*, {len(llm_state)} tensors)"
    text_encoder = _materialise(lambda: Qwen2Model(checked.qwen), llm_state, dtype)
    vae_model = AutoencoderDC.from_pretrained(checked.vae, subfolder=checked.vae_sub, **dtype_kwargs(dtype)).eval()
    pipe = OpenUniPipeline(
        tokenizer=checked.tokenizer,
        text_encoder=text_encoder,
        conditioner=conditioner,
        transformer=transformer,
        vae=vae_model,
        scheduler=checked.scheduler,
    )
    return pipe, {"transformer": dit_from, "text_encoder": llm_from}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_kv(argv, DEFAULTS, USAGE)
    try:
        return convert(args)
    except (ConvertError, PretrainedNotFound) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from fewstep.cli import run_cli

    run_cli(main)
