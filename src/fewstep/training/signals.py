"""Stop signals: ``trainer.stop_signals`` (default SIGINT, SIGTERM and SLURM's warning SIGUSR1) end a run after the
current step with a checkpoint, and under submitit its own preemption/timeout signal (SIGUSR2) does too, then goes
on to submitit's handler.

submitit runs the job inside its worker (``submitit.core.submission.process_job``), which installs a handler for
SIGUSR2 (``$SUBMITIT_PREEMPT_SIGNAL``) before calling the job: on SLURM's ``--signal=USR2@signal_delay_s`` every task
gets it; on task 0 the handler pickles the job again, runs ``scontrol requeue`` and exits at once, wherever training
was, and on the other tasks it returns. Left alone, a run under ``hydra/launcher=slurm_accelerate`` lost every step
since its last periodic checkpoint. :class:`StopRequest` catches that signal too (``handover``): every rank finishes
the same step and writes the checkpoint, and :meth:`StopRequest.hand_over` then calls submitit's handler, which
requeues (or not) as it would have. docs/sweeps.md has the whole SLURM story."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("fewstep")

__all__ = ["StopRequest", "handover_signals"]


def handover_signals() -> tuple[str, ...]:
    """The signals whose handler is handed the stop after its checkpoint: submitit's preemption/timeout signal when
    this process runs as a submitit job (``$SUBMITIT_EXECUTOR`` set; ``SIG`` + ``$SUBMITIT_PREEMPT_SIGNAL``,
    default ``USR2``, as submitit reads it), else none."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return ()
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return (name,) if name in signal.Signals.__members__ else ()


class StopRequest:
    """``names`` (``trainer.stop_signals``) and ``handover``: finish the current step, write a checkpoint, exit with
    status 128 + the signal's number (130, 143, 138). A handover signal whose earlier handler is a Python function
    (submitit's) is handed on after the checkpoint instead (:meth:`hand_over`): that handler decides how the
    process ends.

    The same signal twice gives up at once (a second Ctrl-C); another signal after the first is only remembered
    (submitit's own preemption test sends SIGTERM, then SIGUSR2)."""

    def __init__(self, names=("SIGINT", "SIGTERM", "SIGUSR1"), handover=()):
        self.signal = None
        self.received: list[signal.Signals] = []
        self._old = {}
        self._handover = {signal.Signals[name] for name in handover}
        self._signals = list(dict.fromkeys(signal.Signals[name] for name in (*names, *handover)))

    def __enter__(self):
        for sig in self._signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if signum in self.received:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.received.append(signal.Signals(signum))
        if self.signal is None:
            self.signal = signum
        log.warning("received %s: finishing this step and writing a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def hand_over(self, stopped_by: str | None) -> None:
        """After the stop's checkpoint: call the handler installed before ours for each handover signal that stopped
        the run (``stopped_by``, agreed by the ranks) or reached this process, once, with the signal's number. It
        may raise (submitit's task 0: ``SystemExit`` after requeueing); if it returns, so does this."""
        stops = {*self.received, *([signal.Signals[stopped_by]] if stopped_by else [])}
        for sig in sorted(self._handover & stops):
            old = self._old.get(sig)
            self._handover.discard(sig)
            if callable(old):
                log.info("checkpoint written; handing %s to the handler installed before fewstep's", sig.name)
                old(int(sig), None)
