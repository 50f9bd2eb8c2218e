"""``data=latents``: a latent + text-embedding cache written by ``python -m fewstep.precompute``.

Shards are read lazily (memory-mapped safetensors), so a cache larger than RAM trains fine. Batches hold
one latent shape only (resolution buckets). Epoch ``e`` shuffles with a permutation drawn from
``seed + e``: the items of each bucket, in permuted order, form global batches (the remainder is dropped),
and the batches are permuted again; ``position`` counts global batches already taken, so a checkpoint
resumes the exact data order (as :class:`~fewstep.data.memory.InMemoryData`). Conditions are dicts
(``prompt_embeds``, ``pooled_prompt_embeds``), the null condition is the cached empty-prompt embedding and
grids use the cached validation prompts. ``decode`` turns latents into images with the pipeline's VAE.

A prompt-only cache (``precompute prompts=FILE``, ``"prompt_only": true`` in the manifest) has shards of
embeddings only: batches carry zero latents of the recorded shape, for ``objective.image_free=true``, which
takes only their shape (``fewstep.config.validate`` refuses such a cache for any other objective).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from fewstep.data.base import Batch
from fewstep.data.shards import LatentCacheError, ShardReader
from fewstep.models.family import family_for_pipeline, family_named, load_error, resolve_pretrained

RUN_PRECOMPUTE = "python -m fewstep.precompute pretrained=... images=... out=DIR"


def read_manifest(path: str) -> tuple[Path, dict]:
    """The cache folder and its ``manifest.json`` (read before anything else of the cache; cheap)."""
    if not path:
        raise LatentCacheError(f"data.path is not set: write a cache with `{RUN_PRECOMPUTE}`, then data.path=DIR")
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise LatentCacheError(f"data.path={path}: no such folder; write a cache with `{RUN_PRECOMPUTE}`")
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise LatentCacheError(
            f"data.path={path} has no manifest.json: not a fewstep latent cache, or its precompute did not "
            "finish (re-run the same precompute command; it resumes)"
        )
    try:
        return root, json.loads(manifest_path.read_text())
    except ValueError as err:
        raise LatentCacheError(f"data.path={path}: manifest.json is corrupt ({err}); re-run precompute") from None


def cached_latent_shapes(manifest: dict) -> list[tuple[int, ...]]:
    """The distinct ``(C, h, w)`` latent shapes of a cache's non-empty shards, as the manifest records them."""
    shapes = []
    for shard in manifest.get("shards", []):
        shape = tuple(int(v) for v in shard.get("latent_shape", ()))
        if shard.get("count", 0) > 0 and shape not in shapes:
            shapes.append(shape)
    return shapes


