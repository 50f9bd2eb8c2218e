"""One objective's training step as the training loop runs it, timed or measured on its own: :class:`StepRunner`
(built by :func:`fewstep.training.trainables.build_trainables`, the loop's builder), the timing of several runners
interleaved, each variant's memory in a fresh process, and the child processes the bench command starts."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from fewstep.config.schema import compose_config
from fewstep.training.distributed import Local
from fewstep.training.memory import peak_memory_mb
from fewstep.training.threads import set_torch_threads
from fewstep.training.trainables import STUDENT, build_components, build_trainables, make_optimizer


def compose(overrides: list[str]):
    return compose_config(overrides)


def apply_threads(cfg) -> None:
    """``trainer.torch_threads`` (given in ``overrides=[...]``) as the training loop applies it: 0 chooses the
    count from the cores free now (:mod:`fewstep.training.threads`), once per process: every variant of one
    timing run steps at the same count. Without this the bench timed at torch's default thread count whatever
    the overrides said."""
    global _AUTO_THREADS
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)
    else:
        _AUTO_THREADS = _AUTO_THREADS or set_torch_threads(0)  # not re-chosen after REUSE_S: one count per bench
        torch.set_num_threads(_AUTO_THREADS.count)


_AUTO_THREADS = None


def _fixed_lr_optimizer(params: list, lr: float | None):
    return make_optimizer(params, lr=1e-4), None  # AdamW as the loop's; the LR schedule costs nothing to time


class StepRunner:
    """One objective's full optimizer step on a fixed model/data configuration, built as the training loop builds
    it (:func:`build_trainables`) on one process. ``evals`` records every step's network evaluations (forward
    rows / batch)."""

    def __init__(self, overrides, device: torch.device, mixed_precision: str):
        """``overrides``: the command-line overrides of the variant, or its composed config (a DictConfig)."""
        cfg = compose(overrides) if isinstance(overrides, list | tuple) else overrides
        apply_threads(cfg)
        torch.manual_seed(0)
        with Local(device).building():  # pretrained weights straight onto the device
            self.data, self.objective, model, self.teacher, self.sampler = build_components(
                cfg, device=device, bind_teacher=False
            )
        self.objective.setup(model, self.data)  # networks an objective owns (DMD2's fake score), as the loop
        self.trainables = build_trainables(cfg, self.objective, model, self.teacher, Local(device), _fixed_lr_optimizer)
        self.model = self.trainables[STUDENT].module
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
        for trainable in self.trainables.values():
            if trainable.average is not None:
                trainable.average.update(trainable.module, self.step_index)
        ctx = self.autocast() if self.autocast else torch.autocast(self.device.type, enabled=False)
        with ctx:
            loss, logs = self.objective.loss(self.model, self.teacher, batch, self.step_index)
        loss.backward()
        for name in self.objective.stepping(self.step_index):  # the others' gradients are discarded
            torch.nn.utils.clip_grad_norm_(self.trainables[name].params, 1.0)
            self.trainables[name].optimizer.step()
        for trainable in self.trainables.values():
            trainable.optimizer.zero_grad(set_to_none=True)
        sync()
        self.step_index += 1
        self.evals.append(float(logs["nfe/per_step"]))
        return time.perf_counter() - t0


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4, method="inclusive")  # within [min, max] even for few values
    return [q[0], q[2]]


def _iqr(xs: list[float]) -> float:
    q1, q3 = _quartiles(xs)
    return q3 - q1


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
        error = str(err).strip().splitlines()[0][:300]
        print(json.dumps({"oom": True, "error": error, "peak_memory_mb": peak_memory_mb(dev)}))
        return
    params = list(runner.model.parameters())
    print(json.dumps({
        "step_time_s": statistics.median(times),
        "step_time_iqr_s": _iqr(times),
        "step_time_mean_s": statistics.fmean(times),  # a whole critic/generator cycle for DMD2-style schedules
        "evals_per_step": statistics.fmean(evals),
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "peak_memory_mb": peak_memory_mb(dev),
    }))  # fmt: skip


def measure_variant_memory(overrides: list[str], mixed_precision: str, device, steps: int = 3) -> dict:
    """One variant's memory, measured in isolation: in a fresh subprocess on every device, so no model,
    optimizer or EMA from the timing loop (or from another variant) is resident. Returns the child's
    ``peak_memory_mb`` and ``resident_before_mb``, see ``variant_memory_here``."""
    code = "import sys; from fewstep.bench.runner import _memory_child; _memory_child(*sys.argv[1:])"
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
