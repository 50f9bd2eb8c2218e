"""``python -m fewstep.precompute pretrained=DIR images=DIR out=DIR [resolution=512 batch_size=4 device=...]``

Images + captions → a latent / text-embedding cache that ``data=latents data.path=DIR`` trains on (SPEC §4),
encoded by the pipeline's own VAE and text encoders. The pipeline folder's ``model_index.json`` names its family
(:mod:`fewstep.models.family`), which says how latents are normalised and how ``encode_prompt`` is called
(SD3: two CLIPs + T5; SANA: Gemma-2 with ``complex_human_instruction=default|none|FILE``; Qwen-Image:
Qwen2.5-VL, embeddings padded to ``max_sequence_length`` with their mask; OpenUni: the frozen InternVL3 LM +
meta-queries + connector + projector, 256 × 2304 per prompt, the null prompt "" = "Generate an image.", from a
``fewstep.convert_openuni`` folder). ``null_prompt=`` overrides the
family's unconditional prompt (empty; Qwen-Image: "Generate an image.", the reference's).

Captions: ``metadata.jsonl`` in the image folder (lines ``{"file_name": ..., "text": ...}``) or a ``.txt``
beside each image. Or, instead of ``images=``, ``dataset=HUB_ID_OR_DIR image_column=image
caption_column=text split=train``: a ``datasets`` dataset (:mod:`fewstep.data.image_datasets`; rows are
named ``row N``). Images are resized to cover a resolution bucket (aspect ratios 1:1, 4:3, 3:2, 16:9 and
their transposes at about ``resolution²`` pixels, sides a multiple of the latent patch) and centre-cropped;
``buckets=false`` uses the square only. Latents are the family's normalisation of the VAE mean (SD3:
``(mean − shift_factor)·scaling_factor``).

The cache (``out/``): ``shards/shard_NNNNN.safetensors`` (``latents`` (N, C, h, w) in ``latents_dtype``,
bfloat16 by default; the text embeddings in ``embeds_dtype``, an embedding with a mask (Qwen-Image, SANA) stored
with its valid tokens only (``text_layout=ragged``, :mod:`fewstep.data.shards`); one latent shape per shard) each
with a ``.json`` sidecar written after it, ``null.safetensors`` (the empty prompt, for the enhanced / CFG target),
``validation.safetensors`` (a few fixed prompts for sample grids) and ``manifest.json`` (written last).
A rerun with the same arguments skips finished shards. Unreadable images and images without a caption
are reported by name, skipped, and counted in the summary (printed, and in ``manifest.json``).

Prompt-only (image-free training, SPEC §10): ``prompts=FILE`` instead of ``images=`` / ``dataset=``, one
prompt per line (blank lines ignored). The shards then hold only the text embeddings; the manifest says
``"prompt_only": true`` and records the latent shape of a ``resolution²`` image (the family's VAE run once
on a blank image, so any family's channels, down-sampling and patch rounding apply), and ``data=latents``
yields zero latents of that shape, which ``objective.image_free=true`` replaces by the student's samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file
from tqdm import tqdm

from fewstep.cli import parse_kv
from fewstep.data.image_datasets import DatasetImages
from fewstep.data.shards import CAPTIONS, pack
from fewstep.errors import FewstepError
from fewstep.models.family import (
    PretrainedNotFound,
    dtype_kwargs,
    family_for_pipeline,
    load_error,
    parse_dtype,
    resolve_pretrained,
)

log = logging.getLogger("fewstep.precompute")

USAGE = (
    "usage: python -m fewstep.precompute pretrained=DIR_OR_HUB_ID (images=DIR | dataset=HUB_ID_OR_DIR "
    "[image_column=image] [caption_column=text] [split=train] | prompts=FILE) out=DIR [resolution=512] "
    "[batch_size=4] [device=cuda|cpu] [shard_size=256] [max_sequence_length=N (default: the pipeline's own: SD3 256, "
    "SANA 300, Qwen-Image 512)] [buckets=true] "
    "[dtype=auto|float32|bfloat16] [embeds_dtype=bfloat16|float16|float32] [latents_dtype=bfloat16|float32] "
    "[text_layout=ragged|padded] [text=cached|online] [workers=auto|N] [missing_caption=skip|empty] "
    "[validation_prompts=FILE] [progress=true] [null_prompt=TEXT] [complex_human_instruction=default|none|FILE]"
)
DEFAULTS = {
    "pretrained": "",
    "images": "",
    "dataset": "",  # a `datasets` dataset instead of images= (fewstep.data.image_datasets)
    "prompts": "",  # one prompt a line instead of images=: a prompt-only cache for objective.image_free=true
    "image_column": "image",
    "caption_column": "text",
    "split": "train",
    "out": "",
    "resolution": 512,
    "batch_size": 4,
    "device": None,
    "shard_size": 256,
    "max_sequence_length": None,  # None: the family's pipeline default (Family.max_sequence_length)
    "buckets": True,
    "dtype": "auto",
    "embeds_dtype": "bfloat16",
    "latents_dtype": "bfloat16",
    "text": "cached",  # online: captions only; data=latents encodes them on each device as it reads (SPEC §4)
    "workers": "auto",  # image decoding processes per precompute process (auto: the CPUs per process, at most 8)
    "text_layout": "ragged",  # ragged: masked embeddings keep their valid tokens only (fewstep.data.shards)
    "missing_caption": "skip",
    "validation_prompts": "",
    "progress": True,
    "null_prompt": None,
    "complex_human_instruction": "default",
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ASPECT_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
DEFAULT_VALIDATION_PROMPTS = (
    "a photo of a red fox sitting in fresh snow",
    "a bowl of ramen on a wooden table, studio lighting",
    "a lighthouse on a cliff at sunset, oil painting",
    "a close-up portrait of an old man with a grey beard",
)
FORMAT = "fewstep-latents"
FORMAT_VERSION = 2  # 2: ragged masked embeddings, bf16 latents, shard sizes and condition shapes recorded
VERSION1_LAYOUT = {"latents_dtype": "float32", "text_layout": "padded"}  # what a shard without a record holds


class PrecomputeError(FewstepError, ValueError):
    """A bad argument or input; the message is one line naming the fix."""


# --------------------------------------------------------------------------- planning


@dataclass
class Item:
    file: str  # relative to the image folder (posix)
    caption: str
    size: tuple[int, int]  # (width, height) in pixels, bucket-resized
    upscale: float = 1.0  # > 1: the image is smaller than its bucket and is enlarged by this factor


@dataclass
class Shard:
    name: str
    size: tuple[int, int]  # (width, height)
    items: list[Item] = field(default_factory=list)


def bucket_sizes(resolution: int, multiple: int, buckets: bool = True) -> list[tuple[int, int]]:
    """(width, height) pairs of about ``resolution²`` pixels, sides multiples of ``multiple``."""
    sizes = set()
    for ratio in ASPECT_RATIOS if buckets else (1.0,):
        w = max(multiple, round(resolution * math.sqrt(ratio) / multiple) * multiple)
        h = max(multiple, round(resolution / math.sqrt(ratio) / multiple) * multiple)
        sizes.add((w, h))
    return sorted(sizes)


def pick_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(ratio - math.log(s[0] / s[1])), s))


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_captions(folder: Path) -> dict[str, str]:
    """``metadata.jsonl`` captions keyed by the image path relative to ``folder`` (posix)."""
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        return captions
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row["text"] is not None:  # null: no caption (missing_caption= decides)
                captions[Path(row["file_name"]).as_posix()] = str(row["text"])
        except (ValueError, KeyError, TypeError) as err:
            raise PrecomputeError(
                f'{meta}:{n}: expected {{"file_name": ..., "text": ...}} ({type(err).__name__}); fix that line'
            ) from None
    return captions


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, after the EXIF orientation."""
    with Image.open(path) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
            orientation = 1
    if width < 1 or height < 1:
        raise ValueError("empty image")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB in [-1, 1], (3, h, w): resized to cover ``size`` (w, h), centre-cropped."""
    w, h = size
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im).convert("RGB")
    scale = max(w / im.width, h / im.height)
    nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    im = im.crop((left, top, left + w, top + h))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def folder_rows(folder: Path):
    """``(name, image opener, caption or None)`` per image file of ``folder`` (captions from ``metadata.jsonl``
    or a ``.txt`` beside the image), sorted by path; the name is the path relative to ``folder``."""
    captions = read_captions(folder)
    for path in find_images(folder):
        rel = path.relative_to(folder).as_posix()
        caption = captions.get(rel)
        if caption is None and path.with_suffix(".txt").exists():
            caption = path.with_suffix(".txt").read_text().strip()
        yield rel, (lambda p=path: p), caption


def plan_shards(
    folder: Path, sizes: list[tuple[int, int]], shard_size: int, missing_caption: str
) -> tuple[list[Shard], list[dict], int]:
    """Deterministic shards (one bucket each) of the captioned, readable images; and the skipped ones."""
    return plan_rows(folder_rows(folder), sizes, shard_size, missing_caption)


def plan_rows(rows, sizes: list[tuple[int, int]], shard_size: int, missing_caption: str):
    """Shards of ``(name, image opener, caption)`` rows (a folder's files or a dataset's rows), the skipped rows
    and the number of rows."""
    skipped: list[dict] = []
    by_bucket: dict[tuple[int, int], list[Item]] = {}
    n_rows = 0
    for name, opener, caption in rows:
        n_rows += 1
        try:
            width, height = image_size(opener())
        except Exception as err:  # noqa: BLE001 - any decoder error means an unreadable image
            skipped.append({"file": name, "reason": f"unreadable: {type(err).__name__}: {str(err)[:120]}"})
            continue
        if caption is None:
            if missing_caption == "skip":
                skipped.append({"file": name, "reason": "no caption (metadata.jsonl or .txt)"})
                continue
            caption = ""
        bucket = pick_bucket(width, height, sizes)
        upscale = max(bucket[0] / width, bucket[1] / height)
        by_bucket.setdefault(bucket, []).append(Item(name, caption, bucket, upscale))
    shards: list[Shard] = []
    for bucket in sorted(by_bucket, key=lambda s: (s[1], s[0])):
        items = by_bucket[bucket]
        for start in range(0, len(items), shard_size):
            shards.append(Shard(f"shard_{len(shards):05d}", bucket, items[start : start + shard_size]))
    return shards, skipped, n_rows


def warn_upscaled(items: list[Item], resolution: int) -> int:
    """One warning, with a count, for the images smaller than their bucket (enlarged: blurrier than the rest);
    returns the count."""
    small = [i for i in items if i.upscale > 1.0]
    if small:
        worst = max(small, key=lambda i: i.upscale)
        log.warning(
            "precompute: %d of %d images are smaller than resolution=%d and are upscaled (up to %.2fx, e.g. %s); "
            "give larger images or a lower resolution= for sharper latents",
            len(small), len(items), resolution, worst.upscale, worst.file,
        )  # fmt: skip
    return len(small)


# --------------------------------------------------------------------------- encoders


class Encoders:
    """The pipeline's VAE and text encoders (no denoiser), on ``device``; the pipeline's family
    (:func:`fewstep.models.family.family_for_pipeline`) says how its latents are normalised and how its
    ``encode_prompt`` is called."""

    def __init__(self, pretrained: str, device: torch.device, text_dtype: torch.dtype, options: dict | None = None):
        from diffusers import DiffusionPipeline  # lazy: a bad argument is refused before diffusers loads (seconds)

        local = Path(os.path.expanduser(pretrained))
        if local.exists():
            if not (local / "model_index.json").exists():
                raise PrecomputeError(
                    f"pretrained={pretrained}: no model_index.json there; precompute needs a diffusers pipeline "
                    "folder (VAE + text encoders), not a bare transformer"
                )
            source = str(local.resolve())
        else:
            source, _ = resolve_pretrained(pretrained, "vae", key="pretrained")
        try:
            index = DiffusionPipeline.load_config(source)
            skip = {
                k: None
                for k in ("transformer", "unet", "safety_checker", "feature_extractor", "image_encoder")
                if k in index
            }
            pipe = DiffusionPipeline.from_pretrained(source, **dtype_kwargs(text_dtype), **skip)
            if text_dtype != torch.float32:  # the VAE encodes in float32 from its stored weights, not bf16-rounded ones
                pipe.vae = type(pipe.vae).from_pretrained(source, subfolder="vae")
        except (OSError, ValueError) as err:
            raise load_error("pretrained", pretrained, err) from err
        self.source = source
        self.pipeline_class = index.get("_class_name", type(pipe).__name__)
        self.family = family_for_pipeline(self.pipeline_class)
        self.options = dict(options or {})
        self.pipe = pipe
        self.device = device
        self.vae = pipe.vae.to(device=device, dtype=torch.float32).eval()
        for name in self.family.text_modules:
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(device).eval()
        self.vae_info = self.family.vae_info(self.vae)
        self.vae_scale = self.family.vae_scale(self.vae)
        self.latent_multiple = self.vae_scale * self._denoiser_multiple(index)

    def _component_config(self, name: str) -> dict | None:
        local = Path(self.source)
        try:
            if local.is_dir():
                path = local / name / "config.json"
                return json.loads(path.read_text()) if path.exists() else None
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(self.source, "config.json", subfolder=name)).read_text())
        except (OSError, ValueError):
            return None

    def _denoiser_multiple(self, index: dict) -> int:
        """Latent sides must be multiples of the transformer patch (or the UNet's down-sampling factor)."""
        if "transformer" in index:
            config = self._component_config("transformer") or {}
            return int(config.get("patch_size", 1))
        if "unet" in index:
            config = self._component_config("unet") or {}
            return 2 ** (len(config.get("block_out_channels", [0])) - 1)
        return 1

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.family.encode_latents(self.vae, pixels.to(self.device, torch.float32)).float().cpu()

    @torch.no_grad()
    def encode_text(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        return self.family.encode_text(self.pipe, prompts, self.device, max_sequence_length, self.options)

    @torch.no_grad()
    def encode_null(self, prompt: str, max_sequence_length: int) -> dict[str, torch.Tensor]:
        return self.family.encode_null(self.pipe, prompt, self.device, max_sequence_length, self.options)


# --------------------------------------------------------------------------- the run


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".tmp_{path.name}_{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _write_json_atomic(data: dict, path: Path) -> None:
    tmp = path.with_name(f".tmp_{path.name}_{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _shard_done(shard: Shard, shards_dir: Path, text_length: int | None, layout: dict) -> dict | None:
    """The sidecar of a finished shard with the planned files, prompt length and storage ``layout``
    (:func:`storage_layout`), else None."""
    sidecar = shards_dir / f"{shard.name}.json"
    if not sidecar.exists():
        return None
    try:
        info = json.loads(sidecar.read_text())
    except ValueError:
        return None
    planned = [i.file for i in shard.items]
    if info.get("planned") != planned or tuple(info.get("size", ())) != shard.size:
        return None
    # embeddings of another width: encode again; unrecorded (written before lengths were) is unknown, except where
    # no length applies (the text length is fixed: OpenUni)
    recorded = info.get("max_sequence_length", "unrecorded")
    if recorded != text_length and not (recorded == "unrecorded" and text_length is None):
        return None
    if info.get("count", 0) > 0 and not (shards_dir / f"{shard.name}.safetensors").exists():
        return None
    stored = {k: info.get(k, old) for k, old in VERSION1_LAYOUT.items()}
    if "text" in info:
        stored["text"] = info["text"]
    if stored != layout:  # written by version 1, or with other storage options: encode again
        return None
    return info


def storage_layout(options) -> dict:
    """How a shard's tensors are stored (recorded in its sidecar and the manifest)."""
    layout = {
        "latents_dtype": str(options.latents_dtype).replace("torch.", ""),
        "text_layout": "ragged" if options.ragged else "padded",
    }
    if options.online:
        layout["text"] = "online"
    return layout


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in tensors.items()}


class Plan(NamedTuple):
    """What one precompute encodes: the shards (each a bucket's items), what was skipped while planning, how many
    inputs were found, how an item's image is opened (None: prompts only) and a prompt-only cache's latent shape."""

    shards: list
    skipped: list
    n_files: int
    open_image: Callable | None
    prompt_shape: list | None


class Processes(NamedTuple):
    """This process's place in a precompute launched on several (``accelerate launch -m fewstep.precompute``,
    ``torchrun``): its index, how many there are, its device, and a barrier."""

    index: int
    count: int
    device: torch.device
    wait: Callable[[], None]


def processes(device: torch.device | None) -> Processes:
    """One process (the default), or the launcher's: ``WORLD_SIZE`` > 1 joins the process group (gloo on CPU, NCCL
    on GPUs) and each process takes its local GPU (``device=`` names the kind; the index is the process's)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(0, 1, device or torch.device("cuda" if torch.cuda.is_available() else "cpu"), lambda: None)
    from accelerate import PartialState

    state = PartialState(cpu=device is not None and device.type == "cpu")
    if device is None or (device.type == "cuda" and device.index is None):
        device = state.device
    return Processes(state.process_index, state.num_processes, device, state.wait_for_everyone)


def precompute(args) -> dict:
    """Run the precompute for parsed ``args`` (see ``DEFAULTS``); returns the manifest. Phases: check the
    arguments (before any encoder loads), plan the shards (an item already in a finished shard keeps its place:
    :func:`keep_placed`), encode this process's share of the shards not done yet (shard ``i`` is process
    ``i mod count``'s; a resumed run keeps finished ones), then the first process encodes the null and validation
    prompts and writes the manifest once every process is done."""
    options = check_args(args)
    source = None
    if options.images is None and options.prompts is None:  # the dataset (and its columns) before the encoders load
        source = DatasetImages(args.dataset, args.image_column, args.caption_column, args.split)
    procs = processes(torch.device(args.device) if args.device else None)
    options = options._replace(device=procs.device)
    encoders = Encoders(args.pretrained, options.device, options.text_dtype, options.encoder_options)
    text_length = sequence_length(args.max_sequence_length, encoders.family)
    out = Path(os.path.expanduser(args.out))
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_inputs(args, options, encoders, source)
    if plan.open_image is not None:  # images: what a finished shard holds stays there, new items go to new shards
        plan = plan._replace(shards=keep_placed(plan.shards, shards_dir, args.shard_size))
    warn_upscaled([i for s in plan.shards for i in s.items], args.resolution)
    planned_names = {s.name for s in plan.shards}
    if procs.index == 0:
        for stale in shards_dir.glob("shard_*"):
            if stale.name.split(".")[0] not in planned_names:
                stale.unlink()
    layout = storage_layout(options)
    done_infos = {s.name: _shard_done(s, shards_dir, text_length, layout) for s in plan.shards}
    procs.wait()  # every process has read what was done before any writes

    mine = [s for n, s in enumerate(plan.shards) if n % procs.count == procs.index]
    total = sum(len(s.items) for s in mine)
    initial = sum(len(s.items) for s in mine if done_infos[s.name] is not None)
    unit = "prompt" if options.prompts is not None else "img"
    desc = "precompute" if procs.count == 1 else f"precompute (process {procs.index} of {procs.count})"
    progress = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not args.progress)
    resumed = sum(1 for v in done_infos.values() if v is not None)
    todo = [s for s in mine if done_infos[s.name] is None]
    workers = decode_workers(args.workers, procs.count)
    for shard, chunks in zip(todo, decoded_chunks(todo, plan, args.batch_size, workers), strict=True):
        done_infos[shard.name] = encode_shard(
            shard, chunks, encoders, text_length, options, shards_dir, progress, plan.prompt_shape, procs.index
        )
    progress.close()
    procs.wait()
    if procs.index == 0:
        for s in plan.shards:  # the other processes' shards, from their sidecars
            done_infos[s.name] = done_infos[s.name] or _shard_done(s, shards_dir, text_length, layout)
        finish(args, options, plan, done_infos, encoders, text_length, resumed, out, unit)
    procs.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["summary"]["encoded"] == 0:
        raise PrecomputeError(
            f"no image was encoded ({manifest['summary']['skipped']} skipped; see {out / 'manifest.json'}); "
            "add readable, captioned images"
        )
    return manifest


def finish(args, options, plan, done_infos, encoders, text_length, resumed, out: Path, unit: str) -> None:
    """The null and validation prompts' embeddings and the manifest (the first process, after every shard)."""
    null_prompt = encoders.family.null_prompt(args.null_prompt)
    null = _cast(encoders.encode_null(null_prompt, text_length), options.embeds_dtype)
    _save_atomic(null, out / "null.safetensors")
    validation = _cast(encoders.encode_text(options.validation_prompts, text_length), options.embeds_dtype)
    _save_atomic(validation, out / "validation.safetensors")
    manifest = build_manifest(args, options, plan, done_infos, encoders, text_length, null_prompt, resumed)
    manifest["cond_shapes"] = {k: list(v.shape[1:]) for k, v in null.items()}
    _write_json_atomic(manifest, out / "manifest.json")
    skipped, summary = manifest["skipped"], manifest["summary"]
    for s in skipped:
        log.warning("skipped %s: %s", s["file"], s["reason"])
    log.info(
        "precompute: %d of %d %ss encoded into %d shard(s) (%d resumed), %d skipped (%d unreadable, "
        "%d without caption); buckets %s; %.3f MiB a sample; cache in %s",
        summary["encoded"], plan.n_files, unit, summary["shards"], resumed, len(skipped),
        summary["skipped_unreadable"], summary["skipped_no_caption"], summary["latent_buckets"],
        summary["bytes_per_sample"] / 2**20, out,
    )  # fmt: skip


def decode_workers(option, processes_count: int) -> int:
    """``workers=auto``: the CPUs this process may use, shared among the launched processes, less one for the
    process itself (at most 8); or the number given."""
    if str(option) != "auto":
        return int(option)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, processes_count) - 1))


