"""Step time and peak memory of TwinFlow vs flow matching on a small SD3, full and LoRA (docs/sd35.md).

    .venv/bin/python tests/helpers/measure_memory.py [--out DIR] [--steps 5] [--batch 8]

Builds a small offline SD3 pipeline (4 joint blocks, width 256, patch 2, 32×32 latents) and a latent cache
of random images, then runs each configuration in a fresh subprocess: build the components exactly as
``fewstep.training.loop`` does, one untimed first step, then ``--steps`` timed steps (1 thread unless
MEASURE_THREADS; batch 8, LoRA rank 16). Peak memory is the peak over all training steps once the
components are built: on CUDA ``max_memory_allocated`` (after
``reset_peak_memory_stats``) minus the memory allocated before the first step; on CPU the peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS before the first step, i.e. optimizer
state, EMA shadow, activations, teacher passes and temporaries. The absolute peak is reported too.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=8,
    caption_projection_dim=256,
    joint_attention_dim=32,
    pooled_projection_dim=64,
)
CONFIGS = [
    ("sd35", "flow_matching"),
    ("sd35", "twinflow"),
    ("sd35_lora", "flow_matching"),
    ("sd35_lora", "twinflow"),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def prepare(root: Path, layers: int = 4, n_images: int = 32, heads: int = 8, resolution: int = 32) -> tuple[Path, Path]:
    """A small SD3 pipeline (``layers`` joint blocks of ``heads`` × 32 channels, see TRANSFORMER) saved under
    ``root`` and a latent cache of ``n_images`` random ``resolution``² images with captions."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(TESTS))
    from fewstep.precompute import main as precompute

    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    pipe = root / f"pipe_{layers}_layers_{heads}_heads_{resolution}px"
    if not (pipe / "model_index.json").exists():
        kwargs = {**TRANSFORMER, "num_layers": layers, "num_attention_heads": heads, "sample_size": resolution}
        kwargs["caption_projection_dim"] = heads * TRANSFORMER["attention_head_dim"]
        save_tiny_sd3_pipeline(pipe, transformer_kwargs=kwargs)
    images = root / f"images_{resolution}px"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"random picture number {i}")
    cache = root / f"cache_{pipe.name}"
    precompute(
        [f"pretrained={pipe}", f"images={images}", f"out={cache}", f"resolution={resolution}", "max_sequence_length=16"]
        + ["embeds_dtype=float32", "progress=false"]
    )
    return pipe, cache


def measure(
    pipe: str, cache: str, model: str, objective: str, steps: int, batch: int, chunk: int = 0, extra=()
) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    sys.path.insert(0, str(TESTS))
    from fewstep.config.validate import validate
    from fewstep.training.trainables import build_components

    from helpers import FAST, compose

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("MEASURE_THREADS", "1")))
    cfg = validate(
        compose(
            [f"objective={objective}", f"model={model}", f"model.pretrained={pipe}", "data=latents"]
            + [f"data.path={cache}", f"data.batch_size={batch}", "model.lora.rank=16", "model.lora.alpha=16", *FAST]
            + [f"model.no_grad_chunk={chunk}", *extra]
        )
    )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    data, obj, student, teacher, _ = build_components(cfg, device=device)
    teacher.bind(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = data.batches(0)

    def step(k: int) -> dict:
        teacher.update(student, k)
        loss, logs = obj.loss(student, teacher, next(batches).to(device), k)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logs

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step(0)  # first step (optimizer state, EMA shadow): inside the peak, outside the timing
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    logs = {}
    for k in range(1, steps + 1):
        logs = step(k)
    if cuda:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    return {
        "overrides": list(extra),
        "no_grad_chunk": chunk,
        "model": model,
        "objective": objective,
        "device": str(device),
        "batch": batch,
        "params": sum(p.numel() for p in student.parameters()),
        "trainable": sum(p.numel() for p in params),
        "step_s": elapsed,
        "peak_increase_mb": (peak - base) / 2**20,
        "peak_total_mb": peak / 2**20,
        "nfe_per_step": float(logs.get("nfe/per_step", float("nan"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/fewstep_measure")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the table shows medians")
    parser.add_argument("--layers", type=int, default=4, help="joint blocks of the small SD3")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (32 channels each) of the small SD3")
    parser.add_argument("--resolution", type=int, default=32, help="image (= latent) side of the cache")
    parser.add_argument("--images", type=int, default=32, help="random images in the latent cache")
    parser.add_argument(
        "--prepare-only", action="store_true", help="build the pipeline and cache, print their paths as JSON, exit"
    )
    parser.add_argument("--models", default="sd35,sd35_lora", help="comma-separated model configs to measure")
    parser.add_argument("--no-grad-chunk", type=int, default=0, help="model.no_grad_chunk for the runs")
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="CPU: glibc MALLOC_MMAP_THRESHOLD_ in bytes (e.g. 131072) so freed tensors leave the RSS at once and "
        "the peak RSS tracks live memory; slows allocation, so do not read step times from such a run",
    )
    parser.add_argument("--one", nargs=4, metavar=("PIPE", "CACHE", "MODEL", "OBJECTIVE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        row = measure(*args.one, steps=args.steps, batch=args.batch, chunk=args.no_grad_chunk, extra=args.set)
        print(json.dumps(row))
        return
    root = Path(args.out)
    pipe, cache = prepare(root, args.layers, n_images=args.images, heads=args.heads, resolution=args.resolution)
    if args.prepare_only:
        print(json.dumps({"pretrained": str(pipe), "cache": str(cache)}))
        return
    models = args.models.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):
        for model, objective in [c for c in CONFIGS if c[0] in models]:
            cmd = [sys.executable, __file__, "--one", str(pipe), str(cache), model, objective]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--no-grad-chunk", str(args.no_grad_chunk)]
            cmd += [f"--set={o}" for o in args.set]
            env = dict(os.environ)
            if args.mmap_threshold > 0:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault((model, objective), []).append(row)
            print(json.dumps(row), flush=True)
    rows = []
    for reps in runs.values():
        row = dict(reps[0])
        for metric in ("step_s", "peak_increase_mb", "peak_total_mb", "nfe_per_step"):
            row[metric] = statistics.median(r[metric] for r in reps)
        row["runs"] = len(reps)
        rows.append(row)
    by = {(r["model"], r["objective"]): r for r in rows}
    print(f"\nmedians of {args.repeat} run(s) per configuration, device {rows[0]['device']}")
    print(
        "| model | objective | trainable / params | NFE rows per step | step time (s) | peak increase (MiB) "
        "| peak (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['objective']} | {r['trainable']:,} / {r['params']:,} | {r['nfe_per_step']:.2f} | "
            f"{r['step_s']:.3f} | {r['peak_increase_mb']:.1f} | {r['peak_total_mb']:.1f} |"
        )
    for model in models:
        tf, fm = by[(model, "twinflow")], by[(model, "flow_matching")]
        per_run = [
            a["peak_increase_mb"] / b["peak_increase_mb"]
            for a, b in zip(runs[(model, "twinflow")], runs[(model, "flow_matching")])
        ]
        print(f"{model}: per-run peak-increase ratios {', '.join(f'{v:.2f}' for v in per_run)}")
        print(
            f"{model}: twinflow / flow_matching  step time x{tf['step_s'] / fm['step_s']:.2f}, "
            f"peak increase x{tf['peak_increase_mb'] / max(fm['peak_increase_mb'], 1e-9):.2f}, "
            f"peak total x{tf['peak_total_mb'] / fm['peak_total_mb']:.2f}"
        )
    (root / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
