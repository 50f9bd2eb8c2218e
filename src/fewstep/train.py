"""The one training loop (Accelerate). It knows four interfaces and nothing else:
``Objective.loss``, ``Teacher`` (``bind``/``update``/``model``), ``Sampler.sample`` and the model
call ``f(x_t, t, tt, cond)``. No objective-specific branches live here: an objective that trains more
networks (DMD2) declares them (``Objective.setup``/``networks``) and which of them step at a step
(``Objective.stepping``); the loop builds their optimizers, wraps, checkpoints and averages them by name.

EMA order: the teacher is updated once per optimizer step, before the step's first micro-batch.
The student's weights do not change between that point and its forward pass, so this equals the
reference order (update right after the student forward, before the teacher passes). Under
gradient accumulation every micro-batch of a step sees the same, once-updated teacher.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig

from fewstep import checkpoint as ckpt_io
from fewstep.data.base import cond_to
from fewstep.distributed import local_numel, strategy_for
from fewstep.errors import FewstepError
from fewstep.generate import final_outputs, guidance_null, sample_in_chunks, to_images
from fewstep.logging.grids import save_samples
from fewstep.logging.writers import MetricsWriter, to_float
from fewstep.models import build_model
from fewstep.models.family import bind_guidance
from fewstep.validate import validate

log = logging.getLogger("fewstep")


class TrainingAborted(FewstepError, RuntimeError):
    pass


class ShardingUnsupported(FewstepError, RuntimeError):
    pass


class RunFinished(FewstepError):
    """The run dir's checkpoint is already at ``trainer.max_steps`` and its summary is written: nothing to train."""


def finished_problem(resume_from: Path | None, run_dir: Path, max_steps: int, time_limit_s: float = 0.0) -> str | None:
    """Why re-running this command would only redo a finished run (None: there is training left to do). A run
    whose newest checkpoint is at ``max_steps`` (or past it) and which wrote ``summary.json`` is finished: resuming
    it would train nothing and re-evaluate over its samples and summary. So is a run that ended at its
    ``trainer.time_limit_s`` budget, relaunched with the same budget (a time-budgeted sweep launched again would
    otherwise train every point for another budget)."""
    if resume_from is None or not (run_dir / "summary.json").exists():
        return None
    step = ckpt_io.verify(resume_from)["step"]
    if step < max_steps:
        try:
            budget = json.loads((run_dir / "summary.json").read_text()).get("time_limit_s")
        except (OSError, ValueError):
            return None
        if not time_limit_s or budget != time_limit_s:
            return None
        return (
            f"{run_dir} already trained its trainer.time_limit_s={time_limit_s:g} budget (stopped at step {step}); "
            "its checkpoints, samples and summary are left as they are. To train on for another budget, give "
            "another trainer.time_limit_s (0: up to trainer.max_steps); to evaluate or sample again, "
            f"python -m fewstep.eval run_dir={run_dir}; to train a new run, give another hydra.run.dir"
        )
    return (
        f"{run_dir} is already finished at step {step} (trainer.max_steps={max_steps}); its checkpoints, samples and "
        "summary are left as they are. "
        f"To train on, raise trainer.max_steps; to evaluate or sample again, python -m fewstep.eval run_dir={run_dir} "
        f"or python -m fewstep.sample run_dir={run_dir}; to train a new run, give another hydra.run.dir"
    )


class FinishedRunCheck(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): a single run launched into a finished run dir
    is refused (one ``error:`` line, exit status 2) at ``on_run_start``, before Hydra's ``run_job`` writes the
    launch's ``.hydra/{config,hydra,overrides}.yaml`` and job log into that dir, so the finished run's record of
    what it was stays byte-identical. :func:`train` refuses it as well (in-process callers, sweep points); anything
    this check cannot read (a bad ``trainer.resume``, a broken checkpoint) is left to :func:`train` to report."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        import sys

        try:
            run_dir = Path(str(config.hydra.run.dir)).resolve()
            # quiet: train() reports a skipped corrupt checkpoint, once
            resume_from = ckpt_io.resolve_resume(config.trainer.resume, run_dir, warn=lambda _: None)
            limit = float(config.trainer.get("time_limit_s", 0) or 0)
            problem = finished_problem(resume_from, run_dir, int(config.trainer.max_steps), limit)
        except Exception:  # noqa: BLE001 - train() reports whatever is wrong, with its own message
            return
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)