def keep_placed(shards: list[Shard], shards_dir: Path, shard_size: int) -> list[Shard]:
    """Shards of the planned items where every item a finished shard holds (its ``.json`` sidecar) stays in that
    shard, so adding images to the input re-encodes none of the old ones. A sidecar's shard is kept when all its
    items are still planned, in the same bucket. A planned shard none of whose items is kept and whose name is free
    stays as planned (an interrupted run resumes under the same names); the other items no kept shard holds are
    bucketed and cut into new shards, numbered after the highest name in use, in the planned order. With no
    sidecars this is the plan."""
    items = {i.file: (s.size, i) for s in shards for i in s.items}
    kept, placed = [], set()
    for sidecar in sorted(shards_dir.glob("shard_*.json")):
        try:
            info = json.loads(sidecar.read_text())
            planned, size = list(info["planned"]), tuple(info["size"])
        except (ValueError, KeyError, TypeError):
            continue
        if planned and all(f in items and items[f][0] == size and f not in placed for f in planned):
            kept.append(Shard(sidecar.stem, size, [items[f][1] for f in planned]))
            placed.update(planned)
    if not kept:
        return shards
    names = {s.name for s in kept}
    as_planned, rest = [], []
    for shard in shards:  # the plan's order: bucket by bucket
        left = [i for i in shard.items if i.file not in placed]
        if len(left) == len(shard.items) and shard.name not in names:
            as_planned.append(shard)
            names.add(shard.name)
        elif left:
            rest.append((shard.size, left))
    highest = max(int(n.split("_")[1]) for n in names)
    new: list[Shard] = []
    for size, left in rest:
        if new and new[-1].size == size and len(new[-1].items) < shard_size:
            room = shard_size - len(new[-1].items)
            new[-1].items.extend(left[:room])
            left = left[room:]
        for start in range(0, len(left), shard_size):
            highest += 1
            new.append(Shard(f"shard_{highest:05d}", size, left[start : start + shard_size]))
    return sorted(kept + as_planned, key=lambda s: s.name) + new


