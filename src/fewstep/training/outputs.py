"""Sampling a trained model for grids, raw samples and evaluation (shared by the loop,
``fewstep.sample`` and ``fewstep.eval``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewstep.data.base import cond_select, cond_to
from fewstep.logging.grids import save_samples
from fewstep.samplers.euler import EulerSampler


@torch.no_grad()
def sample_in_chunks(
    sampler, model_fn, noise, cond, steps, null_cond=None, chunk: int = 500, autocast=None, seed: int = 0
):
    """Run ``sampler`` over ``noise`` in chunks; returns samples on the CPU in float32. Stochastic
    samplers draw from their own generator (``seed``), never from the training RNG."""
    outs = []
    generator = torch.Generator().manual_seed(seed)
    device = noise.device
    for start in range(0, noise.shape[0], chunk):
        idx = torch.arange(start, min(start + chunk, noise.shape[0]))
        c = cond_select(cond, idx.to(device) if isinstance(cond, torch.Tensor) else idx)
        nc = cond_select(null_cond, idx) if null_cond is not None else None
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            outs.append(sampler.sample(model_fn, noise[idx], c, steps, generator=generator, null_cond=nc).float().cpu())
    return torch.cat(outs)


def guidance_null(sampler, data, n: int, device):
    """The unconditional condition of ``n`` samples when ``sampler`` guides (``guidance_scale > 0``: classifier-free
    guidance needs it), else None."""
    if getattr(sampler, "guidance_scale", 0.0) <= 0 or not hasattr(data, "null_cond"):
        return None
    return cond_to(data.null_cond(n), device)


def to_images(data, x: torch.Tensor, device) -> torch.Tensor:
    """Grid images from samples: latent data decodes them with its VAE (``data.decode``)."""
    decode = getattr(data, "decode", None)
    return x if decode is None else decode(x.to(device)).float().cpu()


def sample_methods(sampler, nfes, baseline_steps: int) -> list[tuple[str, object, int]]:
    """The (name, sampler, steps) list evaluated at the end of a run: the run's sampler at each NFE,
    plus the multi-step Euler baseline."""

    methods = [(f"nfe_{n}", sampler, int(n)) for n in nfes]
    if baseline_steps > 0:
        methods.append((f"euler_{baseline_steps}", EulerSampler(), int(baseline_steps)))
    return methods


def final_outputs(
    run_dir: Path,
    model_fn,
    sampler,
    data,
    nfes,
    baseline_steps: int,
    device,
    evaluate: bool = True,
    grid_size: int = 100,
    autocast=None,
    log=print,
    raw: bool | None = None,
    samples_dir: Path | None = None,
    write: bool = True,
) -> dict:
    """Grids (``samples/<method>.png``), the evaluation protocol's raw samples (``samples/<method>.npz``,
    arrays ``x`` and ``y``; ``raw`` defaults to ``evaluate``) and, with ``evaluate``, metrics keyed by method.
    ``write=False``: the same sampling passes and nothing else (the other ranks of a sharded run, whose forward
    passes are collectives); returns {}."""
    run_dir = Path(run_dir)
    samples_dir = Path(samples_dir) if samples_dir is not None else run_dir / "samples"
    evaluated = evaluate and hasattr(data, "evaluator")
    evaluator = data.evaluator() if evaluated and write else None
    raw = evaluate if raw is None else raw
    protocol = (raw or evaluated) and hasattr(data, "eval_inputs")
    grid_gen = torch.Generator().manual_seed(0)
    grid_noise = torch.randn(grid_size, *data.shape, generator=grid_gen).to(device)
    grid_cond = cond_to(data.grid_conds(grid_size), device)
    if protocol:
        eval_noise, eval_labels = data.eval_inputs()
        eval_noise, eval_cond = eval_noise.to(device), cond_to(eval_labels, device)
    results = {}
    for name, smp, steps in sample_methods(sampler, nfes, baseline_steps):
        grid_null = guidance_null(smp, data, grid_size, device)
        grid = sample_in_chunks(smp, model_fn, grid_noise, grid_cond, steps, null_cond=grid_null, autocast=autocast)
        eval_null = guidance_null(smp, data, eval_noise.shape[0], device) if protocol else None
        if not write:
            if protocol:
                sample_in_chunks(smp, model_fn, eval_noise, eval_cond, steps, null_cond=eval_null, autocast=autocast)
            continue
        image = to_images(data, grid, device)
        title = f"{name} ({steps} step{'' if steps == 1 else 's'})"
        png = save_samples(image, samples_dir / f"{name}.png", title=title, nrow=10, data=data)
        if not protocol:
            log(f"wrote {png}")
            continue
        x = sample_in_chunks(smp, model_fn, eval_noise, eval_cond, steps, null_cond=eval_null, autocast=autocast)
        x = to_images(data, x, device)
        value_range = getattr(data, "value_range", (-1.0, 1.0))  # images: [-1, 1]; 2-D points: unbounded
        if value_range is not None:
            x = x.clamp(*value_range)
        np.savez_compressed(samples_dir / f"{name}.npz", x=x.numpy(), y=eval_labels.numpy())
        log(f"wrote {png} and {name}.npz")
        if evaluator is None:
            continue
        metrics = {k: float(v) for k, v in evaluator.evaluate(x, eval_labels).items()}
        results[name] = metrics
        log(f"eval {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return results
