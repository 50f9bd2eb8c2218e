"""One shard of the latent cache: how ``fewstep.precompute`` packs its tensors and how ``data=latents`` reads rows.

A shard is one safetensors file of ``N`` rows: ``latents`` (N, C, h, w) (bfloat16 by default, ``latents_dtype=``),
and the text condition of each row. A text embedding that comes with a mask (``prompt_embeds`` with Qwen-Image's
``prompt_embeds_mask`` or SANA's ``prompt_attention_mask``) is stored **ragged** (cache version 2): only its valid
tokens, ``prompt_embeds.tokens`` (T, D) with T the total of the rows' valid tokens, beside the mask itself
(``bool`` (N, L)); a row is read back as the (L, D) zero-padded embedding it was, with its mask. A Qwen-Image
caption of 150 tokens then stores 150 × 3584 values instead of 512 × 3584. Padding that carries values (SD3's T5
and CLIP padding, which the transformer attends to) has no mask and is stored whole.

Version-1 caches (every embedding padded, latents float32) read unchanged. Rows come back float32 either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.errors import FewstepError

TOKENS = ".tokens"  # the suffix of a ragged embedding's valid-token rows
CAPTIONS = "captions"  # a text=online shard's header metadata: its rows' captions (a JSON list)
TEXT_MASKS = {"prompt_embeds": ("prompt_embeds_mask", "prompt_attention_mask")}


class LatentCacheError(FewstepError, ValueError):
    """The cache at ``data.path`` is missing, unfinished or inconsistent; the message names the fix."""


def mask_pairs(keys) -> dict[str, str]:
    """``{embedding key: its mask key}`` for the embeddings among ``keys`` that come with a mask."""
    keys = set(keys)
    pairs = {}
    for embeds, masks in TEXT_MASKS.items():
        found = [m for m in masks if m in keys]
        if (embeds in keys or embeds + TOKENS in keys) and found:
            pairs[embeds] = found[0]
    return pairs


def pack(
    tensors: dict[str, torch.Tensor], latents_dtype: torch.dtype, embeds_dtype: torch.dtype, ragged: bool = True
) -> dict[str, torch.Tensor]:
    """A shard's tensors as stored: latents cast to ``latents_dtype``, embeddings to ``embeds_dtype``, a masked
    embedding's valid tokens only (``ragged``) with its mask as ``bool``."""
    pairs = mask_pairs(tensors) if ragged else {}
    out = {}
    for key, value in tensors.items():
        if key == "latents":
            out[key] = value.to(latents_dtype)
        elif key in pairs:
            out[key + TOKENS] = value[tensors[pairs[key]].bool()].to(embeds_dtype)
        elif key in pairs.values():
            out[key] = value.bool()
        else:
            out[key] = value.to(embeds_dtype)
    return {k: v.contiguous() for k, v in out.items()}