class Options(NamedTuple):
    """The checked arguments of one precompute."""

    prompts: list | None  # prompts=FILE: a prompt-only cache
    images: Path | None  # images=DIR
    device: torch.device
    text_dtype: torch.dtype
    embeds_dtype: torch.dtype
    validation_prompts: list
    encoder_options: dict
    latents_dtype: torch.dtype = torch.bfloat16
    ragged: bool = True  # text_layout=ragged
    online: bool = False  # text=online: no embeddings in the shards, their captions instead


def check_args(args) -> Options:
    """Every argument checked (one line naming the fix), before any encoder loads."""
    for key in ("pretrained", "out"):
        if not args[key]:
            raise PrecomputeError(f"{key}= is required; {' '.join(USAGE.split())}")
    if sum(bool(args[k]) for k in ("images", "dataset", "prompts")) != 1:
        raise PrecomputeError(f"give one of images=DIR, dataset=HUB_ID_OR_DIR or prompts=FILE\n{USAGE}")
    prompts = read_prompts(args.prompts) if args.prompts else None
    images = Path(os.path.expanduser(args.images)) if args.images else None
    if images is not None and not images.is_dir():
        raise PrecomputeError(f"images={args.images}: no such folder; give the folder holding the images")
    if args.resolution < 8 or args.batch_size < 1 or args.shard_size < 1:
        raise PrecomputeError("resolution must be >= 8, batch_size and shard_size >= 1")
    length = args.max_sequence_length
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise PrecomputeError(f"max_sequence_length={args.max_sequence_length} must be a positive number of tokens")
    if str(args.workers) != "auto" and (not isinstance(args.workers, int) or args.workers < 0):
        raise PrecomputeError(f"workers={args.workers} must be auto or a number of image-decoding processes (>= 0)")
    if args.text not in ("cached", "online"):
        raise PrecomputeError(
            f"text={args.text!r} must be cached (embeddings in the shards) or online (captions only; the text "
            "encoder runs on each training device)"
        )
    if args.text == "online" and prompts is not None:
        raise PrecomputeError("text=online caches no embeddings, and prompts= caches nothing else: use text=cached")
    if args.missing_caption not in ("skip", "empty"):
        raise PrecomputeError(f"missing_caption={args.missing_caption!r} must be skip or empty")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        text_dtype = (
            (torch.bfloat16 if device.type == "cuda" else torch.float32)
            if args.dtype == "auto"
            else parse_dtype(args.dtype, "dtype")
        )
        embeds_dtype = parse_dtype(args.embeds_dtype, "embeds_dtype")
        latents_dtype = parse_dtype(args.latents_dtype, "latents_dtype")
    except ValueError as err:
        raise PrecomputeError(str(err)) from None
    if args.text_layout not in ("ragged", "padded"):
        raise PrecomputeError(
            f"text_layout={args.text_layout!r} must be ragged (masked embeddings keep their valid tokens only) or "
            "padded (every embedding at max_sequence_length, the version-1 layout)"
        )
    if args.validation_prompts:
        vp = Path(os.path.expanduser(args.validation_prompts))
        if not vp.exists():
            raise PrecomputeError(f"validation_prompts={args.validation_prompts}: no such file (one prompt a line)")
        validation_prompts = [line.strip() for line in vp.read_text().splitlines() if line.strip()]
    else:
        validation_prompts = list(DEFAULT_VALIDATION_PROMPTS)
    chi = "none" if args.complex_human_instruction is None else str(args.complex_human_instruction)
    if chi.lower() not in ("default", "none", "false", "") and not Path(chi).expanduser().is_file():
        raise PrecomputeError(
            f"complex_human_instruction={chi}: use default, none or a file of instruction lines (no such file)"
        )
    options = {"complex_human_instruction": chi}
    return Options(
        prompts, images, device, text_dtype, embeds_dtype, validation_prompts, options, latents_dtype,
        args.text_layout == "ragged", args.text == "online",
    )  # fmt: skip


