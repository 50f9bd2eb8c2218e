"""SLURM's warning under the submitit launcher: submitit's worker installs its own SIGUSR2 handler (task 0: pickle the
job again, ``scontrol requeue``, ``sys.exit(-1)``; other tasks: return) before it calls the job. fewstep catches that
signal too, finishes the step, writes the checkpoint, and only then calls submitit's handler, once. Outside submitit
nothing changes: SIGUSR2 is not a stop signal and SIGUSR1 still exits 138. In-process runs of the toy config
(``helpers.faults.SignalledToy2D`` signals itself reading the batch at data position 6, i.e. during step 6)."""

from __future__ import annotations

import json
import signal

import pytest

from fewstep.training.loop import _StopRequest, train
from fewstep.training.signals import handover_signals

from helpers import FAST, compose, faults

SIGNALLED = ["data=toy2d", "data._target_=helpers.faults.SignalledToy2D", "model=tiny_toy", "data.batch_size=32", *FAST]
RUN = [*SIGNALLED, "trainer.max_steps=10", "trainer.final_nfe=[]"]


@pytest.fixture
def handlers():
    """Restore the handlers a test (or submitit's ``_handle_signals``) installs in this process."""
    sigs = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)
    saved = {s: signal.getsignal(s) for s in sigs}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def signal_at(monkeypatch, name: str, position: int = 6, submitit: bool = True) -> None:
    monkeypatch.setenv(faults.SIGNAL_ENV, f"0:{position}")
    monkeypatch.setenv(faults.SIGNAL_NAME_ENV, name)
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    if submitit:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    else:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)


def checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_submitit_signal_is_a_handover_only_under_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert handover_signals() == ()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert handover_signals() == ("SIGUSR2",)
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # submitit reads the same variable
    assert handover_signals() == ("SIGUSR1",)
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "NOPE")
    assert handover_signals() == ()


def test_the_slurm_launcher_asks_for_the_signal_fewstep_hands_over(tmp_path, monkeypatch):
    """hydra/launcher=slurm_accelerate's sbatch script (built by submitit itself) asks SLURM for SIGUSR2 300 s before
    the limit, to every task (no ``B:``), and under submitit that is the signal fewstep checkpoints and hands on."""
    pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    from fewstep.config.schema import compose_config

    launcher = compose_config(["hydra/launcher=slurm_accelerate"], return_hydra_config=True).hydra.launcher
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    sbatch = _make_sbatch_string(command="true", folder=tmp_path, signal_delay_s=launcher.signal_delay_s)
    assert "#SBATCH --signal=USR2@300" in sbatch.splitlines()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # what that script exports before srun
    assert "export SUBMITIT_EXECUTOR=slurm" in sbatch and handover_signals() == ("SIGUSR2",)


def test_stop_request_hands_over_once_and_a_different_second_signal_does_not_abort(handlers):
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append((signum, frame)))
    with _StopRequest(("SIGINT", "SIGTERM", "SIGUSR1"), handover=("SIGUSR2",)) as stop:
        stop._handle(signal.SIGTERM, None)  # submitit's preemption: SIGTERM, then SIGUSR2
        stop._handle(signal.SIGUSR2, None)  # remembered, no KeyboardInterrupt
        assert (stop.signal, stop.received) == (signal.SIGTERM, [signal.SIGTERM, signal.SIGUSR2])
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)  # the same signal twice still gives up at once
    assert calls == []
    stop.hand_over("SIGTERM")  # the ranks agreed on SIGTERM; this process also got SIGUSR2
    stop.hand_over("SIGTERM")
    assert calls == [(signal.SIGUSR2, None)]
    plain = _StopRequest(("SIGUSR1",), handover=("SIGUSR2",))
    plain.hand_over("SIGUSR1")  # no handover signal: nothing to call
    assert calls == [(signal.SIGUSR2, None)]


