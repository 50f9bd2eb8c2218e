"""Resuming a run: the checkpoint it goes on from, whether there is anything left to train, and what a user is
told when the run dir's checkpoint was trained with other settings.

Checkpoints record the run's settings (:func:`run_settings`); :func:`resume_warnings` compares them with this
launch's. :class:`FinishedRunCheck` refuses a finished run dir before Hydra writes into it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fewstep.errors import FewstepError
from fewstep.training import checkpoint as ckpt_io
from fewstep.training.trainables import lr_factor


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


# How long and how a run goes, not what it trains: changed on a resume without a warning.
RUN_LENGTH_KEYS = (
    "trainer.max_steps", "trainer.time_limit_s", "trainer.stop_signals", "trainer.dist_timeout_s",
    "trainer.resume", "trainer.torch_threads",
    "trainer.checkpoint_every", "trainer.sample_every", "trainer.log_every", "trainer.keep_last", "trainer.evaluate",
    "trainer.final_nfe", "trainer.baseline_steps", "trainer.init_from", "logger.", "trainer.grid_size",
    "trainer.max_nonfinite", "trainer.peak_tflops", "trainer.checkpoint_format",
    "trainer.async_checkpoint",
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


def resume_warnings(state: dict, settings: dict, tr, resume_from: Path) -> list[str]:
    """What a user is told on resuming ``state`` (a checkpoint's state.json) with this launch's trainer settings
    ``tr``: settings changed since the checkpoint, an ``init_from`` its weights replace, an LR that jumps."""
    out = []
    start_step = state["step"]
    changed = changed_settings(state.get("settings"), settings)
    if changed:
        out.append(
            f"{resume_from} was trained with other settings: {', '.join(changed)}; trainer.resume={tr.resume} trains "
            "on from it (to train this config from scratch, give another hydra.run.dir or trainer.resume=none)"
        )
    # loaded already (what the checkpoint does not hold keeps it, e.g. DMD2's real score); a checkpoint of a run
    # that started from this init_from (a plain resume of it) is no surprise
    if tr.init_from and state.get("init_from") != init_source(tr):
        out.append(
            f"trainer.init_from={tr.init_from}: the resumed checkpoint's weights replace its weights "
            f"(trainer.resume={tr.resume} found {resume_from}); to start from init_from, give another hydra.run.dir "
            "or trainer.resume=none"
        )
    was, now = state.get("lr_factor"), lr_factor(start_step, tr)
    if was is not None and abs(was - now) > 1e-9:  # e.g. trainer.max_steps raised under a decaying schedule
        out.append(
            f"the LR at step {start_step} jumps from {was:.3g} to {now:.3g} of trainer.lr: "
            f"trainer.lr_schedule={tr.lr_schedule} is recomputed over this call's trainer.max_steps={tr.max_steps} "
            "(or warmup/schedule) that differs from the checkpointed run's; keep them to continue its schedule"
        )
    return out