def plan_inputs(args, options: Options, encoders, source) -> Plan:
    """The shards to encode: prompts (one square bucket, the latent shape from the VAE itself), an image folder or
    a dataset's rows, each bucketed by aspect ratio."""
    sizes = bucket_sizes(args.resolution, encoders.latent_multiple, args.buckets)
    prompts = options.prompts
    if prompts is not None:
        size = bucket_sizes(args.resolution, encoders.latent_multiple, False)[0]
        prompt_shape = list(encoders.encode_images(torch.zeros(1, 3, size[1], size[0])).shape[1:])
        shards = [
            Shard(f"shard_{n:05d}", size, [Item(p, p, size) for p in prompts[start : start + args.shard_size]])
            for n, start in enumerate(range(0, len(prompts), args.shard_size))
        ]
        return Plan(shards, [], len(prompts), None, prompt_shape)
    if options.images is not None:
        shards, skipped, n_files = plan_shards(options.images, sizes, args.shard_size, args.missing_caption)
        if n_files == 0:
            raise PrecomputeError(f"images={args.images}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return Plan(shards, skipped, n_files, options.images.__truediv__, None)
    shards, skipped, n_files = plan_rows(source.rows(), sizes, args.shard_size, args.missing_caption)
    if n_files == 0:
        raise PrecomputeError(f"dataset={args.dataset} (split {args.split}) has no rows")
    return Plan(shards, skipped, n_files, source.open_named, None)


class _Decode:
    """Chunks of items → their images, decoded and resized (what a worker process runs)."""

    def __init__(self, jobs: list, open_image: Callable):
        self.jobs, self.open_image = jobs, open_image

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, n: int):
        items, size = self.jobs[n]
        pixels, ok, skipped = [], [], []
        for k, item in enumerate(items):
            try:
                pixels.append(load_image(self.open_image(item.file), size))
                ok.append(k)
            except Exception as err:  # noqa: BLE001 - any decoder error means an unreadable image
                skipped.append({"file": item.file, "reason": f"unreadable: {type(err).__name__}: {str(err)[:120]}"})
        return (torch.stack(pixels) if pixels else None), ok, skipped


