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

import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewstep.cli import parse_kv

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
    # peak memory of each variant estimated without allocating it (fewstep.estimate: FakeTensorMode, no step
    # time); each variant in a fresh process; a real-size table on any machine, GPU or not
    "estimate_memory": False,
    "estimate_steps": 6,  # steps per variant: one DMD2 critic/generator cycle (5 + 1)
}

VARIANTS = {
    "flow_matching": ["objective=flow_matching"],
    "rcgm": ["objective=rcgm", "objective.enhanced_ratio=0.0"],
    "twinflow": ["objective=twinflow", "objective.enhanced_ratio=0.5"],
    "twinflow_no_enhance": ["objective=twinflow", "objective.enhanced_ratio=0.0"],
    # not in the default set (DMD2: critic and generator steps differ, see the isolated table's mean column)
    "dmd2": ["objective=dmd2"],
    "meanflow": ["objective=meanflow"],
    "scm": ["objective=scm"],
}
DEFAULT_VARIANTS = ("flow_matching", "rcgm", "twinflow", "twinflow_no_enhance")


def compose(overrides: list[str]):
    from fewstep.schema import compose_config

    return compose_config(overrides)


def apply_threads(cfg) -> None:
    """``trainer.torch_threads`` (given in ``overrides=[...]``) as the training loop applies it: 0 keeps torch's
    default. Without this the bench timed at torch's default thread count whatever the overrides said."""
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)


