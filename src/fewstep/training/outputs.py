"""Sampling a trained model for grids, raw samples and evaluation (shared by the loop,
``fewstep.sample`` and ``fewstep.eval``).

In a run of several processes the rows of a grid or an evaluation set are split across them (:class:`Share`):
each process samples its contiguous share of the rows, rank 0 gathers the samples, decodes and writes them. The
final outputs of a Qwen-Image run at 1024² (100 rows × 1 + 2 + 4 NFE, about 700 network evaluations of a batch
row, and 5,000 more with the 50-step baseline) then cost each of 8 GPUs an eighth, and no process waits in a
collective while another samples alone. The samples are the same at any process count for a deterministic sampler
(each row's noise is drawn for the whole set first); a stochastic sampler's own draws follow the split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class Share:
    """This process's share of the rows sampled for grids and evaluation: rows ``[start, stop)`` of ``n`` for rank
    ``rank`` of ``world``, as contiguous blocks of ``ceil(n / world)`` rows. Every process samples the same number
    of rows (its block padded with copies of its last row, or of row 0 when it has none): under FSDP each forward
    pass is a collective that every rank makes with the same shapes."""

    rank: int = 0
    world: int = 1
    evaluated_rows: int = 0  # rows this process passed through the network so far (padding included)

    @classmethod
    def of(cls, accelerator) -> Share:
        return cls(accelerator.process_index, accelerator.num_processes)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def block(self, n: int) -> tuple[int, int, int]:
        """``(start, stop, per)``: this rank's rows and the padded size every rank samples."""
        per = math.ceil(n / self.world) if n else 0
        start = min(self.rank * per, n)
        return start, min(start + per, n), per

    def sample(self, sampler, model_fn, noise, cond, steps, null_cond=None, autocast=None, seed: int = 0):
        """This rank's rows of ``sample_in_chunks`` over all of ``noise``/``cond``; rank 0 returns all rows (CPU,
        float32, in order), the others None. One process: ``sample_in_chunks`` itself."""
        model_fn = self._counted(model_fn)
        if self.world == 1:
            return sample_in_chunks(sampler, model_fn, noise, cond, steps, null_cond=null_cond, autocast=autocast,
                                    seed=seed)  # fmt: skip
        n = noise.shape[0]
        start, stop, per = self.block(n)
        rows = list(range(start, stop))
        rows += [rows[-1] if rows else 0] * (per - len(rows))
        idx = torch.tensor(rows, dtype=torch.long)
        mine = sample_in_chunks(
            sampler, model_fn, noise[idx.to(noise.device)], cond_select(cond, idx.to(noise.device)), steps,
            null_cond=cond_select(null_cond, idx.to(noise.device)) if null_cond is not None else None,
            autocast=autocast, seed=seed + self.rank,
        )[: stop - start]  # fmt: skip
        parts = [None] * self.world if self.main else None  # a CPU gather: the samples, never a GPU's worth
        torch.distributed.gather_object(mine, parts, dst=0)
        return torch.cat(parts) if self.main else None

    def _counted(self, model_fn):
        def call(x, *args, **kwargs):
            self.evaluated_rows += int(x.shape[0])
            return model_fn(x, *args, **kwargs)

        return call


def guidance_null(sampler, data, n: int, device):
    """The unconditional condition of ``n`` samples when ``sampler`` guides (``guidance_scale > 0``: classifier-free
    guidance needs it), else None."""
    if getattr(sampler, "guidance_scale", 0.0) <= 0 or not hasattr(data, "null_cond"):
        return None
    return cond_to(data.null_cond(n), device)


DECODE_CHUNK = 8  # rows a VAE decodes at once: a 1024² decode's activations stay a few GB whatever the grid's size


def to_images(data, x: torch.Tensor, device, chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """Grid images from samples: latent data decodes them with its VAE (``data.decode``), ``chunk`` rows at a time."""
    decode = getattr(data, "decode", None)
    if decode is None:
        return x
    return torch.cat([decode(x[i : i + chunk].to(device)).float().cpu() for i in range(0, x.shape[0], chunk)])


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
    share: Share | None = None,
) -> dict:
    """Grids (``samples/<method>.png``), the evaluation protocol's raw samples (``samples/<method>.npz``,
    arrays ``x`` and ``y``; ``raw`` defaults to ``evaluate``) and, with ``evaluate``, metrics keyed by method.
    ``share``: this process's share of the rows in a run of several processes (every process calls this; rank 0
    gathers, decodes, evaluates and writes, the others return {})."""
    share = share or Share()
    run_dir = Path(run_dir)
    samples_dir = Path(samples_dir) if samples_dir is not None else run_dir / "samples"
    evaluated = evaluate and hasattr(data, "evaluator")
    evaluator = data.evaluator() if evaluated and share.main else None
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
        grid = share.sample(smp, model_fn, grid_noise, grid_cond, steps, null_cond=grid_null, autocast=autocast)
        x = None
        if protocol:
            eval_null = guidance_null(smp, data, eval_noise.shape[0], device)
            x = share.sample(smp, model_fn, eval_noise, eval_cond, steps, null_cond=eval_null, autocast=autocast)
        if not share.main:
            continue
        image = to_images(data, grid, device)
        title = f"{name} ({steps} step{'' if steps == 1 else 's'})"
        png = save_samples(image, samples_dir / f"{name}.png", title=title, nrow=10, data=data)
        if not protocol:
            log(f"wrote {png}")
            continue
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
