"""Whether a Table-6 row fits the GPUs it names, without a GPU or its weights: ``python -m fewstep.bench fit=ROW``.

A row (``conf/experiment/table6/ROW.yaml``) is estimated as it ships: its model, objective, teacher, dtypes,
mixed precision, gradient checkpointing, per-GPU batch and resolution, on the family's published architecture
(:mod:`fewstep.models.architectures`, random weights, ``model.random_init=true``) with synthetic latents and prompt
embeddings of the real shapes. The step runs under torch's ``FakeTensorMode`` (:mod:`fewstep.bench.estimate`):
no data is allocated, so a 20 B model is estimated on a laptop.

**Depth.** A full-depth estimate of Qwen-Image (60 blocks) takes minutes; the memory of a step is affine in the
number of blocks (each block adds its weights, gradients, optimizer and EMA state and its checkpointed input; the
transient peak of recomputing one block does not grow), so the row is estimated at 1 and 2 blocks and extrapolated
to the architecture's depth: ``peak(L) = peak(1) + (L - 1)·(peak(2) - peak(1))``. ``tests/bench/test_fit.py``
checks the extrapolation against a full-depth estimate. For SD3.5-medium the first 13 of its 24 blocks have a second
(dual) attention; extrapolating from two dual blocks counts all 24 as dual, an upper bound.

**Distribution.** ``ddp`` rows hold everything on every GPU: the per-GPU peak is the estimate. ``fsdp`` rows
(torch FSDP2, one unit per block, bf16 gathered weights, fp32 reduce) hold 1/N of the weights, gradients, optimizer
and EMA state per GPU and gather one block at a time (plus the next, prefetched). The per-rank peak is then
``state/N + transient + 2 blocks of bf16 weights + 1 block of fp32 gradients``, where the transient (activations,
checkpointed inputs, recompute) is measured on the same row with bf16 weights (as FSDP computes) and ``state`` is
what the fp32 row holds between steps plus its fp32 gradients.

**Host memory while loading** (per process): ``from_pretrained`` in the row's ``model.dtype`` reads the weights
into host memory; in a GPU run fewstep passes ``device_map`` (the process's GPU), so each tensor goes from the
memory-mapped safetensors file to the GPU and a process holds at most one file's tensors on the host at a time
(diffusers' shards: at most 5 GB each for the published repositories, 10 GB assumed here). Under ``fsdp`` only rank
0 reads the weights. ``host_peak_gb`` is that bound per process, the page cache of the shared files aside.
"""

from __future__ import annotations

import dataclasses
import re

from omegaconf import DictConfig, OmegaConf, open_dict

from fewstep.errors import FewstepError

GIB = 2**30
HEADROOM = 0.10  # a row fits when its estimated GPU peak leaves at least this share of the GPU free
SAFETENSORS_FILE_GB = 10.0  # the largest single weights file a process reads at once (published shards: <= 5 GB)
ARCHITECTURES = {  # launch.model_family -> the shipped architecture estimated for it
    "qwenimage": "qwen_image",
    "openuni": "openuni_l_512",
    "sana": "sana_1600m_1024px",
    "sd35": "sd35_medium",
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class FitError(FewstepError, ValueError):
    """A row that cannot be estimated (unknown row, unreadable hardware)."""


@dataclasses.dataclass(frozen=True)
class RowFit:
    """One row's estimate. Memory in GiB (``torch.cuda.max_memory_allocated`` / 2³⁰, as docs/realsize.md)."""

    row: str
    architecture: str
    layers: int
    distributed: str
    processes: int
    gpu_gb: float  # memory of one GPU of launch.hardware
    gpu_peak_gb: float  # the estimated peak per GPU (per rank under fsdp)
    host_peak_gb: float  # host memory one process needs while loading the weights (see the module docstring)
    params: int
    trainable_params: int
    checkpoint_gb: float  # what a checkpoint holds: trainable weights, AdamW moments and the EMA, fp32 (GiB)
    depth_estimates: dict  # blocks -> {"peak_gb", "resident_gb"} of the (fp32 / the row's) estimates
    text_encoder_gb: float = 0.0  # included in gpu_peak_gb: the bf16 text encoders a text=online cache keeps

    @property
    def headroom(self) -> float:
        return 1.0 - self.gpu_peak_gb / self.gpu_gb

    @property
    def fits(self) -> bool:
        return self.headroom >= HEADROOM

    @property
    def checkpoint_gb_per_rank(self) -> float:
        """What each rank writes: its shards under ``fsdp`` (sharded checkpoints), everything on rank 0 otherwise."""
        return self.checkpoint_gb / self.processes if self.distributed == "fsdp" else self.checkpoint_gb

    def save_seconds(self, gb_per_s: float = 1.0, sharded: bool = True) -> float:
        """Seconds to write a checkpoint at ``gb_per_s`` per writing rank: the ranks in parallel when ``sharded``
        (fsdp), else rank 0 alone (a full-state checkpoint, after gathering)."""
        sharded = sharded and self.distributed == "fsdp"
        return (self.checkpoint_gb_per_rank if sharded else self.checkpoint_gb) * GIB / 1e9 / gb_per_s

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "headroom": self.headroom, "fits": self.fits,
                "checkpoint_gb_per_rank": self.checkpoint_gb_per_rank}  # fmt: skip