class StepRunner:
    """One objective's full optimizer step on a fixed model/data configuration. ``evals`` records every
    step's network evaluations (forward rows / batch)."""

    def __init__(self, overrides: list[str], device: torch.device, mixed_precision: str):
        from hydra.utils import instantiate

        from fewstep.train import build_components, make_optimizer

        cfg = compose(overrides)
        apply_threads(cfg)
        torch.manual_seed(0)
        self.data, self.objective, self.model, self.teacher, self.sampler = build_components(cfg, device=device)
        self.objective.setup(self.model, self.data)  # networks an objective owns (DMD2's fake score), as the loop
        groups = {"student": self.model, **{n: net.module.to(device) for n, net in self.objective.networks.items()}}
        self.params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in groups.items()}
        self.opts = {n: make_optimizer(ps, lr=1e-4) for n, ps in self.params.items()}  # as the training loop
        averages = {}
        for name, net in self.objective.networks.items():
            if net.ema:
                averages[name] = instantiate(cfg.teacher)
                averages[name].bind(groups[name])
        self.objective.bind({n: m for n, m in groups.items() if n != "student"}, averages)
        self.averages = averages
        self.batches = self.data.batches(0)
        self.device = device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else None
        self.step_index = 0
        self.evals: list[float] = []

    def step(self) -> float:
        batch = next(self.batches).to(self.device)
        sync()
        t0 = time.perf_counter()
        self.teacher.update(self.model, self.step_index)
        for name, average in self.averages.items():
            average.update(self.objective.network(name), self.step_index)
        ctx = self.autocast() if self.autocast else torch.autocast(self.device.type, enabled=False)
        with ctx:
            loss, logs = self.objective.loss(self.model, self.teacher, batch, self.step_index)
        loss.backward()
        for name in self.objective.stepping(self.step_index):  # the others' gradients are discarded
            torch.nn.utils.clip_grad_norm_(self.params[name], 1.0)
            self.opts[name].step()
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        sync()
        self.step_index += 1
        self.evals.append(float(logs["nfe/per_step"]))
        return time.perf_counter() - t0


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def select_variants(args) -> dict[str, list[str]]:
    """The variants to run: ``args.variants`` (default DEFAULT_VARIANTS), each also compiled with
    ``compare_compile``. Flow matching (eager) is always among them: it is the reference of every ratio."""
    from fewstep.errors import FewstepError

    names = list(args.variants) or list(DEFAULT_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise FewstepError(f"variants: {', '.join(unknown)} unknown; choose from {', '.join(VARIANTS)}")
    if "flow_matching" not in names:
        raise FewstepError("variants must include flow_matching: every ratio is against a flow-matching step")
    chosen = {n: list(VARIANTS[n]) for n in names}
    if args.compare_compile:
        chosen.update({f"{n}_compiled": [*VARIANTS[n], "trainer.compile=true"] for n in names})
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
    code = "import sys; from fewstep.bench import _isolated_child; _isolated_child(*sys.argv[1:])"
    argv = [json.dumps(overrides), args.mixed_precision, str(device), str(args.warmup), str(args.repeats)]
    log.info("isolated: %s", " ".join(overrides))
    return _child_result(code, argv, args.variant_timeout_s)


def _child_result(code: str, argv: list[str], timeout_s: float) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is the result (a crash or a time-out becomes
    ``{"error": ...}``, never an exception here)."""
    try:
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        lines = proc.stderr.strip().splitlines() or ["no output"]
        raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exhausted)\b", line)]
        return {"error": f"exit {proc.returncode}: {(raised or lines)[-1][:300]}"}


def _isolated_child(overrides_json: str, mixed_precision: str, device: str, warmup: str, repeats: str) -> None:
    """Build one variant, ``warmup`` steps, then ``repeats`` timed steps; print one JSON line: median step
    time, mean evaluations per step, parameters, and the process's peak memory (CUDA: max allocated since
    start, so weights, optimizer state, EMA and activations; CPU: peak RSS). OOM: ``{"oom": true}``."""
    dev = torch.device(device)
    try:
        runner = StepRunner(json.loads(overrides_json), dev, mixed_precision)
        timed = time_runners({"variant": runner}, int(warmup), int(repeats))["variant"]
        times, evals = timed["times"], timed["evals"]
    except torch.OutOfMemoryError as err:
        print(json.dumps({"oom": True, "error": str(err).strip().splitlines()[0][:300], **_peak(dev)}))
        return
    params = list(runner.model.parameters())
    print(json.dumps({
        "step_time_s": statistics.median(times),
        "step_time_iqr_s": _iqr(times),
        "step_time_mean_s": statistics.fmean(times),  # a whole critic/generator cycle for DMD2-style schedules
        "evals_per_step": statistics.fmean(evals),
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        **_peak(dev),
    }))  # fmt: skip


def bench_estimated(args, variants: dict[str, list[str]]) -> dict:
    """Each variant's peak memory estimated in a fresh process (:func:`fewstep.estimate.estimate_step_memory`;
    nothing is allocated, so any model size runs on any machine). Ratios against flow matching."""
    code = "import sys; from fewstep.bench import _estimate_child; _estimate_child(*sys.argv[1:])"
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


def _estimate_child(overrides_json: str, mixed_precision: str, steps: str) -> None:
    from fewstep.estimate import estimate_step_memory

    print(json.dumps(estimate_step_memory(json.loads(overrides_json), mixed_precision, int(steps))))


def _peak(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def collect(out: str | Path, dirs: list[str | Path]) -> dict:
    """Merge the ``bench.json`` of several isolated runs (one model each) into ``out.json`` / ``out.md``:
    one table, a row per (model, objective)."""
    rows, devices = [], []
    for folder in dirs:
        path = Path(folder) / "bench.json"
        if not path.exists():
            rows.append({"run": Path(folder).name, "error": "no bench.json (the stage failed)"})
            continue
        result = json.loads(path.read_text())
        for name, r in result["objectives"].items():
            rows.append({"run": Path(folder).name, "config": result["config"], "overrides": result.get("overrides", []),
                         "objective": name, **r})  # fmt: skip
        devices.append(result["device"])
    merged = {"device": ", ".join(sorted(set(devices))) or "?", "rows": rows}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(merged, indent=2))
    lines = [f"# Real-size training step ({merged['device']})", "", *_table(rows, with_run=True)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return merged


def _nan(r: dict, key: str) -> float:
    return r.get(key, float("nan"))


# (header, cell) of the per-variant tables: measured (isolate=true) and estimated (estimate_memory=true)
MEASURED_COLUMNS = [
    ("step time (s)", lambda r: f"{r['step_time_s']:.3f}"),
    ("mean step (s)", lambda r: f"{_nan(r, 'step_time_mean_s'):.3f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'ratio_vs_flow_matching'):.2f}"),
    ("peak memory (GB)", lambda r: f"{r['peak_memory_mb'] / 1024:.1f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'memory_vs_flow_matching'):.2f}"),
    ("evals / step", lambda r: f"{r['evals_per_step']:.2f}"),
    ("trainable", lambda r: f"{r['trainable_params'] / 1e6:.0f} M"),
]
ESTIMATED_COLUMNS = [
    ("estimated peak memory (GB)", lambda r: f"{r['peak_memory_mb'] / 1024:.2f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'memory_vs_flow_matching'):.3f}"),
    ("resident after the steps (GB)", lambda r: f"{r['resident_mb'] / 1024:.2f}"),
    ("TFLOP / step", lambda r: f"{_nan(r, 'tflops_per_step'):.2f}"),
    ("× flow matching", lambda r: f"{_nan(r, 'flops_vs_flow_matching'):.2f}"),
    ("evals / step", lambda r: f"{r['evals_per_step']:.2f}"),
    ("trainable", lambda r: f"{r['trainable_params'] / 1e6:.0f} M"),
]
ESTIMATE_NOTE = (
    "Estimated with `estimate_memory=true` (fewstep.estimate): the step runs on fake tensors, nothing is "
    "allocated; peak = the largest total of live tensor storages (each rounded to 512 bytes) during any step. "
    "Leaves out GPU kernel workspaces and allocator fragmentation. TFLOP / step: the matmuls, convolutions and "
    "attention of one optimizer step (forward, backward, checkpointing's recompute), the mean over the steps."
)


def _table(rows: list[dict], with_run: bool = False) -> list[str]:
    """One row per variant: the measured columns, or the estimated ones when every row that ran is an estimate.
    An out-of-memory or a failure is a row too."""
    ran = [r for r in rows if "error" not in r]
    estimated = bool(ran) and all(r.get("estimated") for r in ran)
    columns = ESTIMATED_COLUMNS if estimated else MEASURED_COLUMNS
    head = "| run | objective |" if with_run else "| objective |"
    lines = [head + "".join(f" {h} |" for h, _ in columns), "|---" * (head.count("|") - 1 + len(columns)) + "|"]
    for r in rows:
        cells = [r["run"]] if with_run else []
        cells.append(r.get("objective", ""))
        if r.get("oom"):
            mem = f"OOM ({r['peak_memory_mb'] / 1024:.1f} at failure)" if "peak_memory_mb" in r else "OOM"
            cells += ["out of memory", "", "", mem, "", "", ""]
        elif "error" in r:
            cells += [f"failed: {r['error']}"] + [""] * (len(columns) - 1)
        else:
            cells += [cell(r) for _, cell in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", ESTIMATE_NOTE] if estimated else lines


def base_overrides(args) -> list[str]:
    return [f"model={args.model}", f"data={args.data}", f"data.batch_size={args.batch_size}", *args.overrides]


def time_runners(runners: dict[str, StepRunner], warmup: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """``warmup`` then ``repeats`` interleaved rounds (one step of every runner per round, so machine noise
    hits them alike). Returns, per runner, the timed steps' ``times`` (s) and ``evals`` (warm-up excluded)."""
    for _ in range(warmup):
        for runner in runners.values():
            runner.step()
    out = {name: {"times": [], "evals": []} for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            out[name]["times"].append(runner.step())
            out[name]["evals"].append(runner.evals[-1])
    return out


def time_variants(args, device, variants: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """One timing run: fresh runners for ``variants``, timed by ``time_runners``. Returns plain numbers
    (per variant ``times``, ``evals``, ``params``); nothing built here outlives the call."""
    variants = variants or {n: VARIANTS[n] for n in DEFAULT_VARIANTS}
    runners = {name: StepRunner([*base_overrides(args), *ov], device, args.mixed_precision)
               for name, ov in variants.items()}  # fmt: skip
    out = time_runners(runners, args.warmup, args.repeats)
    for name, runner in runners.items():
        out[name]["params"] = sum(p.numel() for p in runner.model.parameters())
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
    from fewstep.validate import check_known_keys, check_model_data

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


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4, method="inclusive")  # within [min, max] even for few values
    return [q[0], q[2]]


def _iqr(xs: list[float]) -> float:
    q1, q3 = _quartiles(xs)
    return q3 - q1


def measure_variant_memory(overrides: list[str], mixed_precision: str, device, steps: int = 3) -> dict:
    """One variant's memory, measured in isolation: in a fresh subprocess on every device, so no model,
    optimizer or EMA from the timing loop (or from another variant) is resident. Returns the child's
    ``peak_memory_mb`` and ``resident_before_mb``, see ``variant_memory_here``."""
    code = "import sys; from fewstep.bench import _memory_child; _memory_child(*sys.argv[1:])"
    # glibc is told to return freed large blocks at once (MALLOC_MMAP_THRESHOLD_) so RSS follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(overrides), mixed_precision, str(device), str(steps)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_child(overrides_json: str, mixed_precision: str, device: str, steps: str) -> None:
    result = variant_memory_here(json.loads(overrides_json), mixed_precision, torch.device(device), int(steps))
    print(json.dumps(result))


def live_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages Python can reach in this process (CPU and GPU)."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), obj.device.type)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


RESIDENT_LIMIT = 2**20  # bytes of tensors a process may hold before a memory measurement (a fresh one: ~0)


def variant_memory_here(overrides: list[str], mixed_precision: str, device: torch.device, steps: int = 3) -> dict:
    """Measure one variant in this process, which must hold no other tensors (at most ``RESIDENT_LIMIT``
    bytes, else RuntimeError; ``measure_variant_memory`` runs it in a fresh process):
    ``resident_before_mb`` is what was resident before the runner was built.

    CUDA: ``max_memory_allocated`` over ``steps`` steps after one warm-up step (weights, optimizer state,
    EMA and the step's activations). CPU: peak RSS growth over ``steps`` steps after one warm-up step,
    sampled every 0.2 ms (the memory a step needs beyond the resident model, optimizer and data)."""
    import threading

    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else live_tensor_bytes()
    if before > RESIDENT_LIMIT:
        raise RuntimeError(
            f"{before / 2**20:.1f} MiB of tensors already resident: measure each variant alone "
            "(measure_variant_memory runs it in a fresh process)"
        )
    if device.type == "cuda":
        runner = StepRunner(overrides, device, mixed_precision)
        runner.step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            runner.step()
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "resident_before_mb": before / 2**20}
    runner = StepRunner(overrides, device, mixed_precision)
    runner.step()
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    base = rss()
    peak, done = [base], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(steps):
        runner.step()
    done.set()
    watcher.join()
    return {"peak_memory_mb": (peak[0] - base) / 2**20, "resident_before_mb": before / 2**20}