class LatentData:
    """The cached latents at ``path`` (see the module docstring); ``shape`` is the most common latent shape."""

    num_classes = 0

    def __init__(
        self, path: str = "", batch_size: int = 8, vae: str = "", decode_device: str | None = None, prefetch: int = 2
    ):
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if prefetch < 0:
            raise ValueError(f"data.prefetch={prefetch} must be >= 0 (batches read ahead; 0: none)")
        self.prefetch = int(prefetch)
        root, manifest = read_manifest(path)
        self.root, self.manifest = root, manifest
        self.batch_size = int(batch_size)
        self.vae_source = vae or manifest.get("pretrained", "")
        self.decode_device = decode_device
        self._vae = None
        self._readers: dict[int, ShardReader] = {}
        self._null_rows: dict[int, dict[str, torch.Tensor]] = {}
        self.prompt_only = bool(manifest.get("prompt_only", False))
        self.shards = [s for s in manifest.get("shards", []) if s.get("count", 0) > 0]
        if not self.shards:
            n_skipped = manifest.get("summary", {}).get("skipped", 0)
            raise LatentCacheError(
                f"data.path={path}: the cache holds no samples ({n_skipped} images skipped, see manifest.json); "
                "add readable, captioned images and re-run precompute"
            )
        self._check_files()
        self.text_online = manifest.get("text") == "online"
        self._text_encoder = None
        recorded = manifest.get("cond_shapes")
        self.cond_shapes = {k: tuple(v) for k, v in recorded.items()} if recorded else dict(self._reader(0).cond_shapes)
        self.cond_keys = sorted(self.cond_shapes)
        self.null = self._load_small(manifest.get("null", "null.safetensors"), "null", self.cond_shapes)
        self.validation = self._load_small(
            manifest.get("validation", "validation.safetensors"), "validation", self.cond_shapes
        )
        self.validation_prompts = list(manifest.get("validation_prompts", []))

        shard_of, row_of, bucket_of, shapes = [], [], [], []
        for i, shard in enumerate(self.shards):
            shape = tuple(int(v) for v in shard["latent_shape"])
            if shape not in shapes:
                shapes.append(shape)
            shard_of += [i] * shard["count"]
            row_of += list(range(shard["count"]))
            bucket_of += [shapes.index(shape)] * shard["count"]
        self.bucket_shapes = shapes
        self.shard_of = torch.tensor(shard_of)
        self.row_of = torch.tensor(row_of)
        self.bucket_of = torch.tensor(bucket_of)
        counts = Counter(bucket_of)
        self.shape = shapes[max(counts, key=lambda b: (counts[b], -b))]
        self.scaling_factor = float(manifest.get("vae", {}).get("scaling_factor", 1.0))
        self.shift_factor = float(manifest.get("vae", {}).get("shift_factor", 0.0) or 0.0)
        self._plan_key, self._plan = None, None

    # -- checks -------------------------------------------------------------------------------

    def _fail(self, message: str) -> LatentCacheError:
        return LatentCacheError(f"data.path={self.root}: {message}")

    def _check_files(self) -> None:
        """Every shard file is there, of the size precompute recorded (version 2): one listing of the shards
        folder and a stat per shard; the files' headers are checked when a shard is first read
        (:class:`~fewstep.data.shards.ShardReader`), so startup does not open thousands of files."""
        folders: dict[Path, dict[str, os.DirEntry]] = {}
        for shard in self.shards:
            file = self.root / shard["file"]
            if file.parent not in folders:
                try:
                    folders[file.parent] = {e.name: e for e in os.scandir(file.parent)}
                except OSError:
                    folders[file.parent] = {}
            entry = folders[file.parent].get(file.name)
            if entry is None:
                raise self._fail(f"{shard['file']} is missing; re-run precompute with out={self.root} (it resumes)")
            expected = shard.get("bytes")
            if expected is not None and entry.stat().st_size != int(expected):
                raise self._fail(
                    f"{shard['file']} is {entry.stat().st_size} bytes where manifest.json records {expected}: changed "
                    "or truncated since precompute wrote it; delete it and its .json and re-run precompute (it resumes)"
                )

    def _reader(self, i: int) -> ShardReader:
        if i not in self._readers:
            shapes = getattr(self, "cond_shapes", None)
            self._readers[i] = ShardReader(
                self.root / self.shards[i]["file"], self.shards[i], self.prompt_only, shapes, self._fail,
                online=getattr(self, "text_online", False),
            )  # fmt: skip
        return self._readers[i]

    def _load_small(self, name: str, what: str, cond_shapes: dict) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        file = self.root / name
        if not file.exists():
            raise self._fail(f"{name} ({what} prompt embeddings) is missing; re-run precompute with out={self.root}")
        tensors = {k: v.float() for k, v in load_file(str(file)).items()}
        if sorted(tensors) != self.cond_keys or any(tuple(tensors[k].shape[1:]) != cond_shapes[k] for k in tensors):
            raise self._fail(
                f"{name} does not match the shards' embeddings ({ {k: tuple(v.shape) for k, v in tensors.items()} } "
                f"vs {cond_shapes}); re-run precompute into an empty out dir"
            )
        return tensors

    # -- the data-module interface ------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.shard_of.numel())

    def null_cond(self, n: int) -> dict[str, torch.Tensor]:
        """The cached empty-prompt embeddings, ``n`` rows (one tensor per ``n``, reused by every batch: a
        batch's null condition is read, never written)."""
        if n not in self._null_rows:
            self._null_rows[n] = {k: v[:1].expand(n, *v.shape[1:]).contiguous() for k, v in self.null.items()}
        return self._null_rows[n]

    def grid_conds(self, n: int) -> dict[str, torch.Tensor]:
        """The cached validation prompts, cycled to ``n`` rows."""
        first = next(iter(self.validation.values()))
        idx = torch.arange(n) % first.shape[0]
        return {k: v[idx] for k, v in self.validation.items()}

    def read(self, items: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents (float32) and condition of dataset items (global indices), in order; all items share one
        latent shape (a bucket's batch)."""
        rows = items.tolist()
        if not rows:
            return torch.zeros(0, *self.shape), {k: torch.zeros(0, *s) for k, s in self.cond_shapes.items()}
        first = self._reader(int(self.shard_of[rows[0]]))
        x = torch.empty(len(rows), *first.latent_shape)
        if self.text_online:
            captions = []
            for i, item in enumerate(rows):
                reader, row = self._reader(int(self.shard_of[item])), int(self.row_of[item])
                reader.fill(row, x, {}, i)
                captions.append(reader.caption(row))
            return x, self.text_encoder().encode_text(captions, self.manifest.get("max_sequence_length"))
        cond = {k: torch.empty(len(rows), *s) for k, s in self.cond_shapes.items()}
        for i, item in enumerate(rows):
            self._reader(int(self.shard_of[item])).fill(int(self.row_of[item]), x, cond, i)
        return x, cond

    def text_encoder(self):
        """The cache's pipeline's text encoders on this process's device (``text=online`` caches): bf16 on a GPU,
        float32 on the CPU, no gradients; loaded on first use, with the options precompute encoded with."""
        if self._text_encoder is None:
            from accelerate import PartialState

            from fewstep.precompute import Encoders

            device = PartialState().device
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            options = self.manifest.get("encoder_options", {})
            self._text_encoder = Encoders(self.vae_source, device, dtype, options)
        return self._text_encoder

    def _epoch_batches(self, seed: int, epoch: int, global_batch: int) -> list[torch.Tensor]:
        key = (seed, epoch, global_batch)
        if self._plan_key != key:
            gen = torch.Generator().manual_seed(seed + epoch)
            perm = torch.randperm(len(self), generator=gen)
            batches = []
            for b in range(len(self.bucket_shapes)):
                members = perm[self.bucket_of[perm] == b]
                full = members.numel() // global_batch * global_batch
                if full:  # a bucket smaller than one batch adds none (split() of nothing gives one empty batch)
                    batches += list(members[:full].split(global_batch))
            order = torch.randperm(len(batches), generator=gen).tolist()
            self._plan_key, self._plan = key, [batches[i] for i in order]
        return self._plan

    def batches(self, seed: int, position: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        global_batch = self.batch_size * world
        sizes = Counter(self.bucket_of.tolist())
        per_epoch = sum(n // global_batch for n in sizes.values())
        if per_epoch == 0:
            biggest = max(sizes.values())
            raise LatentCacheError(
                f"data.batch_size={self.batch_size} x {world} processes exceeds the largest resolution bucket "
                f"({biggest} of {len(self)} cached samples); lower data.batch_size or cache more images"
            )
        while True:
            epoch, index = divmod(position, per_epoch)
            rows = self._epoch_batches(seed, epoch, global_batch)[index][rank * self.batch_size :][: self.batch_size]
            position += 1
            x, cond = self.read(rows)
            yield Batch(x, cond, self.null_cond(len(rows)))

    # -- decoding -------------------------------------------------------------------------------

    def vae(self, device: torch.device | str | None = None):
        """The pipeline's VAE (loaded on first use from ``data.vae`` or the cache's ``pretrained``; its class
        from its ``config.json``)."""
        if self._vae is None:
            import diffusers

            source, sub = resolve_pretrained(self.vae_source, "vae", key="data.vae (or the cache's pretrained)")
            try:
                config = diffusers.AutoencoderKL.load_config(source, subfolder=sub)
                cls = getattr(diffusers, str(config.get("_class_name", "AutoencoderKL")), diffusers.AutoencoderKL)
                self._vae = cls.from_pretrained(source, subfolder=sub).eval().requires_grad_(False)
            except (OSError, ValueError) as err:
                raise load_error("data.vae", self.vae_source, err) from err
        if device is not None:
            self._vae.to(device)
        return self._vae

    @property
    def family(self):
        """The model family the cache was made for (:class:`fewstep.models.family.Family`)."""

        name = self.manifest.get("family")
        return family_named(name) if name else family_for_pipeline(str(self.manifest.get("pipeline_class", "")))

    @torch.no_grad()
    def decode(self, x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Images in [-1, 1] (float32, on ``x``'s device) from cached-space latents, with the family's VAE
        normalisation undone (SD3: ``x / scaling_factor + shift_factor``)."""
        device = torch.device(self.decode_device) if self.decode_device else x.device
        vae = self.vae(device)
        family = self.family
        dtype = next(vae.parameters()).dtype
        out = []
        for part in x.split(chunk):
            images = family.decode_latents(vae, part.to(device=device, dtype=dtype))
            out.append(images.float().clamp(-1, 1).to(x.device))
        return torch.cat(out)
