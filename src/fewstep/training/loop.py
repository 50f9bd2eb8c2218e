"""The one training loop (Accelerate). It knows four interfaces and nothing else:
``Objective.loss``, ``Teacher`` (``bind``/``update``/``model``), ``Sampler.sample`` and the model call
``f(x_t, t, tt, cond)``. No objective-specific branches live here: an objective that trains more networks (DMD2)
declares them (``Objective.setup``/``networks``) and which of them step at a step (``Objective.stepping``); the
loop builds their optimizers, wraps, checkpoints and averages them by name (:mod:`fewstep.training.trainables`).

:func:`train` drives a :class:`Trainer` through named phases: set up (accelerator, run dir, the trainables,
restore from a checkpoint), :meth:`Trainer.fit` (a short loop of :meth:`~Trainer.train_step`, each component
deciding when it acts: :meth:`~Trainer.log_metrics`, :meth:`~Trainer.sample_grid`, :meth:`~Trainer.save_checkpoint`)
and :meth:`Trainer.finish` (the last checkpoint, final grids and evaluation, ``summary.json``).

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
import signal
import time
import warnings
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from hydra.utils import get_class
from omegaconf import DictConfig

from fewstep.config.validate import validate
from fewstep.data.base import cond_to
from fewstep.data.prefetch import Prefetcher
from fewstep.errors import FewstepError
from fewstep.logging.grids import save_samples
from fewstep.logging.writers import MetricsWriter, to_float
from fewstep.training import checkpoint as ckpt_io
from fewstep.training.distributed import local_numel, strategy_for
from fewstep.training.memory import peak_host_memory_mb, peak_memory_mb, reset_peak_memory
from fewstep.training.outputs import Share, final_outputs, guidance_null, to_images
from fewstep.training.resume import (
    RunFinished,
    finished_problem,
    init_source,
    resume_warnings,
    run_settings,
    with_global_batch,
)
from fewstep.training.signals import StopRequest as _StopRequest
from fewstep.training.signals import handover_signals
from fewstep.training.threads import set_torch_threads
from fewstep.training.throughput import Throughput, device_peak_tflops
from fewstep.training.trainables import STUDENT, build_components, build_trainables, lr_factor, trainer_optimizer

log = logging.getLogger("fewstep")

__all__ = ["RunFinished", "Trainer", "TrainingAborted", "train"]


class TrainingAborted(FewstepError, RuntimeError):
    pass


class ShardingUnsupported(FewstepError, RuntimeError):
    pass


def sharding_problem(fsdp_requested: bool) -> str | None:
    """Why this run cannot start under the Accelerate config it was launched with (None: no FSDP config).
    ``fsdp_requested``: ``accelerate launch`` got an FSDP config or ``--use_fsdp`` (``ACCELERATE_USE_FSDP``).

    fewstep shards the networks itself (``trainer.distributed=fsdp``: torch FSDP2 per transformer block, the same on
    CPU and GPU, full-state checkpoints; :mod:`fewstep.training.distributed`). Accelerate's own FSDP would wrap the
    model a
    second way, and on a CPU-only machine Accelerate 1.15 never shards (its FSDP plugin raises "no available
    devices" with ``fsdp_sync_module_states``, else the processes silently run as DDP replicas): refused, before
    the Accelerator exists, with the launch to use instead."""
    if not fsdp_requested:
        return None
    return (
        "the accelerate config asks for Accelerate's FSDP; fewstep shards the model itself: launch with "
        "--multi_gpu --num_processes N (a plain multi-process config) and trainer.distributed=fsdp"
    )


def slot_seed(seed: int, step: int, slot: int, n_slots: int) -> int:
    """The RNG seed of one micro-batch: a function of the run seed and the slot's global index only."""
    return (seed * 1_000_003 + step * n_slots + slot) % (2**63)


class StepResult(NamedTuple):
    """One optimizer step: the loss (mean over micro-batches), the gradient norm, the objective's logs, whether
    both were finite (else the step was skipped)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    logs: dict
    finite: bool


class MetricsWindow:
    """The metrics summed since the last log row (a checkpoint keeps the open window, so a resumed run logs the
    same rows)."""

    def __init__(self, sums: dict | None = None, steps: int = 0):
        self.sums: dict = dict(sums or {})
        self.steps = steps
        self.started = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.sums["loss"] = self.sums.get("loss", 0.0) + result.loss
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + result.grad_norm.detach().float()
        for k, v in result.logs.items():
            if k != "times":
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def means(self) -> dict:
        return {k: to_float(v) / max(self.steps, 1) for k, v in self.sums.items()}

    def state(self) -> dict:
        return {"log_window": {k: to_float(v) for k, v in self.sums.items()}, "log_window_n": self.steps}


class Trainer:
    """One training run, in phases: ``Trainer(cfg)`` sets it up (validated config, accelerator, run dir, the
    trainables, restored from the run dir's checkpoint); :meth:`fit` trains; :meth:`finish` ends it."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path | None = None):
        self.cfg = cfg = validate(cfg)
        self.tr = tr = cfg.trainer
        settings = run_settings(cfg)
        self.threads = set_torch_threads(tr.torch_threads)  # 0: chosen from the cores free now (threads.py)
        self.accelerator = self._accelerator()
        self.settings = with_global_batch(settings, self.accelerator.num_processes)
        reset_peak_memory()  # after the Accelerator set this rank's GPU: before, every rank made a context on GPU 0
        self.strategy = strategy_for(self.accelerator, tr.distributed, tr.mixed_precision)
        # each rank writes its own shards (torch.distributed.checkpoint) instead of rank 0 the gathered whole
        self.sharded_checkpoints = tr.distributed == "fsdp" and tr.checkpoint_format != "full"
        self.pending_save = None  # a background save not committed yet (trainer.async_checkpoint)
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.run_dir = self._run_dir(run_dir)
        self.resume_from = ckpt_io.resolve_resume(tr.resume, self.run_dir)
        finished = finished_problem(self.resume_from, self.run_dir, tr.max_steps, tr.time_limit_s)
        if finished is not None:  # before anything is built or written
            raise RunFinished(finished)
        self._build()
        # Same initial weights on every rank (seeded above); training noise is reseeded per micro-batch.
        set_seed(tr.seed + self.accelerator.process_index)
        self.step = self.start_step = self.data_position = self.nonfinite_total = self.consecutive_bad = 0
        self.window = MetricsWindow()
        samples = int(cfg.data.get("batch_size", 0)) * self.accelerator.num_processes * tr.grad_accum
        self.throughput = Throughput(samples, device_peak_tflops(self.device, tr.peak_tflops), not tr.compile)
        if self.resume_from is not None:
            self.restore(self.resume_from)
        self._open_run_dir()
        self.prefetcher = None
        self.streams, self.slots = self._data_streams()

    # -- setup ----------------------------------------------------------------------------------------------
    def _accelerator(self) -> Accelerator:
        problem = sharding_problem(os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
        if problem is not None:  # before the Accelerator: its FSDP plugin raises on CPU
            raise ShardingUnsupported(problem)
        # A model some of whose trainable parameters never reach the output (Qwen-Image's last text stream) needs
        # DDP's unused-parameter search, else the second step stops with "Expected to have finished reduction".
        unused = getattr(get_class(self.cfg.model._target_), "ddp_find_unused_parameters", False)
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
        # how long a rank waits in a collective for the others (a checkpoint rank 0 writes, its evaluation)
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=self.tr.dist_timeout_s)))
        gpu = torch.cuda.is_available()
        return Accelerator(mixed_precision=self.tr.mixed_precision, cpu=not gpu, kwargs_handlers=handlers)

    def _run_dir(self, run_dir: str | Path | None) -> Path:
        """Rank 0's run dir (Hydra's output dir unless given), on every rank."""
        if run_dir is None:
            from hydra.core.hydra_config import HydraConfig  # only inside a Hydra job

            run_dir = HydraConfig.get().runtime.output_dir
        shared = [str(Path(run_dir).resolve())]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(shared)  # every rank writes under rank 0's run dir
        return Path(shared[0])

    def _build(self) -> None:
        """The components and the trainables (:func:`build_trainables`), from the run's seed."""
        cfg, tr = self.cfg, self.tr
        set_seed(tr.seed)
        with self.strategy.building():  # under FSDP only rank 0 reads weights; the others build on meta (filled)
            self.data, self.objective, model, self.teacher, self.sampler = build_components(cfg, bind_teacher=False)
            if tr.init_from:
                ckpt_io.load_initial_weights(tr.init_from, model, use_ema=tr.init_from_ema)
        self.objective.setup(model, self.data)  # the objective's own networks (none for single-network objectives)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.trainables = build_trainables(
            cfg, self.objective, model, self.teacher, self.strategy, trainer_optimizer(tr)
        )
        self.student = self.trainables[STUDENT].module
        self.networks = {n: t for n, t in self.trainables.items() if n != STUDENT}  # the objective's own
        log.debug("rank %d: peak host memory %.0f MB once built", self.accelerator.process_index, peak_host_memory_mb())

    def restore(self, resume_from: Path) -> None:
        """Weights, averages, optimizer and LR states, data position, RNG and the open metrics window of the
        checkpoint ``resume_from``; warns about settings that changed since it was written."""
        student = self.trainables[STUDENT]
        try:
            state = ckpt_io.load_checkpoint(
                resume_from, self.student, self.teacher, student.optimizer, student.scheduler,
                rank=self.accelerator.process_index, networks=self._checkpointed_networks(),
            )  # fmt: skip
        except ckpt_io.CheckpointError as err:  # e.g. an old run dir reused with another model or objective
            raise ckpt_io.CheckpointError(
                f"{err} (trainer.resume={self.tr.resume} found it; to train this config from scratch give another "
                "hydra.run.dir or trainer.resume=none; to start from that run's weights only, trainer.init_from=RUN)"
            ) from None
        self.step = self.start_step = state["step"]
        self.data_position = state["data_position"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.window = MetricsWindow(state.get("log_window", {}), state.get("log_window_n", 0))
        # the step's FLOPs as counted when the run started (counting one again would run that step under torch's
        # FlopCounterMode, whose dispatch differs in the last bits: the resumed run would no longer be bit-exact)
        self.throughput.step_tflop = state.get("tflop_per_step")
        scaler = self.accelerator.scaler
        if scaler is not None and state.get("grad_scaler"):  # fp16: the loss scale reached so far
            scaler.load_state_dict(state["grad_scaler"])
        if self.main:
            log.info("resumed from %s at step %d", resume_from, self.start_step)
            for warning in resume_warnings(state, self.settings, self.tr, resume_from):
                log.warning("%s", warning)

    def _open_run_dir(self) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "samples").mkdir(exist_ok=True)
        resumed = self.start_step if self.resume_from else None
        self.writer = MetricsWriter(self.run_dir, self.cfg, resume_step=resumed, enabled=self.main)
        if self.main:
            log.info(
                "run dir %s | %s on %s | %d params (%d trainable) | %d process(es) on %s, %s | %s",
                self.run_dir, type(self.objective).__name__, type(self.student).__name__, self.n_params,
                self.n_train, self.accelerator.num_processes, self.device, self.strategy.name, self.threads,
            )  # fmt: skip

    def _data_streams(self) -> tuple[list, list[int]]:
        """A global batch has world x grad_accum slots; micro-batch m on rank r fills slot m * world + r. Each slot
        has its own data stream and draws its noise from a seed keyed by (step, slot), so the numbers a row sees
        do not depend on how the global batch is split: 2 processes equal 1 process with grad_accum 2."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        n_slots = world * self.tr.grad_accum
        slots = [micro * world + rank for micro in range(self.tr.grad_accum)]
        streams = [self.data.batches(self.tr.seed, self.data_position, slot, n_slots) for slot in slots]
        depth = int(getattr(self.data, "prefetch", 0) or 0)  # a data module that reads from disk reads ahead
        if depth > 0:
            self.prefetcher = Prefetcher(streams, depth, pin=self.device.type == "cuda")
            streams = self.prefetcher.streams_out
        return streams, slots

    def close_streams(self) -> None:
        """Stop the read-ahead thread (if any); the loop reads no batch after this."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def _checkpointed_networks(self) -> dict:
        return {n: t.checkpointed() for n, t in self.networks.items()}

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self, stop: _StopRequest) -> None:
        """Train to ``trainer.max_steps``, a stop request (checkpointed) or ``trainer.time_limit_s``."""
        tr = self.tr
        progress = None
        if self.main and self.cfg.logger.progress:
            from tqdm import tqdm

            progress = tqdm(total=tr.max_steps, initial=self.start_step, desc="train", dynamic_ncols=True)
        self.stopped_by, self.time_limited = None, False
        self.t_start = time.perf_counter()
        self.window.started = self.t_start
        self.student.train()
        while self.step < tr.max_steps:
            result = self.train_step()
            if progress is not None:
                progress.update(1)
            row = self.log_metrics(result)
            if row is not None and progress is not None:
                progress.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", it_s=f"{row['steps_per_s']:.1f}")
            if self.step % tr.sample_every == 0 and self.step < tr.max_steps:
                self.sample_grid()
            if self.step % tr.checkpoint_every == 0 and self.step < tr.max_steps:
                self.save_checkpoint()
            timed_out = tr.time_limit_s > 0 and time.perf_counter() - self.t_start >= tr.time_limit_s
            signum, timed_out = self._agree_to_stop(stop.signal or 0, timed_out)
            if signum:
                self.stopped_by = signal.Signals(signum).name
                break
            if timed_out:
                log.info("trainer.time_limit_s=%s reached at step %d", tr.time_limit_s, self.step)
                self.time_limited = True
                break
        self.wall = time.perf_counter() - self.t_start
        if progress is not None:
            progress.close()

    def _agree_to_stop(self, signum: int, timed_out: bool) -> tuple[int, bool]:
        """A stop signal or the time limit on any rank stops every rank after this same step (one all-reduce of two
        integers; a rank leaving alone would wait in the next step's collective until the timeout)."""
        if self.accelerator.num_processes == 1:
            return signum, timed_out
        flags = torch.tensor([signum, int(timed_out)], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def _rank_mean(self, terms: dict) -> dict:
        """Each logged term's mean over the ranks that have it (every rank calls it at the same step): the loss of
        the global batch, not rank 0's share of it."""
        if self.accelerator.num_processes == 1:
            return terms
        ranks = gather_object([terms])
        keys = dict.fromkeys(k for r in ranks for k in r)
        return {k: sum(r[k] for r in ranks if k in r) / sum(1 for r in ranks if k in r) for k in keys}

    def train_step(self) -> StepResult:
        """One optimizer step over ``trainer.grad_accum`` micro-batches: the stepping networks' averages, the
        objective's loss and backward, clipping, and the optimizer steps (skipped when non-finite)."""
        tr, accelerator, step = self.tr, self.accelerator, self.step
        stepping = [self.trainables[n] for n in self.objective.stepping(step)]
        for t in stepping:
            if t.average is not None:
                t.average.update(t.module, step)
        with self.throughput.counting_step():  # the forward and backward passes' FLOPs, once
            loss, logs = self._accumulate_gradients()
        max_norm = tr.max_grad_norm if tr.max_grad_norm > 0 else math.inf
        grad_norm = self.strategy.clip_grad_norm_([p for t in stepping for p in t.params], max_norm)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self._optimizer_steps(stepping)
            self.consecutive_bad = 0
        else:
            if accelerator.scaler is not None:  # fp16: the skipped step still backs the loss scale off (what
                accelerator.scaler.update()  # optimizer.step would do), else every later step overflows
            self.nonfinite_total += 1
            self.consecutive_bad += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.consecutive_bad)
        for t in self.trainables.values():  # every network's: one not stepped must not carry gradients forward
            t.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.data_position += 1
        if self.consecutive_bad >= tr.max_nonfinite:
            raise TrainingAborted(
                f"{self.consecutive_bad} non-finite steps in a row at step {self.step}: aborting, last good checkpoint "
                "kept in checkpoints/; lower trainer.lr, enable trainer.max_grad_norm or check the data"
            )
        result = StepResult(loss, grad_norm, logs, finite)
        if finite:
            self.window.add(result)
        return result

    def _accumulate_gradients(self) -> tuple[torch.Tensor, dict]:
        """Forward and backward of each micro-batch (gradient sync on the last only); the mean loss and logs."""
        tr, accelerator, step, grad_accum = self.tr, self.accelerator, self.step, self.tr.grad_accum
        n_slots = accelerator.num_processes * grad_accum
        student = self.trainables[STUDENT].wrapped
        logs: dict = {}
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(grad_accum):
            with self.throughput.waiting_for_data():
                batch = next(self.streams[micro]).to(self.device)
            torch.manual_seed(slot_seed(tr.seed, step, self.slots[micro], n_slots))
            sync = ExitStack()  # spans the backward too: FSDP reads the sync flag there
            if micro < grad_accum - 1:
                for t in self.trainables.values():
                    sync.enter_context(self.strategy.no_sync(t.wrapped))
            with sync:
                with accelerator.autocast():
                    loss, micro_logs = self.objective.loss(student, self.teacher, batch, step)
                accelerator.backward(loss if grad_accum == 1 else loss / grad_accum)
            if grad_accum == 1:  # the same numbers, without the accumulation ops
                return loss.detach().float(), micro_logs
            loss_sum += loss.detach().float() / grad_accum
            for k, v in micro_logs.items():
                logs[k] = v if k == "times" else logs.get(k, 0.0) + v / grad_accum
        return loss_sum, logs

    def _optimizer_steps(self, stepping: list) -> None:
        scaler = self.accelerator.scaler
        if scaler is not None and len(stepping) > 1:
            # fp16 with several optimizers: each AcceleratedOptimizer.step would run its own scaler.update(),
            # after which the next optimizer's (already unscaled) gradients are unscaled again. One update.
            for t in stepping:
                scaler.step(t.optimizer.optimizer)
            scaler.update()
        else:
            for t in stepping:
                t.optimizer.step()
        with warnings.catch_warnings():  # a network not stepped yet (DMD2's generator) follows too
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for t in self.trainables.values():  # every network's LR follows the run's schedule on the training step
                t.scheduler.step()  # (DMD2's generator, stepped every 6th step, still decays by max_steps)

    def log_metrics(self, result: StepResult) -> dict | None:
        """Every ``trainer.log_every`` steps (and the last): the window's means as a metrics row."""
        if not (self.step % self.tr.log_every == 0 or self.step == self.tr.max_steps):
            return None
        now = time.perf_counter()
        row = self._rank_mean(self.window.means())
        row.update(
            lr=self.trainables[STUDENT].scheduler.get_last_lr()[0],
            steps_per_s=(self.window.steps or 1) / max(now - self.window.started, 1e-9),
            nonfinite_skipped=self.nonfinite_total,
            **self.throughput.row(self.window.steps or 1, now - self.window.started),
        )
        row = self.writer.log(self.step, row, result.logs.get("times"))
        self.window = MetricsWindow()
        self.window.started = now
        return row

    def sample_grid(self) -> None:
        """A validation grid (rank 0; every rank of a sharded run takes part in the forward passes)."""
        self.student.eval()  # sample as final_outputs does (no dropout), then back to training
        _validation_grid(
            self.run_dir, self.step, self.objective, self.sampler, self.teacher.sampling_model, self.data,
            self.device, self.accelerator, self.writer, Share.of(self.accelerator),
        )  # fmt: skip
        self.student.train()

    def save_checkpoint(self, background: bool = True) -> None:
        """A checkpoint at the current step (every rank takes part: sharded state is gathered, or each rank writes its
        shards; rank 0 commits). With ``trainer.async_checkpoint`` (and ``background``) the shards are written while
        training goes on; the previous background save is committed first."""
        with self.throughput.saving():
            self._complete_pending_save()
            self._save_checkpoint(background and self.tr.async_checkpoint)

    def _complete_pending_save(self) -> None:
        if self.pending_save is None:
            return
        self.pending_save.complete()
        self.pending_save = None
        if self.main:
            ckpt_io.prune(self.run_dir / "checkpoints", self.tr.keep_last)

    def _save_checkpoint(self, background: bool) -> None:
        accelerator, tr = self.accelerator, self.tr
        rng_states = [ckpt_io.rng_state()]
        if accelerator.num_processes > 1:
            rng_states = gather_object(rng_states)
        student = self.trainables[STUDENT]
        extra = {
            "nonfinite_total": self.nonfinite_total,
            **self.window.state(),
            "lr_factor": lr_factor(self.step, tr),
            "settings": self.settings,
            "init_from": init_source(tr),
            "tflop_per_step": self.throughput.step_tflop,
            **({"grad_scaler": accelerator.scaler.state_dict()} if accelerator.scaler is not None else {}),
        }
        saved = ckpt_io.save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.student, self.teacher, student.optimizer, student.scheduler,
            self.data_position, extra=extra, rng_states=rng_states, networks=self._checkpointed_networks(),
            write=self.main, sharded=self.sharded_checkpoints, background=background,
        )  # fmt: skip
        if isinstance(saved, ckpt_io.PendingCheckpoint):
            self.pending_save = saved  # committed before the next save (or the last one, which waits)
            return
        if self.main:
            ckpt_io.prune(self.run_dir / "checkpoints", tr.keep_last)
        accelerator.wait_for_everyone()

    # -- the end --------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """The last checkpoint, the final grids and evaluation (not after a stop request), ``summary.json``;
        a stopped run then exits with 128 + the signal's number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1)."""
        self.save_checkpoint(background=False)  # the last one is on disk before the run reports
        summary = self._summary()
        open_terms = self._rank_mean(self.window.means()) if self.window.steps > 0 else None
        if self.stopped_by is None:  # every process samples its share of the rows (fewstep.training.outputs)
            self.student.eval()
            share = Share.of(self.accelerator)
            summary["eval"] = final_outputs(
                self.run_dir, self.teacher.sampling_model, self.sampler, self.data, self.tr.final_nfe,
                self.tr.baseline_steps, self.device, evaluate=self.tr.evaluate, grid_size=self.tr.grid_size,
                autocast=self.accelerator.autocast, log=log.info, share=share,
            )  # fmt: skip
            rows = [share.evaluated_rows]
            summary["final_eval_rows_per_process"] = gather_object(rows) if self.accelerator.num_processes > 1 else rows
        if self.main:
            self._write_summary(summary, open_terms)
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            # every rank leaves the group together: a process exiting with gloo's threads alive can abort
            # ("terminate called without an active exception", seen once in a 2-process CPU run)
            torch.distributed.destroy_process_group()
        if self.stopped_by is not None:
            raise SystemExit(128 + signal.Signals[self.stopped_by].value)  # 130 SIGINT, 143 SIGTERM, 138 SIGUSR1
        return summary

    def _summary(self) -> dict:
        params_per_process, host_mb = [local_numel(self.student)], [round(peak_host_memory_mb(), 1)]
        save_mb = [round(self.throughput.checkpoint_host_growth_mb, 1)]
        if self.accelerator.num_processes > 1:
            params_per_process, host_mb = gather_object(params_per_process), gather_object(host_mb)
            save_mb = gather_object(save_mb)
        step, start = self.step, self.start_step
        summary = {
            "steps": step,
            "start_step": start,
            "wall_time_s": self.wall,
            "steps_per_s": (step - start) / max(self.wall, 1e-9),
            "peak_memory_mb": peak_memory_mb(),
            "nonfinite_skipped": self.nonfinite_total,
            "params": self.n_params,
            "trainable_params": self.n_train,
            "params_per_process": params_per_process,  # elements each process holds: all of them unless sharded
            "peak_host_memory_mb": host_mb,  # each process's peak RSS up to the last checkpoint (rank order)
            "checkpoint_s_total": self.throughput.checkpoint_s_total,  # this call's saves, the last one included
            "checkpoint_host_growth_mb": save_mb,  # per process: the most a save raised its RSS (rank order)
            "distributed": self.strategy.name,
            "num_processes": self.accelerator.num_processes,
            "device": str(self.device),
            "objective": type(self.objective).__name__,
            "run_dir": str(self.run_dir),
        }
        if self.stopped_by is not None:
            summary["stopped_by"] = self.stopped_by
        if self.time_limited:  # ended at its time budget: launched again with the same budget it is finished
            summary["time_limit_s"] = self.tr.time_limit_s
        return summary

    def _write_summary(self, summary: dict, open_terms: dict | None) -> None:
        last = _last_metrics(self.run_dir)
        if open_terms is not None:  # stopped between log steps (time limit, signal): the final terms are the window's
            last = open_terms
        summary.update({k: last[k] for k in last if k.startswith(("loss", "nfe/"))})
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.writer.finish(summary)
        step, start, wall = self.step, self.start_step, self.wall
        ran = f"{step} steps in {wall:.1f} s ({summary['steps_per_s']:.1f} steps/s)"
        if start:  # resumed: the count and rate are of the steps this call ran
            ran = f"steps {start} to {step} ({step - start} in {wall:.1f} s, {summary['steps_per_s']:.1f}/s)"
        log.info("done: %s; summary in %s", ran, self.run_dir / "summary.json")


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Train the composed config ``cfg`` into ``run_dir`` (default: Hydra's output dir); returns the summary."""
    trainer = Trainer(cfg, run_dir)
    with _StopRequest(trainer.tr.stop_signals, handover=handover_signals()) as stop:
        try:
            trainer.fit(stop)
        finally:
            trainer.close_streams()
    try:
        return trainer.finish()
    except SystemExit:  # stopped and checkpointed: submitit's signal goes on to submitit's handler (its requeue)
        stop.hand_over(trainer.stopped_by)
        raise


def _validation_grid(run_dir, step, objective, sampler, model_fn, data, device, accelerator, writer, share):
    """Samples at the objective's ``target_step_count`` steps with the run's sampler, saved as a grid by rank 0
    (every process samples its ``share`` of the rows)."""
    n = 50
    noise = torch.randn(n, *data.shape, generator=torch.Generator().manual_seed(0)).to(device)
    cond = cond_to(data.grid_conds(n), device)
    steps, null = objective.target_step_count, guidance_null(sampler, data, n, device)
    x = share.sample(sampler, model_fn, noise, cond, steps, null_cond=null, autocast=accelerator.autocast)
    if not share.main:
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