@torch.no_grad()
def bench_sampling(args, device) -> dict:
    from fewstep.data.base import cond_to
    from fewstep.samplers.euler import EulerSampler

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
    from fewstep.train import train

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


def _spread_cells(quartiles: list[float], run_medians: list[float]) -> tuple[str, str]:
    """``q1–q3`` and ``m1 / m2 / ...`` of a ratio's spread, for the Markdown tables."""
    return f"{quartiles[0]:.2f}–{quartiles[1]:.2f}", " / ".join(f"{x:.2f}" for x in run_medians)


def _compile_table(objectives: dict[str, dict]) -> list[str]:
    """compare_compile: each ``<name>_compiled`` against its eager ``<name>`` (same-round ratios); none: []."""
    compiled = {n.removesuffix("_compiled"): r for n, r in objectives.items() if "ratio_vs_eager" in r}
    if not compiled:
        return []
    lines = [
        "",
        "## trainer.compile: compiled / eager",
        "",
        "| objective | eager step (ms) | compiled step (ms) | compiled / eager | IQR | per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in compiled.items():
        iqr, per_run = _spread_cells(r["ratio_vs_eager_quartiles"], r["ratio_vs_eager_run_medians"])
        lines.append(
            f"| {name} | {objectives[name]['step_time_s'] * 1000:.2f} | {r['step_time_s'] * 1000:.2f} | "
            f"{r['ratio_vs_eager']:.2f} | {iqr} | {per_run} |"
        )
    lines += [
        "",
        "compiled / eager: median of the per-round ratios (the compiled step over the eager step of the same "
        "round), their quartiles and each run's median.",
    ]
    return lines


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# fewstep benchmark ({result['device']}, {result['config']})", ""]
    lines += [
        "## Training step",
        "",
        "| objective | step time (ms) | × flow matching | ratio IQR | ratio min–max | ratio per run "
        "| network evals / step | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if result.get("isolated") or result.get("estimated"):
        lines[-2:] = _table([{"objective": k, **r} for k, r in result["objectives"].items()])
    else:
        for name, r in result["objectives"].items():
            iqr, per_run = _spread_cells(r["ratio_quartiles"], r["ratio_run_medians"])
            lo, hi = r["ratio_range"]
            lines.append(
                f"| {name} | {r['step_time_s'] * 1000:.2f} | {r['ratio_vs_flow_matching']:.2f} | {iqr} | "
                f"{lo:.2f}–{hi:.2f} | {per_run} | {r['evals_per_step']:.2f} | {r['peak_memory_mb']:.1f} |"
            )
        lines += [
            "",
            f"Step time: median of {next(iter(result['objectives'].values()))['timed_steps']} timed steps "
            f"({result['runs']} runs × {result['repeats']} interleaved rounds after {result['warmup']} warm-up rounds "
            "each). "
            "× flow matching: median of the per-round ratios (a step over the flow-matching step of the same round), "
            "their quartiles, range and each run's median. Network evals: mean over the timed steps. Peak memory: "
            "each variant alone in a fresh process.",
            *_compile_table(result["objectives"]),
        ]
    if "sampling" in result:
        lines += [
            "",
            "## Sampling",
            "",
            "| sampler | steps | latency / image (ms, batch 1) | images/s (batch "
            f"{result['sample_batch']}) | × Euler 50 |",
            "|---|---|---|---|---|",
        ]
        for name, r in result["sampling"].items():
            lines.append(
                f"| {name} | {r['steps']} | {r['latency_ms_per_image']:.2f} | {r['images_per_s']:.0f} | "
                f"{r['speedup_vs_euler_50']:.1f} |"
            )
    if result.get("quality"):
        lines += ["", f"## Quality at equal wall-clock budget ({result['quality_budget_s']} s of training)", ""]
        lines += ["| objective | steps | sampler | " + " | ".join(result["quality_metrics"]) + " |"]
        lines += ["|---|---|---|" + "---|" * len(result["quality_metrics"])]
        for name, r in result["quality"].items():
            for method, metrics in r["eval"].items():
                vals = " | ".join(f"{metrics.get(k, float('nan')):.3g}" for k in result["quality_metrics"])
                lines.append(f"| {name} | {r['steps']} | {method} | {vals} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_kv(argv, DEFAULTS, USAGE)
    from fewstep.errors import FewstepError

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


if __name__ == "__main__":
    from fewstep.errors import run_cli

    run_cli(main)