def hardware_gb(hardware: str) -> tuple[int, float]:
    """``launch.hardware`` ("8 x 80 GB", "8 x 80 GB, FSDP", "8 x 40-80 GB": the smallest) as (GPUs, GiB per GPU). GB
    as the vendors count (an "80 GB" H100 has 79.6 GiB usable by torch: taken as 80 GB = 74.5 GiB here, the stricter
    reading)."""
    match = re.match(r"\s*(\d+)\s*[x×]\s*(\d+(?:\.\d+)?)(?:\s*-\s*\d+(?:\.\d+)?)?\s*GB", str(hardware))
    if not match:
        raise FitError(f"launch.hardware={hardware!r} is not 'N x M GB'; write the row's GPUs as e.g. '8 x 80 GB'")
    return int(match.group(1)), float(match.group(2)) * 1e9 / GIB


def row_config(row: str, num_layers: int, overrides: list[str] | tuple = (), bf16_weights: bool = False) -> DictConfig:
    """The row's training config at ``num_layers`` blocks of its family's published architecture, random weights,
    synthetic data of the row's batch and resolution. ``overrides``: edits of the row (as on the command line)."""
    from fewstep.config.schema import SyntheticDataConfig, compose_config

    try:
        cfg = compose_config([f"experiment=table6/{row}", "data.path=unused", *overrides])
    except Exception as err:  # hydra's MissingConfigException and kin: name the rows
        raise FitError(f"fit={row}: {str(err).splitlines()[0]} (rows: {', '.join(rows())})") from err
    family = str(cfg.launch.model_family)
    arch = ARCHITECTURES.get(family)
    if arch is None:
        raise FitError(f"fit={row}: launch.model_family={family} has no shipped architecture ({sorted(ARCHITECTURES)})")
    if family == "sd35" and "large" in str(cfg.model.pretrained):
        arch = "sd35_large"
    data = OmegaConf.structured(
        SyntheticDataConfig(
            architecture=arch, resolution=int(cfg.launch.resolution), batch_size=int(cfg.data.batch_size)
        )
    )
    with open_dict(cfg):
        cfg.data = data
        cfg.model.random_init = True
        cfg.model.architecture = arch
        cfg.model.num_layers = int(num_layers)
        if bf16_weights:
            cfg.model.dtype = "bfloat16"
    return cfg


def rows() -> list[str]:
    from fewstep.config.schema import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "experiment" / "table6").glob("*.yaml"))


def _extrapolate(at1: float, at2: float, layers: int) -> float:
    return at1 + (layers - 1) * (at2 - at1)


def _estimates(row: str, overrides, bf16_weights: bool, steps: int) -> tuple[dict, DictConfig]:
    from fewstep.bench.estimate import estimate_step_memory

    out = {}
    for blocks in (1, 2):
        cfg = row_config(row, blocks, overrides, bf16_weights=bf16_weights)
        out[blocks] = estimate_step_memory(cfg, str(cfg.trainer.mixed_precision), steps=steps)
    return out, cfg


