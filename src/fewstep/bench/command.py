"""``python -m fewstep.bench out=DIR``: training-step and sampling benchmarks → ``DIR/bench.json`` + ``DIR/bench.md``.

Training: per objective (flow_matching, rcgm, twinflow with and without the enhanced target) on the
same model and batch, the median wall time of a full optimizer step (loss, backward, AdamW), with
the objectives' steps interleaved after a warm-up so machine noise hits them alike, repeated in
``runs`` separate runs (fresh runners each). The step ratio against flow matching is reported as its
spread: the median, quartiles and range of the per-repeat ratios (a variant's step over the
flow-matching step of the same interleaved round) and each run's median. Network evaluations per step
are the mean over the timed steps (forward rows / batch, from the objective's own counter). Peak
memory is measured per variant in a fresh subprocess on every device, so nothing from the timing (or
another variant) is resident: CUDA: max allocated over the steps (weights, optimizer state and EMA
included); CPU: peak RSS growth over the steps. Sampling: latency per image (batch 1) and images/s
(batch ``sample_batch``) at 1/2/4 NFE against the 50-step Euler baseline. Quality at equal wall-clock
budget (``quality_budget_s`` > 0): each objective trains for the same seconds, then 1-NFE (and
50-step Euler) quality. Ratios are measured in the same run.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewstep.bench.runner import (
    StepRunner,
    _child_result,
    _iqr,
    _quartiles,
    apply_threads,
    compose,
    measure_variant_memory,
    sync,
    time_runners,
)
from fewstep.bench.tables import write_markdown
from fewstep.cli import parse_kv
from fewstep.config.validate import check_known_keys, check_model_data
from fewstep.data.base import cond_to
from fewstep.errors import FewstepError
from fewstep.objectives.base import registered as registered_objectives
from fewstep.samplers.euler import EulerSampler
from fewstep.training.loop import train

log = logging.getLogger("fewstep.bench")


log = logging.getLogger("fewstep.bench")


USAGE = (
    "usage: python -m fewstep.bench out=DIR [batch_size=128] [repeats=30] [warmup=5] [model=tiny] [data=digits] "
    "[runs=3] [mixed_precision=no|bf16] [sample_batch=1000] [sample_repeats=20] [quality_budget_s=0] [device=cpu|cuda] "
    "[overrides=[...]] [variants=[flow_matching,twinflow,...]] [isolate=true] [compare_compile=true] "
    "[estimate_memory=true]"
)


DEFAULTS = {
    "out": "bench_out",
    "batch_size": 128,
    "repeats": 30,
    "warmup": 5,
    "runs": 3,
    "model": "tiny",
    "data": "digits",
    "mixed_precision": "no",
    "sample_batch": 1000,
    "sample_repeats": 20,  # timed samplings per method at batch 1 (at sample_batch: 3, or fewer if this is)
    "quality_budget_s": 0.0,
    "device": None,
    "overrides": [],
    "objectives_only": False,
    "variants": [],  # names from VARIANTS (default: DEFAULT_VARIANTS); flow_matching is the reference of ratios
    "isolate": False,  # each variant timed and measured alone in a fresh process (real size; OOM is a result)
    "compare_compile": False,  # every variant also with trainer.compile=true ("<name>_compiled")
    "variant_timeout_s": 900,
    # peak memory of each variant estimated without allocating it (fewstep.bench.estimate: FakeTensorMode, no step
    # time); each variant in a fresh process; a real-size table on any machine, GPU or not
    "estimate_memory": False,
    "estimate_steps": 6,  # steps per variant: one DMD2 critic/generator cycle (5 + 1)
}


# The default set's variants (TwinFlow with and without its enhanced target, RCGM); every registered objective is a
# variant of its own name too (variants(); DMD2's critic and generator steps differ: the isolated table's mean column)
VARIANTS = {
    "flow_matching": ["objective=flow_matching"],
    "rcgm": ["objective=rcgm", "objective.enhanced_ratio=0.0"],
    "twinflow": ["objective=twinflow", "objective.enhanced_ratio=0.5"],
    "twinflow_no_enhance": ["objective=twinflow", "objective.enhanced_ratio=0.0"],
}


def variants() -> dict[str, list[str]]:
    """:data:`VARIANTS` and ``objective=<name>`` for every other registered objective."""
    extra = {name: [f"objective={name}"] for name in registered_objectives() if name not in VARIANTS}
    return {**VARIANTS, **extra}


DEFAULT_VARIANTS = ("flow_matching", "rcgm", "twinflow", "twinflow_no_enhance")


def select_variants(args) -> dict[str, list[str]]:
    """The variants to run: ``args.variants`` (default DEFAULT_VARIANTS), each also compiled with
    ``compare_compile``. Flow matching (eager) is always among them: it is the reference of every ratio."""

    known = variants()
    names = list(args.variants) or list(DEFAULT_VARIANTS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FewstepError(f"variants: {', '.join(unknown)} unknown; choose from {', '.join(known)}")
    if "flow_matching" not in names:
        raise FewstepError("variants must include flow_matching: every ratio is against a flow-matching step")
    chosen = {n: list(known[n]) for n in names}
    if args.compare_compile:
        chosen.update({f"{n}_compiled": [*known[n], "trainer.compile=true"] for n in names})
    return chosen


def bench_isolated(args, device, variants: dict[str, list[str]]) -> dict:
    """Each variant alone in a fresh process (``isolated_variant``): nothing of another variant is resident,
    and an out-of-memory is recorded as a result. Ratios against flow matching where both ran."""
    out = {name: isolated_variant([*base_overrides(args), *ov], args, device) for name, ov in variants.items()}
    ref = out["flow_matching"]
    for row in out.values():
        if "step_time_s" in row and "step_time_s" in ref:
            row["ratio_vs_flow_matching"] = row["step_time_s"] / ref["step_time_s"]
            row["memory_vs_flow_matching"] = row["peak_memory_mb"] / ref["peak_memory_mb"]
    return out


def isolated_variant(overrides: list[str], args, device) -> dict:
    """Run ``_isolated_child`` in a fresh interpreter; its last stdout line is the result (a crash or a
    time-out becomes ``{"error": ...}``, never an exception here)."""
    code = "import sys; from fewstep.bench.runner import _isolated_child; _isolated_child(*sys.argv[1:])"
    argv = [json.dumps(overrides), args.mixed_precision, str(device), str(args.warmup), str(args.repeats)]
    log.info("isolated: %s", " ".join(overrides))
    return _child_result(code, argv, args.variant_timeout_s)


def bench_estimated(args, variants: dict[str, list[str]]) -> dict:
    """Each variant's peak memory estimated in a fresh process (:func:`fewstep.bench.estimate.estimate_step_memory`;
    nothing is allocated, so any model size runs on any machine). Ratios against flow matching."""
    code = "import sys; from fewstep.bench.estimate import _estimate_child; _estimate_child(*sys.argv[1:])"
    out = {}
    for name, ov in variants.items():
        overrides = [*base_overrides(args), *ov]
        log.info("estimate: %s", " ".join(overrides))
        argv = [json.dumps(overrides), args.mixed_precision, str(args.estimate_steps)]
        out[name] = _child_result(code, argv, args.variant_timeout_s)
    ref = out["flow_matching"]
    for row in out.values():
        if "peak_memory_mb" in row and "peak_memory_mb" in ref:
            row["memory_vs_flow_matching"] = row["peak_memory_mb"] / ref["peak_memory_mb"]
        if row.get("tflops_per_step") and ref.get("tflops_per_step"):
            row["flops_vs_flow_matching"] = row["tflops_per_step"] / ref["tflops_per_step"]
    return out


def base_overrides(args) -> list[str]:
    return [f"model={args.model}", f"data={args.data}", f"data.batch_size={args.batch_size}", *args.overrides]


def time_variants(args, device, variants: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """One timing run: fresh runners for ``variants``, timed by ``time_runners``. Returns plain numbers
    (per variant ``times``, ``evals``, ``params``); nothing built here outlives the call."""
    variants = variants or {n: VARIANTS[n] for n in DEFAULT_VARIANTS}
    runners = {name: StepRunner([*base_overrides(args), *ov], device, args.mixed_precision)
               for name, ov in variants.items()}  # fmt: skip
    out = time_runners(runners, args.warmup, args.repeats)
    for name, built in runners.items():
        out[name]["params"] = sum(p.numel() for p in built.model.parameters())
    runners = built = None
    # Hydra's instantiate raises and catches errors inside OmegaConf while it builds a runner; their tracebacks hold
    # the building frames (and so the runner) in reference cycles that only the collector frees: free them now, before
    # the memory of the next variant is measured
    gc.collect()
    return out


def summarize_timings(runs: list[dict[str, dict]], reference: str = "flow_matching") -> dict[str, dict]:
    """Per variant over the timing ``runs``: median step time and its IQR, evaluations per step averaged
    over every timed step, and the spread of the step ratio against ``reference`` (per-repeat ratios:
    the variant's step over the reference's step of the same round; their median, quartiles, range and
    each run's median). A ``<name>_compiled`` variant beside ``<name>`` also gets ``ratio_vs_eager``, the
    same spread of its step over the eager step of the same round."""
    out = {}
    for name in runs[0]:
        times = [t for run in runs for t in run[name]["times"]]
        evals = [e for run in runs for e in run[name]["evals"]]
        per_run = [[t / ref for t, ref in zip(run[name]["times"], run[reference]["times"])] for run in runs]
        ratios = [r for run in per_run for r in run]
        out[name] = {
            "step_time_s": statistics.median(times),
            "step_time_iqr_s": _iqr(times),
            "evals_per_step": statistics.fmean(evals),
            "params": runs[0][name]["params"],
            "ratio_vs_flow_matching": statistics.median(ratios),
            "ratio_quartiles": _quartiles(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "ratio_run_medians": [statistics.median(r) for r in per_run],
            "timed_steps": len(times),
        }
        eager = name.removesuffix("_compiled")
        if eager != name and eager in runs[0]:  # compare_compile: the compiled step over the eager one, same round
            per_run = [[t / e for t, e in zip(run[name]["times"], run[eager]["times"])] for run in runs]
            ratios = [r for run in per_run for r in run]
            out[name]["ratio_vs_eager"] = statistics.median(ratios)
            out[name]["ratio_vs_eager_quartiles"] = _quartiles(ratios)
            out[name]["ratio_vs_eager_run_medians"] = [statistics.median(r) for r in per_run]
    return out


def check_variants(args) -> None:
    """A setting to fix (a misspelt key, an architecture or weights that are not there, data the model cannot
    take) stops here in one line, before any variant is built; an out-of-memory stays a result of its row."""

    for overrides in dict.fromkeys(tuple([*base_overrides(args), *ov]) for ov in select_variants(args).values()):
        cfg = compose(list(overrides))
        check_known_keys(cfg)
        check_model_data(cfg)


def bench_objectives(args, device) -> dict:
    variants = select_variants(args)
    if args.estimate_memory:
        return bench_estimated(args, variants)
    if args.isolate:
        return bench_isolated(args, device, variants)
    runs = []
    for i in range(args.runs):
        log.info("timing run %d/%d", i + 1, args.runs)
        runs.append(time_variants(args, device, variants))
    out = summarize_timings(runs)
    for name, ov in variants.items():
        out[name].update(measure_variant_memory([*base_overrides(args), *ov], args.mixed_precision, device))
    return out


def bench_sampling(args, device) -> dict:

    runner = StepRunner([*base_overrides(args), "objective=twinflow"], device, args.mixed_precision)
    model = runner.model.eval()
    shape = runner.data.shape
    methods = [(f"nfe_{n}", runner.sampler, n) for n in (1, 2, 4)] + [("euler_50", EulerSampler(), 50)]
    out = {}
    autocast = runner.autocast or (lambda: torch.autocast(device.type, enabled=False))
    for name, sampler, steps in methods:
        rows = {}
        for batch in (1, args.sample_batch):
            noise = torch.randn(batch, *shape, device=device)
            cond = cond_to(runner.data.grid_conds(batch), device)
            with autocast():
                sampler.sample(model, noise, cond, steps)  # warm-up
            reps = args.sample_repeats if batch == 1 else min(3, args.sample_repeats)
            ts = []
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                with autocast():
                    sampler.sample(model, noise, cond, steps)
                sync()
                ts.append(time.perf_counter() - t0)
            rows[batch] = statistics.median(ts)
        out[name] = {
            "steps": steps,
            "latency_ms_per_image": rows[1] * 1000,
            "images_per_s": args.sample_batch / rows[args.sample_batch],
        }
    base = out["euler_50"]
    for row in out.values():
        row["speedup_vs_euler_50"] = row["images_per_s"] / base["images_per_s"]
    return out


def bench_quality(args, device) -> dict:
    """Train each objective for the same wall-clock budget, then evaluate (1/2/4 NFE + Euler 50)."""

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("flow_matching", "twinflow"):
            cfg = compose(
                [*base_overrides(args), *VARIANTS[name], "objective.enhanced_ratio=0.0" if name != "flow_matching"
                 else "objective.cond_dropout=0.0", "trainer.max_steps=1000000",
                 f"trainer.time_limit_s={args.quality_budget_s}", "logger=none", "trainer.checkpoint_every=1000000",
                 "trainer.sample_every=1000000", f"trainer.mixed_precision={args.mixed_precision}"]
            )  # fmt: skip
            summary = train(cfg, run_dir=Path(tmp) / name)
            out[name] = {"steps": summary["steps"], "eval": summary.get("eval", {})}
    return out


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_kv(argv, DEFAULTS, USAGE)

    for key in ("repeats", "runs", "batch_size", "sample_batch", "sample_repeats"):
        if int(getattr(args, key)) < 1:
            raise FewstepError(f"{key}={getattr(args, key)} must be >= 1 ({USAGE})")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    apply_threads(compose(base_overrides(args)))  # before "threads" is recorded; each runner applies it too
    result = {
        "command": " ".join(["python -m fewstep.bench", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "config": f"model={args.model} data={args.data} batch={args.batch_size} precision={args.mixed_precision}",
        "sample_batch": args.sample_batch,
        "runs": args.runs,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_avg_1min": os.getloadavg()[0],
        "quality_budget_s": args.quality_budget_s,
        "isolated": bool(args.isolate),
        "estimated": bool(args.estimate_memory),
        "overrides": list(args.overrides),
    }
    if args.estimate_memory:
        result["device"] = "estimate: fake tensors, no device memory used"
    log.info("training-step benchmark: %s", result["config"])
    check_variants(args)
    result["objectives"] = bench_objectives(args, device)
    if not (args.objectives_only or args.isolate or args.estimate_memory):  # (real size: one model at a time)
        log.info("sampling benchmark")
        result["sampling"] = bench_sampling(args, device)
    if args.quality_budget_s > 0:
        log.info("quality at an equal budget of %s s per objective", args.quality_budget_s)
        result["quality"] = bench_quality(args, device)
        first = next(iter(next(iter(result["quality"].values()))["eval"].values()), {})
        result["quality_metrics"] = list(first)
    result["load_avg_1min_end"] = os.getloadavg()[0]
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "bench.md")
    print((out / "bench.md").read_text())
    return result