def sharding_problem(fsdp_requested: bool) -> str | None:
    """Why this run cannot start under the Accelerate config it was launched with (None: no FSDP config).
    ``fsdp_requested``: ``accelerate launch`` got an FSDP config or ``--use_fsdp`` (``ACCELERATE_USE_FSDP``).

    fewstep shards the networks itself (``trainer.distributed=fsdp``: torch FSDP2 per transformer block, the same on
    CPU and GPU, full-state checkpoints; :mod:`fewstep.distributed`). Accelerate's own FSDP would wrap the model a
    second way, and on a CPU-only machine Accelerate 1.15 never shards (its FSDP plugin raises "no available
    devices" with ``fsdp_sync_module_states``, else the processes silently run as DDP replicas): refused, before
    the Accelerator exists, with the launch to use instead."""
    if not fsdp_requested:
        return None
    return (
        "the accelerate config asks for Accelerate's FSDP; fewstep shards the model itself: launch with "
        "--multi_gpu --num_processes N (a plain multi-process config) and trainer.distributed=fsdp"
    )


def peak_host_memory_mb() -> float:
    """This process's peak resident host memory (RSS) so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# How long and how a run goes, not what it trains: changed on a resume without a warning.
RUN_LENGTH_KEYS = (
    "trainer.max_steps", "trainer.time_limit_s", "trainer.resume", "trainer.torch_threads", "trainer.checkpoint_every",
    "trainer.sample_every", "trainer.log_every", "trainer.keep_last", "trainer.evaluate", "trainer.final_nfe",
    "trainer.baseline_steps", "trainer.init_from", "logger.", "trainer.grid_size", "trainer.max_nonfinite",
    # speed, memory and sharding (the same weights): a resume may change them to fit or speed up a run
    "trainer.compile", "trainer.distributed", "model.gradient_checkpointing", "model.no_grad_chunk",
    "data.decode_device", "launch.", "optimize_metric",  # launch.*: documentation; a sweeper's return value
)  # fmt: skip


def _run_length_key(key: str) -> bool:
    """``key`` is one of RUN_LENGTH_KEYS, or under one of its groups (``logger.``): ``trainer.init_from`` is,
    ``trainer.init_from_ema`` (which weights DMD2's rebuilt real score takes) is not."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RUN_LENGTH_KEYS)


def run_settings(cfg: DictConfig) -> dict:
    """The run's settings as flat ``key: value`` strings (recorded in each checkpoint's state.json)."""
    from omegaconf import OmegaConf

    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation only a Hydra job resolves: compare it as written
        tree = OmegaConf.to_container(cfg, resolve=False)
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif not _run_length_key(f"{prefix}{key}"):
                flat[f"{prefix}{key}"] = str(value)

    walk(tree, "")
    return flat


GLOBAL_BATCH = "global batch (data.batch_size × trainer.grad_accum × processes)"


def with_global_batch(settings: dict, processes: int) -> dict:
    """``settings`` with the per-process batch and accumulation folded into the global batch: a run resumed on
    another number of processes with the same global batch (2 processes → 1 with ``trainer.grad_accum=2``,
    docs/families.md) trains what it trained."""
    out = {k: v for k, v in settings.items() if k not in ("data.batch_size", "trainer.grad_accum")}
    try:
        out[GLOBAL_BATCH] = str(int(settings["data.batch_size"]) * int(settings["trainer.grad_accum"]) * processes)
    except (KeyError, ValueError):
        return dict(settings)
    return out


def init_source(tr) -> str | None:
    """``trainer.init_from`` as an absolute path (recorded in each checkpoint; None: the run started fresh)."""
    return str(Path(tr.init_from).resolve()) if tr.get("init_from") else None


def changed_settings(was: dict | None, now: dict, limit: int = 6) -> list[str]:
    """``key=old (now new)`` for the settings a resumed checkpoint was trained with that differ now."""
    if not was:
        return []  # a checkpoint written before settings were recorded
    keys = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    out = [f"{k}={was.get(k, '(unset)')} (now {now.get(k, '(unset)')})" for k in keys[:limit]]
    return out + ([f"and {len(keys) - limit} more"] if len(keys) > limit else [])


def reset_peak_memory() -> None:
    """Start this run's peak memory from now: a sweep's points run one after another in one process, and each
    reports its own peak (Linux: ``/proc/self/clear_refs`` resets the RSS high-water mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the process's peak so far
        pass


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_host_memory_mb()


def build_components(cfg: DictConfig, device=None, bind_teacher: bool = True):
    """Data, objective, model, teacher and sampler from a composed config (validated first). ``bind_teacher=False``
    (training, which binds it once the model is placed) leaves the teacher unbound: an EMA teacher binding here
    copies every trainable weight, a second whole model in host memory while the networks are built."""
    data = instantiate(cfg.data)
    objective = instantiate(cfg.objective, _convert_="all")
    model = build_model(cfg.model, data, objective)
    if device is not None:
        model.to(device)
    if cfg.trainer.compile:
        # In place: the module keeps its parameters and state-dict keys (checkpoints, EMA, export unchanged);
        # the teacher's call over swapped-in weights (Teacher._call_with) goes through the same compiled forward.
        model.compile()
    teacher = instantiate(cfg.teacher)
    if bind_teacher:
        teacher.bind(model)
    sampler = instantiate(cfg.sampler, _convert_="all")
    bind_guidance(sampler, model)
    return data, objective, model, teacher, sampler


def make_optimizer(params, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where the device and dtypes allow it (one kernel per step instead of a Python loop
    over parameters: 9% of a digits step on the CPU), else the default implementation."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def lr_factor(step: int, tr) -> float:
    """LR multiplier: linear warm-up, then constant, cosine or linear decay to ``min_lr_ratio`` at max_steps."""
    warm = 1.0 if tr.warmup_steps <= 0 else min(1.0, (step + 1) / tr.warmup_steps)
    if tr.lr_schedule == "constant":
        return warm
    span = max(tr.max_steps - tr.warmup_steps, 1)
    progress = min(max(step - tr.warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tr.lr_schedule == "cosine" else 1.0 - progress
    return warm * (tr.min_lr_ratio + (1 - tr.min_lr_ratio) * shape)


def slot_seed(seed: int, step: int, slot: int, n_slots: int) -> int:
    """The RNG seed of one micro-batch: a function of the run seed and the slot's global index only."""
    return (seed * 1_000_003 + step * n_slots + slot) % (2**63)


class Trainable(NamedTuple):
    """One trainable network of a run: the student, or a network an objective owns (``Objective.networks``)."""

    wrapped: Any  # what the objective calls (Accelerate-prepared)
    module: torch.nn.Module  # unwrapped: what is averaged and checkpointed
    optimizer: Any
    scheduler: Any
    params: list
    average: Any  # its EMA (the student's: the teacher) or None


class _StopRequest:
    """SIGINT/SIGTERM: finish the current step, write a checkpoint, exit."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: finishing this step and writing a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed

    cfg = validate(cfg)
    settings = run_settings(cfg)
    tr = cfg.trainer
    if tr.torch_threads > 0:
        torch.set_num_threads(tr.torch_threads)
    problem = sharding_problem(os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
    if problem is not None:  # before the Accelerator: its FSDP plugin raises on CPU
        raise ShardingUnsupported(problem)
    from accelerate.utils import DistributedDataParallelKwargs
    from hydra.utils import get_class

    # A model some of whose trainable parameters never reach the output (Qwen-Image's last text stream) needs
    # DDP's unused-parameter search, else the second step stops with "Expected to have finished reduction".
    unused = getattr(get_class(cfg.model._target_), "ddp_find_unused_parameters", False)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
    gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=tr.mixed_precision, cpu=not gpu, kwargs_handlers=handlers)
    settings = with_global_batch(settings, accelerator.num_processes)
    reset_peak_memory()  # after the Accelerator set this rank's GPU: before, every rank made a context on GPU 0
    strategy = strategy_for(accelerator, tr.distributed, tr.mixed_precision)
    main = accelerator.is_main_process
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = [str(Path(run_dir).resolve())]
    if accelerator.num_processes > 1:
        broadcast_object_list(run_dir)  # every rank writes under rank 0's run dir
    run_dir = Path(run_dir[0])
    ckpt_root = run_dir / "checkpoints"
    resume_from = ckpt_io.resolve_resume(tr.resume, run_dir)
    finished = finished_problem(resume_from, run_dir, tr.max_steps, tr.time_limit_s)
    if finished is not None:  # before anything is built or written
        raise RunFinished(finished)

    set_seed(tr.seed)
    with strategy.building():  # under FSDP only rank 0 reads weights; the others build on meta (filled in place)
        data, objective, model, teacher, sampler = build_components(cfg, bind_teacher=False)  # bound once placed
        if tr.init_from:
            ckpt_io.load_initial_weights(tr.init_from, model, use_ema=tr.init_from_ema)
    objective.setup(model, data)  # the objective's own networks (none for single-network objectives)
    owned = dict(objective.networks)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Laid out (sharded under FSDP) before the optimizers are built over their parameters.
    modules = [strategy.place(model), *(strategy.place(net.module) for net in owned.values())]
    params = [p for p in model.parameters() if p.requires_grad]
    rss = peak_host_memory_mb()
    log.debug("rank %d: peak host memory %.0f MB once built and placed", accelerator.process_index, rss)

    def optimizer_for(trainable, lr):
        opt = make_optimizer(trainable, lr=lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay, eps=tr.eps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tr))

    optimizer, scheduler = optimizer_for(params, tr.lr)
    net_params = {n: [p for p in module.parameters() if p.requires_grad] for n, module in zip(owned, modules[1:])}
    net_opts = {n: optimizer_for(net_params[n], owned[n].lr or tr.lr) for n in owned}
    prepared, optimizers = strategy.prepare(modules, [optimizer, *(net_opts[n][0] for n in owned)])
    wrapped, optimizer = prepared[0], optimizers[0]
    student = strategy.unwrap(wrapped)
    teacher.bind(student)
    groups = {"student": Trainable(wrapped, student, optimizer, scheduler, params, teacher)}
    for i, name in enumerate(owned):
        net_wrapped, net_opt = prepared[1 + i], optimizers[1 + i]
        average = instantiate(cfg.teacher) if owned[name].ema else None
        if average is not None:
            average.bind(strategy.unwrap(net_wrapped))
        groups[name] = Trainable(
            net_wrapped, strategy.unwrap(net_wrapped), net_opt, net_opts[name][1], net_params[name], average
        )
    extra = {n: g for n, g in groups.items() if n != "student"}
    objective.bind({n: g.wrapped for n, g in extra.items()}, {n: g.average for n, g in extra.items() if g.average})
    networks = {n: (g.module, g.optimizer, g.scheduler, g.average) for n, g in extra.items()}  # for checkpoints
    # Same initial weights on every rank (seeded above); training noise is reseeded per micro-batch below.
    set_seed(tr.seed + accelerator.process_index)

    start_step, data_position, nonfinite_total = 0, 0, 0
    resumed_window: tuple[dict, int] = ({}, 0)  # the metrics window open at the checkpoint (sums, steps)
    if resume_from is not None:
        try:
            state = ckpt_io.load_checkpoint(
                resume_from, student, teacher, optimizer, scheduler, rank=accelerator.process_index, networks=networks
            )
        except ckpt_io.CheckpointError as err:  # e.g. an old run dir reused with another model or objective
            raise ckpt_io.CheckpointError(
                f"{err} (trainer.resume={tr.resume} found it; to train this config from scratch give another "
                "hydra.run.dir or trainer.resume=none; to start from that run's weights only, trainer.init_from=RUN)"
            ) from None
        start_step, data_position = state["step"], state["data_position"]
        nonfinite_total = state.get("nonfinite_total", 0)
        resumed_window = (state.get("log_window", {}), state.get("log_window_n", 0))
        if accelerator.scaler is not None and state.get("grad_scaler"):  # fp16: the loss scale reached so far
            accelerator.scaler.load_state_dict(state["grad_scaler"])
        if main:
            log.info("resumed from %s at step %d", resume_from, start_step)
            changed = changed_settings(state.get("settings"), settings)
            if changed:
                log.warning(
                    "%s was trained with other settings: %s; trainer.resume=%s trains on from it (to train this "
                    "config from scratch, give another hydra.run.dir or trainer.resume=none)",
                    resume_from, ", ".join(changed), tr.resume,
                )  # fmt: skip
            # loaded above (what the checkpoint does not hold keeps it, e.g. DMD2's real score); a checkpoint of a run
            # that started from this init_from (a plain resume of it) is no surprise
            if tr.init_from and state.get("init_from") != init_source(tr):
                log.warning(
                    "trainer.init_from=%s: the resumed checkpoint's weights replace its weights (trainer.resume=%s "
                    "found %s); to start from init_from, give another hydra.run.dir or trainer.resume=none",
                    tr.init_from, tr.resume, resume_from,
                )  # fmt: skip
            was, now = state.get("lr_factor"), lr_factor(start_step, tr)
            if was is not None and abs(was - now) > 1e-9:  # e.g. trainer.max_steps raised under a decaying schedule
                log.warning(
                    "the LR at step %d jumps from %.3g to %.3g of trainer.lr: trainer.lr_schedule=%s is recomputed "
                    "over this call's trainer.max_steps=%d (or warmup/schedule) that differs from the checkpointed "
                    "run's; keep them to continue its schedule",
                    start_step, was, now, tr.lr_schedule, tr.max_steps,
                )  # fmt: skip
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
    writer = MetricsWriter(run_dir, cfg, resume_step=start_step if resume_from else None, enabled=main)
    if main:
        log.info(
            "run dir %s | %s on %s | %d params (%d trainable) | %d process(es) on %s, %s",
            run_dir, type(objective).__name__, type(student).__name__, n_params, n_train,
            accelerator.num_processes, accelerator.device, strategy.name,
        )  # fmt: skip

    device = accelerator.device
    grad_accum = tr.grad_accum
    # A global batch has world x grad_accum slots; micro-batch m on rank r fills slot m * world + r. Each slot
    # has its own data stream and draws its noise from a seed keyed by (step, slot), so the numbers a row sees
    # do not depend on how the global batch is split: 2 processes equal 1 process with grad_accum 2.
    world, rank = accelerator.num_processes, accelerator.process_index
    slots = [micro * world + rank for micro in range(grad_accum)]
    streams = [data.batches(tr.seed, data_position, slot, world * grad_accum) for slot in slots]
    max_norm = tr.max_grad_norm if tr.max_grad_norm > 0 else math.inf

    def save(step: int) -> None:
        rng_states = [ckpt_io.rng_state()]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)
        ckpt_io.save_checkpoint(  # every rank (sharded state is gathered), rank 0 writes
            ckpt_root, step, student, teacher, optimizer, scheduler, data_position,
            extra={"nonfinite_total": nonfinite_total, "log_window": {k: to_float(v) for k, v in window.items()},
                   "lr_factor": lr_factor(step, tr), "settings": settings, "init_from": init_source(tr),
                   "log_window_n": window_n,
                   **({"grad_scaler": accelerator.scaler.state_dict()} if accelerator.scaler is not None else {})},
            rng_states=rng_states, networks=networks, write=main,
        )  # fmt: skip
        if main:
            ckpt_io.prune(ckpt_root, tr.keep_last)
        accelerator.wait_for_everyone()

    def sampling_model():
        return teacher.sampling_model

    progress = None
    if main and cfg.logger.progress:
        from tqdm import tqdm

        progress = tqdm(total=tr.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    window: dict[str, float] = dict(resumed_window[0])
    window_n, consecutive_bad, step = resumed_window[1], 0, start_step
    t_start = time.perf_counter()
    t_window = t_start
    stopped_by, time_limited = None, False
    student.train()
    with _StopRequest() as stop:
        while step < tr.max_steps:
            stepping = [groups[n] for n in objective.stepping(step)]
            for g in stepping:
                if g.average is not None:
                    g.average.update(g.module, step)
            logs: dict = {}
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                batch = next(streams[micro]).to(device)
                torch.manual_seed(slot_seed(tr.seed, step, slots[micro], world * grad_accum))
                sync = ExitStack()  # spans the backward too: FSDP reads the sync flag there
                if micro < grad_accum - 1:
                    for g in groups.values():
                        sync.enter_context(strategy.no_sync(g.wrapped))
                with sync:
                    with accelerator.autocast():
                        loss, micro_logs = objective.loss(wrapped, teacher, batch, step)
                    accelerator.backward(loss if grad_accum == 1 else loss / grad_accum)
                if grad_accum == 1:  # the same numbers, without the accumulation ops
                    loss_sum, logs = loss.detach().float(), micro_logs
                    continue
                loss_sum += loss.detach().float() / grad_accum
                for k, v in micro_logs.items():
                    logs[k] = v if k == "times" else logs.get(k, 0.0) + v / grad_accum
            grad_norm = strategy.clip_grad_norm_([p for g in stepping for p in g.params], max_norm)
            finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))
            if finite:
                if accelerator.scaler is not None and len(stepping) > 1:
                    # fp16 with several optimizers: each AcceleratedOptimizer.step would run its own scaler.update(),
                    # after which the next optimizer's (already unscaled) gradients are unscaled again. One update.
                    for g in stepping:
                        accelerator.scaler.step(g.optimizer.optimizer)
                    accelerator.scaler.update()
                else:
                    for g in stepping:
                        g.optimizer.step()
                with warnings.catch_warnings():  # a network not stepped yet (DMD2's generator) follows too
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                    for g in groups.values():  # every network's LR follows the run's schedule on the training step
                        g.scheduler.step()  # (DMD2's generator, stepped every 6th step, still decays by max_steps)
                consecutive_bad = 0
            else:
                if accelerator.scaler is not None:  # fp16: the skipped step still backs the loss scale off (what
                    accelerator.scaler.update()  # optimizer.step would do), else every later step overflows
                nonfinite_total += 1
                consecutive_bad += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, consecutive_bad)
            for g in groups.values():
                g.optimizer.zero_grad(set_to_none=True)
            step += 1
            data_position += 1
            if consecutive_bad >= tr.max_nonfinite:
                raise TrainingAborted(
                    f"{consecutive_bad} non-finite steps in a row at step {step}: aborting, last good checkpoint kept "
                    "in checkpoints/; lower trainer.lr, enable trainer.max_grad_norm or check the data"
                )
            if finite:
                window["loss"] = window.get("loss", 0.0) + loss_sum
                window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float()
                for k, v in logs.items():
                    if k != "times":
                        window[k] = window.get(k, 0.0) + v
                window_n += 1
            if progress is not None:
                progress.update(1)
            if step % tr.log_every == 0 or step == tr.max_steps:
                now = time.perf_counter()
                row = {k: to_float(v) / max(window_n, 1) for k, v in window.items()}
                row.update(
                    lr=scheduler.get_last_lr()[0],
                    steps_per_s=(window_n or 1) / max(now - t_window, 1e-9),
                    nonfinite_skipped=nonfinite_total,
                )
                row = writer.log(step, row, logs.get("times"))
                if progress is not None:
                    progress.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", it_s=f"{row['steps_per_s']:.1f}")
                window, window_n, t_window = {}, 0, now
            if step % tr.sample_every == 0 and step < tr.max_steps and (main or strategy.every_rank_samples):
                student.eval()  # sample as final_outputs does (no dropout), then back to training
                _validation_grid(
                    run_dir, step, objective, sampler, sampling_model(), data, device, accelerator, writer, write=main
                )
                student.train()
            if step % tr.checkpoint_every == 0 and step < tr.max_steps:
                save(step)
            if stop.signal is not None:
                stopped_by = signal.Signals(stop.signal).name
                break
            if tr.time_limit_s > 0 and time.perf_counter() - t_start >= tr.time_limit_s:
                log.info("trainer.time_limit_s=%s reached at step %d", tr.time_limit_s, step)
                time_limited = True
                break
    wall = time.perf_counter() - t_start
    if progress is not None:
        progress.close()
    save(step)
    params_per_process, host_mb = [local_numel(student)], [round(peak_host_memory_mb(), 1)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        params_per_process, host_mb = gather_object(params_per_process), gather_object(host_mb)

    summary = {
        "steps": step,
        "start_step": start_step,
        "wall_time_s": wall,
        "steps_per_s": (step - start_step) / max(wall, 1e-9),
        "peak_memory_mb": peak_memory_mb(),
        "nonfinite_skipped": nonfinite_total,
        "params": n_params,
        "trainable_params": n_train,
        "params_per_process": params_per_process,  # elements each process holds: all of them unless sharded
        "peak_host_memory_mb": host_mb,  # each process's peak RSS up to the last checkpoint (rank order)
        "distributed": strategy.name,
        "num_processes": accelerator.num_processes,
        "device": str(device),
        "objective": type(objective).__name__,
        "run_dir": str(run_dir),
    }
    if stopped_by is not None:
        summary["stopped_by"] = stopped_by
    if time_limited:  # ended at its time budget: launched again with the same budget it is finished
        summary["time_limit_s"] = tr.time_limit_s
    if stopped_by is None and (main or strategy.every_rank_samples):
        student.eval()
        results = final_outputs(
            run_dir, sampling_model(), sampler, data, tr.final_nfe, tr.baseline_steps, device,
            evaluate=tr.evaluate, grid_size=tr.grid_size, autocast=accelerator.autocast, log=log.info, write=main,
        )  # fmt: skip
        summary["eval"] = results
    if main:
        last = _last_metrics(run_dir)
        if window_n > 0:  # stopped between log steps (time limit, signal): the final terms are the open window's
            last = {k: to_float(v) / window_n for k, v in window.items()}
        summary.update({k: last[k] for k in last if k.startswith(("loss", "nfe/"))})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        writer.finish(summary)
        ran = f"{step} steps in {wall:.1f} s ({summary['steps_per_s']:.1f} steps/s)"
        if start_step:  # resumed: the count and rate are of the steps this call ran
            ran = f"steps {start_step} to {step} ({step - start_step} in {wall:.1f} s, {summary['steps_per_s']:.1f}/s)"
        log.info("done: %s; summary in %s", ran, run_dir / "summary.json")
    accelerator.wait_for_everyone()
    if stopped_by is not None:
        raise SystemExit(130 if stopped_by == "SIGINT" else 143)
    return summary


def _validation_grid(run_dir, step, objective, sampler, model_fn, data, device, accelerator, writer, write=True):
    """Samples at the objective's ``target_step_count`` steps with the run's sampler, saved as a grid (when
    ``write``: the other ranks of a sharded run take part in the forward passes only)."""
    n = 50
    noise = torch.randn(n, *data.shape, generator=torch.Generator().manual_seed(0)).to(device)
    cond = cond_to(data.grid_conds(n), device)
    steps, null = objective.target_step_count, guidance_null(sampler, data, n, device)
    x = sample_in_chunks(sampler, model_fn, noise, cond, steps, null_cond=null, autocast=accelerator.autocast)
    if not write:
        return
    image = to_images(data, x, device)
    path = save_samples(
        image, Path(run_dir) / "samples" / f"step_{step:07d}.png", title=f"step {step}", nrow=10, data=data
    )
    writer.log_images(step, {"samples": path})


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}