def row_fit(row: str, overrides: list[str] | tuple = (), steps: int = 3) -> RowFit:
    """The row's estimated per-GPU peak and per-process host peak while loading (module docstring)."""
    from fewstep.models import architectures

    base = row_config(row, 1, overrides)
    processes, gpu_gb = hardware_gb(base.launch.hardware)
    if int(base.launch.num_processes) != processes:
        raise FitError(
            f"fit={row}: launch.num_processes={base.launch.num_processes} but launch.hardware={base.launch.hardware!r}"
        )
    arch = architectures.load(str(base.model.architecture))
    layers = int(arch.config["num_layers"])
    est, cfg = _estimates(row, overrides, False, steps)
    peak = _extrapolate(est[1]["peak_memory_mb"], est[2]["peak_memory_mb"], layers) * 2**20
    resident = _extrapolate(est[1]["resident_mb"], est[2]["resident_mb"], layers) * 2**20
    params = round(_extrapolate(est[1]["params"], est[2]["params"], layers))
    trainable = round(_extrapolate(est[1]["trainable_params"], est[2]["trainable_params"], layers))
    depth = {b: {"peak_gb": e["peak_memory_mb"] / 1024, "resident_gb": e["resident_mb"] / 1024} for b, e in est.items()}
    distributed = str(cfg.trainer.distributed)
    weight_bytes = DTYPE_BYTES[str(cfg.model.dtype)]
    if distributed == "fsdp":
        # what the fp32 row holds between steps (weights, optimizer, EMA) plus its fp32 gradients, sharded N ways
        state = resident + 4 * trainable
        block_params = (est[2]["params"] - est[1]["params"]) if layers > 1 else params
        est16, _ = _estimates(row, overrides, True, steps)
        peak16 = _extrapolate(est16[1]["peak_memory_mb"], est16[2]["peak_memory_mb"], layers) * 2**20
        resident16 = _extrapolate(est16[1]["resident_mb"], est16[2]["resident_mb"], layers) * 2**20
        transient = peak16 - resident16 - 2 * trainable  # the bf16 row's activations (its bf16 gradients aside)
        peak = state / processes + transient + 2 * 2 * block_params + 4 * block_params
        host = params * weight_bytes / GIB  # only rank 0 reads; it loads the whole model before sharding
    else:
        host = min(params * weight_bytes / GIB, SAFETENSORS_FILE_GB * 1e9 / GIB)
    ema = float(cfg.teacher.get("decay", 0.0) or 0.0) > 0.0  # decay 0: the student is the teacher, no copy
    checkpoint = trainable * (4 + 8 + (4 if ema else 0)) / GIB  # fp32 weights, two AdamW moments, the EMA
    return RowFit(
        row=row,
        architecture=arch.name,
        layers=layers,
        distributed=distributed,
        processes=processes,
        gpu_gb=gpu_gb,
        gpu_peak_gb=peak / GIB,
        host_peak_gb=host,
        params=params,
        trainable_params=trainable,
        checkpoint_gb=checkpoint,
        depth_estimates=depth,
    )


def with_online_text(fit: RowFit) -> RowFit:
    """``fit`` for a ``precompute text=online`` cache: each process also holds the pipeline's text encoders in
    bf16, no gradients (their published parameter count, :attr:`Architecture.text_encoder_params`; the no-grad
    activations of encoding one batch, under 0.5 GiB at batch 8 × 512 tokens, are within the headroom)."""
    from fewstep.models import architectures

    extra = 2 * architectures.load(fit.architecture).text_encoder_params / GIB
    return dataclasses.replace(fit, gpu_peak_gb=fit.gpu_peak_gb + extra, text_encoder_gb=extra)


def fit_table(fits: list[RowFit]) -> str:
    """A markdown table of row estimates (docs/reproducing.md)."""
    lines = [
        "| row | architecture | distributed | GPU peak (GiB) | GPU (GiB) | headroom | host peak per process (GiB) |"
        " trainable | checkpoint (GiB) | written per rank (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in fits:
        lines.append(
            f"| {f.row} | {f.architecture} | {f.distributed} × {f.processes} | {f.gpu_peak_gb:.1f} | {f.gpu_gb:.1f} "
            f"| {100 * f.headroom:.0f} %{'' if f.fits else ' (does not fit)'} | {f.host_peak_gb:.1f} "
            f"| {f.trainable_params / 1e6:,.0f} M | {f.checkpoint_gb:.1f} | {f.checkpoint_gb_per_rank:.1f} |"
        )
    return "\n".join(lines)


USAGE = (
    "usage: python -m fewstep.bench.fit [rows=[qwenimage_lora_1order,...]] [overrides=[model.dtype=float32]] "
    "[text=cached|online] [out=FILE.json]\n"
    "  Estimates each Table-6 row (all by default) at its real size without a GPU and prints the per-GPU peak, the\n"
    "  headroom on launch.hardware and the host memory a process needs while loading. overrides: edits of every row;\n"
    "  text=online: the cache encodes captions on each GPU (precompute text=online), its text encoders counted."
)


def main(argv: list[str] | None = None) -> list[RowFit]:
    import json
    import logging
    from pathlib import Path

    from fewstep.cli import parse_kv

    logging.basicConfig(level=logging.WARNING)
    args = parse_kv(argv, {"rows": [], "overrides": [], "text": "cached", "out": ""}, USAGE)
    if args.text not in ("cached", "online"):
        raise FitError(f"text={args.text!r} must be cached or online (the cache's precompute text=)")
    names = [str(r) for r in args.rows] or rows()
    unknown = sorted(set(names) - set(rows()))
    if unknown:
        raise FitError(f"rows={unknown[0]} is no Table-6 row; rows: {', '.join(rows())}")
    fits = []
    for name in names:
        fit = row_fit(name, [str(o) for o in args.overrides])
        fits.append(with_online_text(fit) if args.text == "online" else fit)
        print(f"{name}: {fits[-1].gpu_peak_gb:.1f} GiB per GPU of {fits[-1].gpu_gb:.1f}", flush=True)
    print(fit_table(fits))
    if args.out:
        Path(args.out).write_text(json.dumps([f.as_dict() for f in fits], indent=1) + "\n")
    return fits


if __name__ == "__main__":
    from fewstep.cli import run_cli

    run_cli(main)