def decoded_chunks(shards: list[Shard], plan: Plan, batch_size: int, workers: int):
    """Per shard (lazily, in order), its chunks of ``batch_size`` items as ``(items, pixels or None, the items
    decoded, the unreadable ones)``. Images are decoded and resized in ``workers`` forked worker processes reading
    ahead of the encoders (0: in this process); a dataset source (a reader with a cursor) decodes in this process."""
    jobs = [(s.items[i : i + batch_size], s.size) for s in shards for i in range(0, len(s.items), batch_size)]
    counts = [len(range(0, len(s.items), batch_size)) for s in shards]
    if plan.open_image is None:  # text only: nothing to decode
        results = iter([(None, list(range(len(items))), []) for items, _ in jobs])
    elif workers > 0 and isinstance(getattr(plan.open_image, "__self__", None), Path) and hasattr(os, "fork"):
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _Decode(jobs, plan.open_image), batch_size=None, num_workers=workers,
            multiprocessing_context="fork", prefetch_factor=2,
        )  # fmt: skip
        results = iter(loader)
    else:
        decode = _Decode(jobs, plan.open_image)
        results = (decode[n] for n in range(len(jobs)))
    start = 0
    for n in counts:
        yield ((jobs[start + k][0], *next(results)) for k in range(n))
        start += n


