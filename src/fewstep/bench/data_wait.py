"""``python -m fewstep.bench.data_wait [samples=10000] [step_ms=100] [steps=200] [batch_size=8] [out=FILE]``

How long a training step waits for its batch from a ``data=latents`` cache on disk, reading in the step
(``data.prefetch=0``) vs read ahead in the background (``data.prefetch=2``), at a simulated step time (the step is
a sleep of ``step_ms``, so the benchmark measures the reader alone). The cache (``cache=DIR``, written there once
when missing) holds ``samples`` rows of a version-2 cache with Qwen-Image's text width and ``tokens`` valid tokens a
caption (ragged) and ``latent_side``² × 16 bf16 latents; before each variant every shard is dropped from the page
cache (``posix_fadvise(DONTNEED)``; no root needed), so each read is a read from the disk, as a first epoch over a
cache larger than RAM is. Variants alternate ``rounds`` times; the table gives the mean wait per step and its share
of the step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fewstep.cli import parse_kv

DEFAULTS = {
    "samples": 10000,
    "shard_size": 256,
    "tokens": 150,  # valid tokens a caption
    "max_tokens": 512,  # the padded length (Qwen-Image's max_sequence_length)
    "width": 3584,  # Qwen-Image's text width (Qwen2.5-VL-7B hidden size)
    "latent_side": 32,  # latents 16 × side × side (32: 256² images; 128: 1024²)
    "step_ms": 100.0,
    "steps": 200,
    "batch_size": 8,
    "rounds": 2,
    "cache": "bench_out/data_wait_cache",
    "out": "",
}
USAGE = "usage: python -m fewstep.bench.data_wait " + " ".join(f"[{k}={v}]" for k, v in DEFAULTS.items())


def write_cache(root: Path, samples: int, shard_size: int, tokens: int, max_tokens: int, width: int, side: int) -> None:
    """A version-2 cache of random rows (what precompute writes for Qwen-Image, at these sizes)."""
    from safetensors.torch import save_file

    from fewstep.data.shards import TOKENS

    (root / "shards").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    entries = []
    for n, start in enumerate(range(0, samples, shard_size)):
        count = min(shard_size, samples - start)
        mask = torch.zeros(count, max_tokens, dtype=torch.bool)
        mask[:, :tokens] = True
        tensors = {  # as fewstep.data.shards.pack stores them (the padded embeddings never built: GBs a shard)
            "latents": torch.randn(count, 16, side, side, generator=gen).bfloat16(),
            "prompt_embeds" + TOKENS: torch.randn(count * tokens, width, generator=gen).bfloat16(),
            "prompt_embeds_mask": mask,
        }
        file = root / "shards" / f"shard_{n:05d}.safetensors"
        save_file(tensors, str(file))
        entries.append({"file": f"shards/{file.name}", "count": count, "latent_shape": [16, side, side],
                        "bytes": file.stat().st_size})  # fmt: skip
        print(f"\rwriting the cache: {start + count}/{samples} samples", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    small = {"prompt_embeds": torch.zeros(1, max_tokens, width), "prompt_embeds_mask": torch.ones(1, max_tokens)}
    save_file(small, str(root / "null.safetensors"))
    save_file(small, str(root / "validation.safetensors"))
    manifest = {
        "format": "fewstep-latents", "version": 2, "family": "qwenimage", "pretrained": "", "shards": entries,
        "cond_shapes": {"prompt_embeds": [max_tokens, width], "prompt_embeds_mask": [max_tokens]},
        "text_layout": "ragged", "latents_dtype": "bfloat16", "validation_prompts": ["a"],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))


def drop_page_cache(root: Path) -> None:
    """Ask the kernel to forget the cache's pages (clean pages of files this user can open)."""
    for file in sorted((root / "shards").glob("*.safetensors")):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(root: Path, prefetch: int, steps: int, step_s: float, batch_size: int) -> list[float]:
    """Seconds each step waited for its batch."""
    from fewstep.data.latents import LatentData
    from fewstep.data.prefetch import Prefetcher

    data = LatentData(str(root), batch_size=batch_size, prefetch=prefetch)
    stream = data.batches(seed=0)
    fetcher = Prefetcher([stream], prefetch) if prefetch else None
    if fetcher is not None:
        stream = fetcher.streams_out[0]
    waits = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            next(stream)
            waits.append(time.perf_counter() - t0)
            time.sleep(step_s)  # the step
    finally:
        if fetcher is not None:
            fetcher.close()
    return waits


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_kv(argv, DEFAULTS, USAGE)
    root = Path(os.path.expanduser(args.cache))
    if not (root / "manifest.json").exists():
        write_cache(root, args.samples, args.shard_size, args.tokens, args.max_tokens, args.width, args.latent_side)
    manifest = json.loads((root / "manifest.json").read_text())
    n = sum(e["count"] for e in manifest["shards"])
    size = sum(e["bytes"] for e in manifest["shards"])
    step_s = args.step_ms / 1000
    results: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(args.rounds):
        for prefetch in (0, 2):
            drop_page_cache(root)
            results[prefetch] += measure(root, prefetch, args.steps, step_s, args.batch_size)
    rows = []
    for prefetch, waits in results.items():
        mean = statistics.fmean(waits)
        rows.append({
            "prefetch": prefetch, "steps": len(waits), "wait_ms_mean": 1000 * mean,
            "wait_ms_median": 1000 * statistics.median(waits), "wait_ms_max": 1000 * max(waits),
            "wait_share_of_step": mean / step_s,
        })  # fmt: skip
    print(
        f"cache: {n} samples, {size / 2**30:.2f} GiB ({size / n / 2**20:.3f} MiB a sample) in {root}; batch "
        f"{args.batch_size}, simulated step {args.step_ms:g} ms, page cache dropped before each variant"
    )
    print("| data.prefetch | steps | wait / step (mean) | median | max | wait / step time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prefetch']} | {r['steps']} | {r['wait_ms_mean']:.2f} ms | {r['wait_ms_median']:.2f} ms | "
              f"{r['wait_ms_max']:.1f} ms | {100 * r['wait_share_of_step']:.1f} % |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": dict(args), "samples": n, "bytes": size, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    from fewstep.cli import run_cli

    run_cli(main)
