"""``python -m fewstep.demo [out=demo_out] [threads=0] ...``: the SD3 digits demo, stage by stage.

Stages (each skipped when its output exists, so an interrupted demo resumes; an interrupted training run resumes
from its last checkpoint):

1. ``images/``: the training digits as a captioned image folder (:mod:`fewstep.demo.images`);
2. ``base/``: the tiny ``StableDiffusion3Pipeline``, its VAE trained on ``images/`` (:mod:`fewstep.demo.pipeline`);
3. ``cache/``: ``python -m fewstep.precompute pretrained=base images=images out=cache``;
4. ``teacher_run/`` → ``teacher/``: ``python -m fewstep objective=flow_matching model=sd35 data=latents ...``, then
   ``python -m fewstep.export`` and the folder re-saved with ``FlowMatchEulerDiscreteScheduler``: an ordinary
   SD3 pipeline;
5. ``twinflow_run/`` → ``twinflow/``: ``python -m fewstep experiment=table6/sd35_full model.pretrained=teacher``
   scaled down (steps, batch, learning rate, float32 on the CPU; ``enhanced_ratio=0``: no guidance distilled in),
   then ``python -m fewstep.export``;
6. ``results.json``, ``results.md``, ``comparison.png``: the teacher with its own scheduler at ``teacher_steps``
   and 2 and 1 steps, TwinFlow with ``TwinFlowScheduler`` at 1, 2 and 4 steps, all through
   ``StableDiffusion3Pipeline`` at guidance 0, scored by :mod:`fewstep.demo.score`; and the picture: one row per
   prompt, columns teacher-50 / teacher-2 / TwinFlow-1 / TwinFlow-2.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fewstep.cli import parse_kv
from fewstep.errors import FewstepError

USAGE = (
    "usage: python -m fewstep.demo [out=demo_out] [threads=0] [vae_steps=400] [teacher_train_steps=2000] "
    "[twinflow_steps=600] [teacher_lr=1e-3] [twinflow_lr=3e-4] [enhanced_ratio=0.0] [batch_size=64] [eval_n=1000] "
    "[teacher_lr_schedule=cosine] [teacher_decay=0.99] [teacher_steps=50] [twinflow_nfe=[1,2,4]] [lora=false] "
    "[progress=true] [picture=true]"
)
DEFAULTS = {
    "out": "demo_out",
    "threads": 0,  # torch threads, here and in the training runs (trainer.torch_threads; 0: fewstep chooses)
    "vae_steps": 400,
    "teacher_train_steps": 2000,
    "teacher_lr": 1e-3,
    "teacher_lr_schedule": "cosine",
    "teacher_decay": 0.99,  # the teacher run's EMA (the weights exported)
    "teacher_cond_dropout": 0.1,  # the teacher learns the empty prompt too: TwinFlow's enhanced target needs it
    "twinflow_steps": 600,
    "twinflow_lr": 3e-4,
    # table6's 0.8 distils the teacher at guidance 1.8 (sharp, one image per prompt: docs/benchmarks.md); 0 matches
    # the teacher at guidance 0, the quality this demo scores against
    "enhanced_ratio": 0.0,
    "batch_size": 64,
    "eval_n": 1000,
    "teacher_steps": 50,
    "twinflow_nfe": [1, 2, 4],
    "lora": False,
    "progress": True,
    "picture": True,
    "seed": 0,
}
MAX_SEQUENCE_LENGTH = 8  # T5 tokens (Sizes.max_sequence_length)


class DemoError(FewstepError):
    """A demo stage failed; the message names the stage and the command to rerun."""


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_module(module: str, args: list[str], stage: str) -> None:
    """``python -m module args`` in a subprocess, its output shown as it comes."""
    cmd = [sys.executable, "-m", module, *args]
    say(f"{stage}: {' '.join(cmd[1:])}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise DemoError(f"stage {stage} failed (exit {proc.returncode}): {' '.join(cmd)}")


def common_train_args(a, run_dir: Path) -> list[str]:
    big = 10**9
    return [
        f"hydra.run.dir={run_dir}",
        f"trainer.torch_threads={a.threads}",
        f"trainer.seed={a.seed}",
        "trainer.log_every=100",
        f"trainer.sample_every={big}",
        f"trainer.checkpoint_every={max(100, int(a.teacher_train_steps) // 4)}",
        "trainer.final_nfe=[2]",
        "trainer.baseline_steps=0",
        "trainer.grid_size=20",
        "trainer.mixed_precision=no",
        "model.gradient_checkpointing=false",
        f"data.batch_size={a.batch_size}",
        f"logger.progress={str(bool(a.progress)).lower()}",
    ]


def train_teacher(a, out: Path) -> Path:
    run_dir, cache, base = out / "teacher_run", out / "cache", out / "base"
    if not (run_dir / "summary.json").exists():
        run_module(
            "fewstep",
            [
                "objective=flow_matching",
                "model=sd35",
                f"model.pretrained={base}",
                "data=latents",
                f"data.path={cache}",
                f"trainer.max_steps={a.teacher_train_steps}",
                f"trainer.lr={a.teacher_lr}",
                f"trainer.lr_schedule={a.teacher_lr_schedule}",
                f"teacher.decay={a.teacher_decay}",
                f"objective.cond_dropout={a.teacher_cond_dropout}",
                *common_train_args(a, run_dir),
            ],
            "teacher (flow matching)",
        )
    teacher = out / "teacher"
    if not (teacher / "model_index.json").exists():
        exported = out / "teacher_export"
        shutil.rmtree(exported, ignore_errors=True)
        run_module("fewstep.export", [f"run_dir={run_dir}", f"out={exported}"], "teacher export")
        from fewstep.demo.score import load_sd3

        tmp = out / "teacher.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        load_sd3(exported, scheduler="euler").save_pretrained(tmp)  # an ordinary SD3 pipeline: diffusers classes
        for name in ("README.md", "fewstep_export.json"):
            if (exported / name).exists():
                shutil.copy(exported / name, tmp / name)
        tmp.replace(teacher)
        shutil.rmtree(exported, ignore_errors=True)
    return teacher


def train_twinflow(a, out: Path) -> Path:
    name = "twinflow_lora" if a.lora else "twinflow"
    run_dir, export_dir = out / f"{name}_run", out / name
    experiment = "table6/sd35_lora_2order" if a.lora else "table6/sd35_full"
    if not (run_dir / "summary.json").exists():
        run_module(
            "fewstep",
            [
                f"experiment={experiment}",
                f"model.pretrained={out / 'teacher'}",
                "model.dtype=float32",
                f"data.path={out / 'cache'}",
                f"trainer.max_steps={a.twinflow_steps}",
                f"trainer.lr={a.twinflow_lr}",
                f"objective.enhanced_ratio={a.enhanced_ratio}",
                *(["model.lora.rank=16", "model.lora.alpha=16"] if a.lora else []),
                *common_train_args(a, run_dir),
            ],
            f"TwinFlow ({experiment}, scaled down)",
        )
    if not (export_dir / "model_index.json").exists():
        tmp = out / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run_module("fewstep.export", [f"run_dir={run_dir}", f"out={tmp}"], "TwinFlow export")
        tmp.replace(export_dir)
    return export_dir


def evaluate_all(a, out: Path, twinflow: Path) -> dict:
    import torch

    from fewstep.demo.score import load_sd3, score
    from fewstep.eval.digits import DigitsEvaluator

    evaluator = DigitsEvaluator()
    rows = []
    teacher = load_sd3(out / "teacher")
    for steps in dict.fromkeys([int(a.teacher_steps), 2, 1]):
        say(f"scoring the teacher, FlowMatchEulerDiscreteScheduler, {steps} steps, {a.eval_n} samples")
        rows.append({"model": "teacher", "scheduler": "FlowMatchEulerDiscreteScheduler",
                     **score(teacher, a.eval_n, steps, MAX_SEQUENCE_LENGTH, evaluator)})  # fmt: skip
    student = load_sd3(twinflow)
    for steps in a.twinflow_nfe:
        say(f"scoring TwinFlow, TwinFlowScheduler, {steps} steps, {a.eval_n} samples")
        rows.append({"model": twinflow.name, "scheduler": type(student.scheduler).__name__,
                     **score(student, a.eval_n, int(steps), MAX_SEQUENCE_LENGTH, evaluator)})  # fmt: skip
    say("scoring the VAE round trip of real digits (the floor through this VAE)")
    rows.append({"model": "real digits through the VAE", "scheduler": "-", **vae_round_trip(teacher, evaluator)})
    runs = {}
    for run in ("teacher_run", f"{twinflow.name}_run"):
        summary = json.loads((out / run / "summary.json").read_text())
        runs[run] = {k: summary.get(k) for k in ("steps", "wall_time_s", "steps_per_s", "params", "loss")}
    return {
        "rows": rows,
        "runs": runs,
        "vae": json.loads((out / "base" / "vae_train.json").read_text()),
        "settings": {k: (list(v) if not isinstance(v, (int, float, str, bool)) else v) for k, v in a.items()},
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version()},
    }  # fmt: skip


def vae_round_trip(pipe, evaluator) -> dict:
    """1,000 real digits (the evaluator's floor sample) → RGB → the pipeline's VAE (mean latent) → digits, scored."""
    import torch

    from fewstep.demo.images import to_digits, to_rgb
    from fewstep.eval.digits import floor_samples

    x, y = floor_samples()
    side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    rgb = torch.from_numpy(to_rgb(x, side)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(rgb).latent_dist.mean).sample
    images = ((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    metrics = evaluator.evaluate(to_digits(images), y)
    return {**{k: float(v) for k, v in metrics.items()}, "n": len(y), "steps": 0, "seconds": 0.0}


def markdown_table(results: dict) -> str:
    lines = [
        "| model | scheduler | steps | prompt acc | digits-FD | pixel-FD | precision | recall | n | generation s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['scheduler']} | {r['steps']} | {r['acc']:.3f} | {r['fd']:.3f} | "
            f"{r['pixel_fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['n']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def picture(out: Path, twinflow: Path, columns=(("teacher", 50), ("teacher", 2), ("twinflow", 1), ("twinflow", 2)),
            scale: int = 4) -> Path:  # fmt: skip
    """``comparison.png``: one row per digit (its prompt on the left), one column per (model, steps)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from fewstep.demo.images import caption
    from fewstep.demo.score import generate, load_sd3
    from fewstep.eval.digits import eval_noise

    pipes = {"teacher": load_sd3(out / "teacher"), "twinflow": load_sd3(twinflow)}
    prompts = [caption(d, d) for d in range(10)]
    shape = pipes["teacher"].transformer.config
    latents = eval_noise((shape.in_channels, shape.sample_size, shape.sample_size), len(prompts))
    cells = [generate(pipes[m], prompts, latents, s, MAX_SEQUENCE_LENGTH) for m, s in columns]
    side = cells[0].shape[1] * scale
    label_w, head_h, pad = 150, 18, 4
    canvas = Image.new("RGB", (label_w + len(columns) * (side + pad), head_h + len(prompts) * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (m, s) in enumerate(columns):
        draw.text((label_w + j * (side + pad), 2), f"{'TwinFlow' if m == 'twinflow' else m}-{s}", fill="black")
    for i, prompt in enumerate(prompts):
        y0 = head_h + i * (side + pad)
        draw.text((2, y0 + side // 2 - 6), prompt, fill="black")
        for j, images in enumerate(cells):
            tile = Image.fromarray(np.round(images[i] * 255).astype(np.uint8)).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (side + pad), y0))
    path = out / "comparison.png"
    canvas.save(path)
    return path


def quiet_progress_bars() -> None:
    """No loading / saving bars from diffusers and transformers in this process (the stages show their own)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict:
    a = parse_kv(argv, DEFAULTS, USAGE)
    out = Path(os.path.expanduser(a.out)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from fewstep.training.threads import set_torch_threads

    say(f"torch threads here: {set_torch_threads(int(a.threads))}")
    quiet_progress_bars()
    from fewstep.demo.images import write_digit_folder
    from fewstep.demo.pipeline import Sizes, build_base_pipeline

    sizes = Sizes()
    say(f"1/6 captioned digit images -> {out / 'images'}")
    write_digit_folder(out / "images", side=sizes.image)
    say(f"2/6 tiny SD3 pipeline, VAE trained on the images ({a.vae_steps} steps) -> {out / 'base'}")
    build_base_pipeline(out / "images", out / "base", sizes, vae_steps=int(a.vae_steps), seed=int(a.seed), say=say)
    if not (out / "cache" / "manifest.json").exists():
        prompts = out / "validation_prompts.txt"
        from fewstep.demo.images import caption

        prompts.write_text("\n".join(caption(d, d) for d in range(4)) + "\n")
        run_module(
            "fewstep.precompute",
            [
                f"pretrained={out / 'base'}",
                f"images={out / 'images'}",
                f"out={out / 'cache'}",
                f"resolution={sizes.image}",
                "buckets=false",
                f"max_sequence_length={MAX_SEQUENCE_LENGTH}",
                "embeds_dtype=float32",
                "latents_dtype=float32",
                f"validation_prompts={prompts}",
                "batch_size=250",
                "device=cpu",
                f"progress={str(bool(a.progress)).lower()}",
            ],  # fmt: skip
            "3/6 latent cache",
        )
    say("4/6 teacher: flow matching with fewstep, then export")
    train_teacher(a, out)
    say("5/6 TwinFlow from the teacher, then export")
    twinflow = train_twinflow(a, out)
    say("6/6 generate through StableDiffusion3Pipeline and score")
    results = evaluate_all(a, out, twinflow)
    if a.picture:
        results["picture"] = str(picture(out, twinflow))
    results["wall_time_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    print(table, flush=True)
    say(f"done in {results['wall_time_s']:.0f} s: results.md, results.json and comparison.png in {out}")
    return results