def encode_shard(
    shard, chunks, encoders, text_length, options, shards_dir: Path, progress, prompt_shape=None, process: int = 0
):
    """Encode one shard's decoded ``chunks`` (:func:`decoded_chunks`; an unreadable image is skipped and
    recorded) and write it atomically: ``<name>.safetensors`` (latents, text embeddings, packed by
    :func:`fewstep.data.shards.pack`) and ``<name>.json`` (what it holds, its size in bytes); returns the JSON."""
    latents, embeds, written, shard_skipped, captions = [], [], [], [], []
    for items, pixels, ok, skipped in chunks:
        shard_skipped.extend(skipped)
        ok_items = [items[k] for k in ok]
        if ok_items:
            if pixels is not None:
                latents.append(encoders.encode_images(pixels))
            if options.online:  # the captions, encoded when the cache is read
                captions.extend(i.caption for i in ok_items)
            else:
                embeds.append(encoders.encode_text([i.caption for i in ok_items], text_length))
            written.extend(i.file for i in ok_items)
        progress.update(len(items))
    info = {
        "planned": [i.file for i in shard.items],
        "size": list(shard.size),
        "files": written,
        "count": len(written),
        "skipped": shard_skipped,
        "max_sequence_length": text_length,
        **storage_layout(options),
        "process": process,  # which process of a multi-process precompute encoded it
    }
    if written:
        tensors = {"latents": torch.cat(latents)} if latents else {}
        if embeds:
            tensors.update({k: torch.cat([e[k] for e in embeds]) for k in embeds[0]})
        info["latent_shape"] = list(tensors["latents"].shape[1:]) if latents else prompt_shape
        file = shards_dir / f"{shard.name}.safetensors"
        metadata = {CAPTIONS: json.dumps(captions)} if options.online else None
        _save_atomic(pack(tensors, options.latents_dtype, options.embeds_dtype, options.ragged), file, metadata)
        info["bytes"] = file.stat().st_size
    _write_json_atomic(info, shards_dir / f"{shard.name}.json")
    return info