@pytest.mark.slow
def test_under_submitit_sigusr2_checkpoints_then_calls_the_previous_handler_once(
    tmp_path, monkeypatch, handlers, fresh_accelerator_state
):
    """The earlier handler (a recorder standing in for submitit's on a task != 0, which returns) is called once,
    with 12, after step 7's checkpoint exists; then the run exits 128 + 12 as any stop. If it raises (task 0:
    ``SystemExit(-1)`` after the requeue), that is what leaves train()."""
    signal_at(monkeypatch, "SIGUSR2")
    run = tmp_path / "returns"
    seen = []

    def returns(signum, frame):
        seen.append((signum, checkpoints(run)))

    signal.signal(signal.SIGUSR2, returns)
    with pytest.raises(SystemExit) as stopped:
        train(compose(RUN), run_dir=run)
    assert stopped.value.code == 140
    assert seen == [(signal.SIGUSR2, ["step_0000007"])]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["stopped_by"], summary["steps"]) == ("SIGUSR2", 7)
    assert signal.getsignal(signal.SIGUSR2) is returns  # fewstep's handler is gone again

    run = tmp_path / "raises"
    seen.clear()

    def requeue_and_exit(signum, frame):
        seen.append((signum, checkpoints(run)))
        raise SystemExit(-1)

    signal.signal(signal.SIGUSR2, requeue_and_exit)
    with pytest.raises(SystemExit) as stopped:
        train(compose(RUN), run_dir=run)
    assert stopped.value.code == -1 and seen == [(signal.SIGUSR2, ["step_0000007"])]


def test_real_submitit_handler_requeues_after_the_checkpoint(tmp_path, monkeypatch, handlers, fresh_accelerator_state):
    """submitit's own handler, installed as its worker does (``JobEnvironment._handle_signals``), with only the
    ``scontrol requeue`` call replaced: task 0 pickles the job again and requeues once (countdown 2: preempted, not
    timed out), after fewstep's step-7 checkpoint, then exits -1; task 1 does neither and the run exits 140."""
    submitit = pytest.importorskip("submitit")
    from submitit.core.job_environment import JobEnvironment
    from submitit.core.utils import DelayedSubmission, JobPaths

    requeued = []

    class FakeSlurm(JobEnvironment):
        _env = {"job_id": "FAKE_JOB_ID", "global_rank": "FAKE_PROCID", "num_tasks": "FAKE_NTASKS"}

        def _requeue(self, countdown):
            requeued.append((countdown, checkpoints(run)))

    class Job:
        def __call__(self):
            return None

        def checkpoint(self):
            return submitit.helpers.DelayedSubmission(self)

    monkeypatch.setenv("FAKE_JOB_ID", "123")
    for procid, code, expected in (("0", -1, [(2, ["step_0000007"])]), ("1", 140, [])):
        signal_at(monkeypatch, "SIGUSR2")
        monkeypatch.setenv("FAKE_PROCID", procid)
        run, requeued[:] = tmp_path / f"task{procid}", []
        paths = JobPaths(tmp_path / f"submitit{procid}", job_id="123", task_id=int(procid))
        paths.folder.mkdir(parents=True, exist_ok=True)
        delayed = DelayedSubmission(Job())
        delayed.set_timeout(60, 2)
        FakeSlurm()._handle_signals(paths, delayed)
        with pytest.raises(SystemExit) as stopped:
            train(compose(RUN), run_dir=run)
        assert stopped.value.code == code
        assert requeued == expected
        assert paths.submitted_pickle.exists() == (procid == "0")
        assert json.loads((run / "summary.json").read_text())["steps"] == 7


@pytest.mark.slow
def test_plain_runs_are_unchanged(tmp_path, monkeypatch, handlers, fresh_accelerator_state):
    """No submitit: SIGUSR2 is not a stop signal (the handler there is called at once, the run goes on to
    max_steps), and SIGUSR1 stops after its step with exit 138, handing over nothing."""
    seen = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    signal_at(monkeypatch, "SIGUSR2", submitit=False)
    summary = train(compose(RUN), run_dir=tmp_path / "usr2")
    assert seen == [signal.SIGUSR2] and summary["steps"] == 10 and "stopped_by" not in summary

    seen.clear()
    signal_at(monkeypatch, "SIGUSR1", submitit=False)
    with pytest.raises(SystemExit) as stopped:
        train(compose(RUN), run_dir=tmp_path / "usr1")
    assert stopped.value.code == 138 and seen == []
    assert checkpoints(tmp_path / "usr1") == ["step_0000007"]
