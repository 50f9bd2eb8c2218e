"""Stopping a run: ``trainer.stop_signals`` (SIGUSR1, SLURM's requeue warning, by default) checkpoints and exits with
128 + the signal's number, and in a multi-process run a signal on one rank or one rank's time limit stops every rank
after the same step (an all-reduce each step; a rank leaving alone would wait in the next collective until the
timeout). The logged loss is the global batch's (a mean over ranks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fewstep.config.checks import ConfigError
from fewstep.config.validate import validate

from helpers import FAST, compose, faults

SIGNALLED = ["data=toy2d", "data._target_=helpers.faults.SignalledToy2D", "model=tiny_toy", "data.batch_size=32", *FAST]


def launch(run, *overrides, processes=2, env=None, timeout=300):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "fewstep", *SIGNALLED, *overrides, f"hydra.run.dir={run}"]  # fmt: skip
    if processes == 1:
        cmd = [sys.executable, "-m", "fewstep", *SIGNALLED, *overrides, f"hydra.run.dir={run}"]
    return subprocess.run(cmd, cwd=run.parent, env=faults.subprocess_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def state(run) -> dict:
    final = sorted((run / "checkpoints").glob("step_*"))[-1]
    return json.loads((final / "state.json").read_text())


def test_stop_signals_are_checked_before_anything_is_built():
    assert list(validate(compose(SIGNALLED)).trainer.stop_signals) == ["SIGINT", "SIGTERM", "SIGUSR1"]
    for bad in ("[SIGFOO]", "[SIGKILL]"):
        with pytest.raises(ConfigError, match=r"trainer.stop_signals: SIG\w+ is not a signal a process can catch"):
            validate(compose([*SIGNALLED, f"trainer.stop_signals={bad}"]))


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_138_and_one_ranks_signal_stops_both_at_its_step(tmp_path):
    one = tmp_path / "one"
    proc = launch(one, "trainer.max_steps=50", processes=1, env={faults.SIGNAL_ENV: "0:6"})
    assert proc.returncode == 138, proc.stderr[-2000:]
    summary = json.loads((one / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGUSR1" and summary["steps"] == 7 and state(one)["step"] == 7

    # two processes, rank 1 alone is signalled reading step 6's batch: both finish step 6, checkpoint at 7, exit
    common = ["trainer.max_steps=12", "trainer.lr_schedule=constant", "trainer.log_every=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert launch(straight, *common).returncode == 0
    proc = launch(split, *common, env={faults.SIGNAL_ENV: "1:6"})
    # accelerate's launcher (torch elastic) reports its ranks' 138 as a failed launch (exit 1)
    assert proc.returncode == 1 and "exitcode  : 138" in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((split / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGUSR1" and summary["steps"] == 7 and summary["num_processes"] == 2
    assert state(split)["step"] == 7
    proc = launch(split, *common, "trainer.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((split / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"]) == (7, 12)
    for name in ("model.safetensors", "teacher.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step_0000012" / name))
        b = load_file(str(split / "checkpoints" / "step_0000012" / name))
        assert all((a[k] == b[k]).all() for k in a), name  # resumed exactly


@pytest.mark.slow
def test_one_ranks_time_limit_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 1 starts its clock 3 s after rank 0 (it opens its data late, after the ranks last synchronised): alone,
    rank 0 would leave the loop steps before rank 1, which would then wait in its next all-reduce until the
    collective timeout. They agree each step: one stop step, one checkpoint, exit 0."""
    run = tmp_path / "run"
    proc = launch(run, "trainer.max_steps=100000", "trainer.time_limit_s=6", env={faults.SLOW_START_ENV: "1:3"},
                  timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_limit_s"] == 6 and summary["num_processes"] == 2
    assert state(run)["step"] == summary["steps"] > 0
    assert len(list((run / "checkpoints").glob("step_*"))) >= 1


def test_dist_timeout_s_sets_the_process_groups_timeout(tmp_path, monkeypatch, fresh_accelerator_state):
    """trainer.dist_timeout_s reaches Accelerate's process-group kwargs (torch's NCCL default, 600 s, is shorter than
    a whole-state checkpoint of a 20 B model takes to write); 0 or less is refused before anything is built."""
    from datetime import timedelta

    import accelerate
    from accelerate.utils import InitProcessGroupKwargs

    import fewstep.training.loop
    from fewstep.training.loop import train

    seen = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, kwargs_handlers=(), **kwargs):
            seen.extend(kwargs_handlers)
            super().__init__(*args, kwargs_handlers=kwargs_handlers, **kwargs)

    monkeypatch.setattr(fewstep.training.loop, "Accelerator", Recording)
    over = [*SIGNALLED, "trainer.max_steps=1", "trainer.final_nfe=[]", "trainer.baseline_steps=0"]
    train(compose([*over, "trainer.dist_timeout_s=123"]), run_dir=tmp_path / "run")
    timeouts = [h.timeout for h in seen if isinstance(h, InitProcessGroupKwargs)]
    assert timeouts == [timedelta(seconds=123)]
    assert validate(compose(SIGNALLED)).trainer.dist_timeout_s == 3600
    with pytest.raises(ConfigError, match=r"trainer.dist_timeout_s=0.0 must be > 0"):
        validate(compose([*SIGNALLED, "trainer.dist_timeout_s=0"]))