def build_manifest(args, options: Options, plan: Plan, done_infos, encoders, text_length, null_prompt, resumed):
    """``manifest.json``: the cache's source, family, shapes, shards and what was skipped, with a summary."""
    skipped = list(plan.skipped)
    for s in plan.shards:
        skipped.extend(done_infos[s.name].get("skipped", []))
    entries = [
        {
            "file": f"shards/{s.name}.safetensors",
            "count": done_infos[s.name]["count"],
            "latent_shape": done_infos[s.name]["latent_shape"],
            "bytes": done_infos[s.name]["bytes"],
            "files": done_infos[s.name]["files"],
        }
        for s in plan.shards
        if done_infos[s.name]["count"] > 0
    ]
    buckets: dict[str, int] = {}
    for e in entries:
        key = "x".join(str(v) for v in e["latent_shape"])
        buckets[key] = buckets.get(key, 0) + e["count"]
    summary = {
        "images_found": plan.n_files,
        "encoded": sum(e["count"] for e in entries),
        "skipped": len(skipped),
        "skipped_unreadable": sum(1 for s in skipped if s["reason"].startswith("unreadable")),
        "skipped_no_caption": sum(1 for s in skipped if s["reason"].startswith("no caption")),
        "shards": len(entries),
        "shards_resumed": resumed,
        "upscaled": sum(1 for s in plan.shards for i in s.items if i.upscale > 1.0),
        "latent_buckets": buckets,
        "bytes_per_sample": round(sum(e["bytes"] for e in entries) / max(1, sum(e["count"] for e in entries))),
    }
    pretrained = args.pretrained
    if Path(os.path.expanduser(pretrained)).exists():
        pretrained = str(Path(os.path.expanduser(pretrained)).resolve())
    if options.images is not None:
        source = {"images": str(options.images.resolve())}
    elif options.prompts is not None:
        source = {"prompts": str(Path(os.path.expanduser(args.prompts)).resolve())}
    else:
        source = {k: args[k] for k in ("dataset", "split", "image_column", "caption_column")}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "pretrained": pretrained,
        "source": source,
        "prompt_only": options.prompts is not None,
        "pipeline_class": encoders.pipeline_class,
        "family": encoders.family.name,
        "null_prompt": null_prompt,
        "encoder_options": options.encoder_options,  # how text=online encodes captions as precompute did
        "resolution": args.resolution,
        "buckets": args.buckets,
        "max_sequence_length": text_length,
        "embeds_dtype": str(options.embeds_dtype).replace("torch.", ""),
        **storage_layout(options),
        "vae": encoders.vae_info,
        "shards": entries,
        "null": "null.safetensors",
        "validation": "validation.safetensors",
        "validation_prompts": options.validation_prompts,
        "summary": summary,
        "skipped": skipped,
    }


def sequence_length(option: int | None, family) -> int | None:
    """The prompt length the cache is encoded at: ``max_sequence_length=N`` when given, else the family's pipeline
    default (SD3 256 T5 tokens, SANA 300, Qwen-Image 512); None where the family's text length is fixed and the
    option does not apply (OpenUni, pipelines without a fewstep family)."""
    if family.max_sequence_length is None:
        return None
    return family.max_sequence_length if option is None else int(option)


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a prompt file (stripped), in order."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise PrecomputeError(f"prompts={path}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise PrecomputeError(f"prompts={path} has no prompts; write one prompt per line")
    return prompts


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_kv(argv, DEFAULTS, USAGE)
    try:
        return precompute(args)
    except (PrecomputeError, PretrainedNotFound) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from fewstep.cli import run_cli

    run_cli(main)