class ShardReader:
    """Rows of one shard file, checked against the manifest on open: ``count`` rows, latents of
    ``latent_shape`` (or none: a prompt-only shard) and embeddings of the same keys and shapes as the rest of
    the cache (``cond_shapes``: key → per-row shape; None for the first shard read, which sets them)."""

    def __init__(self, path: Path, entry: dict, prompt_only: bool, cond_shapes: dict | None, fail, online=False):
        from safetensors import safe_open

        self.entry, self.prompt_only = entry, prompt_only
        self.count = int(entry["count"])
        self.latent_shape = tuple(int(v) for v in entry["latent_shape"])
        try:
            self.handle = safe_open(str(path), framework="pt")
            shapes = {k: tuple(self.handle.get_slice(k).get_shape()) for k in self.handle.keys()}
        except Exception as err:  # noqa: BLE001 - safetensors raises several types on damaged files
            raise fail(
                f"{entry['file']} is unreadable ({type(err).__name__}); delete it and its .json and re-run "
                "precompute (it resumes)"
            ) from None
        self.pairs = {k: m for k, m in mask_pairs(shapes).items() if k + TOKENS in shapes}
        self._masks: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, list[int]] = {}
        per_row = {}
        for key, shape in shapes.items():
            if key.endswith(TOKENS):
                embeds = key[: -len(TOKENS)]
                per_row[embeds] = (shapes[self.pairs[embeds]][1], shape[1]) if embeds in self.pairs else None
            else:
                per_row[key] = shape[1:]
        rows = {k: s[0] for k, s in shapes.items() if not k.endswith(TOKENS)}
        if prompt_only:  # embeddings only; the latent shape is the manifest's record
            if "latents" in shapes or len(self.latent_shape) != 3:
                raise fail(f"{entry['file']} is not a prompt-only shard; re-run precompute into an empty dir")
            per_row["latents"], rows["latents"] = self.latent_shape, self.count
        if "latents" not in per_row or len(per_row["latents"]) != 3:
            raise fail(f"{entry['file']} has no (N, C, h, w) latents; re-run precompute into an empty dir")
        masks_fit = [k for k in self.pairs if rows.get(self.pairs[k]) == self.count]
        tokens_ok = all(shapes[k + TOKENS][0] == int(self._mask(k).sum()) for k in masks_fit)
        if any(n != self.count for n in rows.values()) or per_row["latents"] != self.latent_shape or not tokens_ok:
            raise fail(
                f"{entry['file']} does not match manifest.json (rows or latent shape); delete it and its .json "
                "and re-run precompute (it resumes)"
            )
        cond = {k: tuple(s) for k, s in per_row.items() if k != "latents"}
        self.captions: list[str] | None = None
        if online:  # no embeddings: the rows' captions, encoded by the reader's text encoder
            self.captions = json.loads((self.handle.metadata() or {}).get(CAPTIONS, "null"))
            if cond or not isinstance(self.captions, list) or len(self.captions) != self.count:
                raise fail(
                    f"{entry['file']} is not a text=online shard of {self.count} captions; delete it and its .json "
                    "and re-run precompute (it resumes)"
                )
            cond, cond_shapes = {}, None
        if cond_shapes is not None and cond != {k: tuple(v) for k, v in cond_shapes.items()}:
            raise fail(
                f"{entry['file']} has embeddings of shapes {cond} unlike the rest of the cache ({cond_shapes}): "
                "the cache mixes precompute settings; re-run precompute into an empty out dir"
            )
        self.cond_shapes = cond

    def _mask(self, embeds: str) -> torch.Tensor:
        if embeds not in self._masks:
            self._masks[embeds] = self.handle.get_tensor(self.pairs[embeds]).bool()
        return self._masks[embeds]

    def _offset(self, embeds: str, row: int) -> tuple[int, int]:
        if embeds not in self._offsets:
            self._offsets[embeds] = [0, *self._mask(embeds).sum(1).cumsum(0).tolist()]
        offsets = self._offsets[embeds]
        return offsets[row], offsets[row + 1]

    def latents(self, row: int) -> torch.Tensor:
        """Row ``row``'s latents, (1, C, h, w) float32 (zeros of the recorded shape in a prompt-only shard)."""
        if self.prompt_only:
            return torch.zeros(1, *self.latent_shape)
        return self.handle.get_slice("latents")[row : row + 1].float()

    def cond(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row``'s condition, each (1, ...) float32, masked embeddings zero-padded to their full length."""
        out = {k: torch.empty(1, *s) for k, s in self.cond_shapes.items()}
        self.fill_cond(row, out, 0)
        return out

    def caption(self, row: int) -> str:
        """Row ``row``'s caption (a ``text=online`` shard)."""
        return self.captions[row]

    def fill(self, row: int, x: torch.Tensor, cond: dict[str, torch.Tensor], i: int) -> None:
        """Write row ``row`` into row ``i`` of a batch's float32 tensors (latents ``x``, ``cond``), converting as it
        copies (one pass over the bytes: no per-row tensors to concatenate)."""
        if self.prompt_only:
            x[i].zero_()
        else:
            x[i].copy_(self.handle.get_slice("latents")[row : row + 1][0])
        self.fill_cond(row, cond, i)

    def fill_cond(self, row: int, cond: dict[str, torch.Tensor], i: int) -> None:
        for key, out in cond.items():
            if key in self.pairs:
                start, end = self._offset(key, row)
                tokens = self.handle.get_slice(key + TOKENS)[start:end]
                mask = self._mask(key)[row]
                n = end - start
                if bool(mask[:n].all()):  # the valid tokens lead (every family's layout): one copy, zero the rest
                    out[i, :n].copy_(tokens)
                    out[i, n:].zero_()
                else:
                    out[i].zero_()
                    out[i, mask] = tokens.to(out.dtype)
            elif key in self._mask_keys:
                out[i].copy_(self._mask(self._mask_keys[key])[row])
            else:
                out[i].copy_(self.handle.get_slice(key)[row : row + 1][0])

    @property
    def _mask_keys(self) -> dict[str, str]:
        return {m: e for e, m in self.pairs.items()}
