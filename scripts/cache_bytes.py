"""Bytes per sample of a latent cache, before (version 1: padded embeddings, float32 latents) and after (version 2:
ragged embeddings, bf16 latents), per family at 1024².

Each family's tiny offline pipeline (tests/helpers) writes both caches of the same captioned images; the bytes each
shard's tensors take per sample are measured and checked against the layout's formula at the tiny widths (exactly);
the same formula at the published widths (fewstep.models.architectures) gives the real-size table:

    latents   C · (1024/f)² · (4 fp32 | 2 bf16)
    embedding L · D · 2 (padded, bf16)   |   T · D · 2 + L (ragged: T valid tokens, a bool mask byte per position)
    mask      L · 2 (padded, bf16)       |   (in the ragged line above)
    pooled    D · 2

    python scripts/cache_bytes.py [out=docs/raw/data/cache_bytes.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fewstep.models import architectures  # noqa: E402
from fewstep.precompute import main as precompute  # noqa: E402

MIB = 2**20
# family -> (tiny image side, tiny max_sequence_length (None: fixed), real architecture, real valid tokens, note)
FAMILIES = {
    "qwenimage": (16, 200, "qwen_image", 150, "a 150-token caption"),
    "sd3": (16, 8, "sd35_large", None, "no mask: CLIP + T5 padding is attended to, stored whole"),
    "sana": (32, 8, "sana_1600m_1024px", 150, "complex_human_instruction=none, a 150-token caption"),
    "openuni": (32, None, "openuni_l_512", None, "256 meta-queries, all valid"),
}


def tiny_pipeline(family: str, folder: Path) -> Path:
    if family == "sd3":
        from helpers.tiny_sd3 import save_tiny_sd3_pipeline

        return save_tiny_sd3_pipeline(folder)
    from helpers.tiny_families import save_tiny_pipeline

    return save_tiny_pipeline(family, folder)


def images(folder: Path, side: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n, caption in enumerate(["a cat", "the digit seven written by hand", "a red fox in fresh snow at dawn", "x"]):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"img{n}.png")
        (folder / f"img{n}.txt").write_text(caption)
    return folder


def measured(cache: Path) -> dict:
    """Per sample: the data bytes of each stored tensor, and the cache's tiny dims."""
    manifest = json.loads((cache / "manifest.json").read_text())
    per_key: dict[str, int] = {}
    n = 0
    for entry in manifest["shards"]:
        with safe_open(str(cache / entry["file"]), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                per_key[key] = per_key.get(key, 0) + t.numel() * t.element_size()
        n += entry["count"]
    return {"per_sample": {k: v / n for k, v in per_key.items()}, "samples": n, "manifest": manifest}


def formula(layout: str, latent: tuple, cond: dict, valid: float | None) -> float:
    """Bytes per sample (see the module docstring); ``cond``: key -> per-sample shape; ``valid``: tokens of the
    masked embedding (None: all of them)."""
    c, h, w = latent
    total = c * h * w * (4 if layout == "v1" else 2)
    masked = "prompt_embeds_mask" in cond or "prompt_attention_mask" in cond
    for key, shape in cond.items():
        if key == "prompt_embeds" and masked:
            length, width = shape
            total += length * width * 2 if layout == "v1" else (valid if valid is not None else length) * width * 2
        elif key.endswith("mask"):
            total += shape[0] * (2 if layout == "v1" else 1)
        else:
            size = 1
            for v in shape:
                size *= v
            total += size * 2
    return total


def main(out: str = "docs/raw/data/cache_bytes.json") -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (side, length, arch_name, real_valid, note) in FAMILIES.items():
            root = Path(tmp) / family
            pipe = tiny_pipeline(family, root / "pipe")
            folder = images(root / "images", side)
            common = [f"pretrained={pipe}", f"images={folder}", f"resolution={side}", "progress=false", "device=cpu",
                      "complex_human_instruction=none"]  # fmt: skip
            if length is not None:
                common.append(f"max_sequence_length={length}")
            caches = {}
            for layout, extra in {"v1": ["text_layout=padded", "latents_dtype=float32"], "v2": []}.items():
                precompute([*common, f"out={root / layout}", *extra])
                caches[layout] = measured(root / layout)
            manifest = caches["v2"]["manifest"]
            latent = tuple(manifest["shards"][0]["latent_shape"])
            cond = {k: tuple(v) for k, v in manifest["cond_shapes"].items()}
            valid = None
            if "prompt_embeds.tokens" in caches["v2"]["per_sample"]:
                valid = caches["v2"]["per_sample"]["prompt_embeds.tokens"] / (cond["prompt_embeds"][1] * 2)
            for layout in ("v1", "v2"):
                got = sum(caches[layout]["per_sample"].values())
                want = formula(layout, latent, cond, valid)
                assert abs(got - want) < 1e-6, (family, layout, got, want)  # the formula is the layout
            arch = architectures.load(arch_name)
            real_latent = arch.latent_shape(1024)
            real_cond = dict(arch.condition)
            before = formula("v1", real_latent, real_cond, None)
            after = formula("v2", real_latent, real_cond, real_valid)
            rows.append({
                "family": family, "architecture": arch_name, "note": note,
                "tiny": {"latent": latent, "cond": cond, "valid_tokens_mean": valid,
                         "bytes_v1": sum(caches["v1"]["per_sample"].values()),
                         "bytes_v2": sum(caches["v2"]["per_sample"].values())},
                "real": {"latent": real_latent, "cond": real_cond, "valid_tokens": real_valid},
                "mib_before": before / MIB, "mib_after": after / MIB, "ratio": before / after,
                "tb_per_million_before": before * 1e6 / 1e12, "tb_per_million_after": after * 1e6 / 1e12,
            })  # fmt: skip
    print("| family (1024²) | valid tokens | before (MiB / sample) | after | smaller by | 1 M samples before → after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} ({r['note']}) | {r['real']['valid_tokens'] or 'all'} | {r['mib_before']:.2f} | "
              f"{r['mib_after']:.2f} | {r['ratio']:.2f}× | {r['tb_per_million_before']:.1f} TB → "
              f"{r['tb_per_million_after']:.1f} TB |")  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1, default=list) + "\n")
    return rows


if __name__ == "__main__":
    main(*[a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("out=")])
