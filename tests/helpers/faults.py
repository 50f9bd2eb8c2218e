"""Fault-injection targets for tests/training/test_reliability.py, used through
``_target_=helpers.faults.<Name>`` overrides (a CLI subprocess needs ``tests/`` on PYTHONPATH:
:func:`subprocess_env`)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fewstep.data.toy2d import Toy2DData
from fewstep.objectives.twinflow import TwinFlow

TESTS = Path(__file__).resolve().parents[1]  # tests/: the helpers package and the test modules
STALL_ENV = "FEWSTEP_TEST_STALL_AT"


def subprocess_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


class StallingToy2D(Toy2DData):
    """``data=toy2d`` with the same batches, that blocks before yielding the batch at data position
    ``$FEWSTEP_TEST_STALL_AT`` (unset: never), so a test can kill the run at a known point."""

    def batches(self, seed, position=0, rank=0, world=1):
        stall = int(os.environ.get(STALL_ENV, "-1"))
        for batch in super().batches(seed, position, rank, world):
            if position == stall:
                print(f"stalling at data position {position}", file=sys.stderr, flush=True)
                time.sleep(3600)
            position += 1
            yield batch


SIGNAL_ENV = "FEWSTEP_TEST_SIGNAL_AT"  # "RANK:POSITION": that rank signals itself (SIGUSR1) reading that batch
SIGNAL_NAME_ENV = "FEWSTEP_TEST_SIGNAL_NAME"  # the signal it sends (default SIGUSR1)
SLOW_START_ENV = "FEWSTEP_TEST_SLOW_START"  # "RANK:SECONDS": that rank opens its data streams that much later


class SignalledToy2D(Toy2DData):
    """``data=toy2d`` with the same batches; the rank (``$RANK``, 0 alone) named in ``$FEWSTEP_TEST_SIGNAL_AT``
    sends itself SIGUSR1 (or ``$FEWSTEP_TEST_SIGNAL_NAME``) as it reads the batch at that data position, and the
    rank named in ``$FEWSTEP_TEST_SLOW_START`` opens its streams that many seconds late (its training clock starts
    later than the others': each rank alone would reach ``trainer.time_limit_s`` at another step)."""

    def batches(self, seed, position=0, rank=0, world=1):
        me = os.environ.get("RANK", "0")
        slow_rank, _, seconds = os.environ.get(SLOW_START_ENV, ":").partition(":")
        if slow_rank == me:
            time.sleep(float(seconds))
        return self._signalling(super().batches(seed, position, rank, world), position, me)

    @staticmethod
    def _signalling(stream, position, me):
        signal_rank, _, at = os.environ.get(SIGNAL_ENV, ":-1").partition(":")
        for batch in stream:
            if signal_rank == me and position == int(at):
                os.kill(os.getpid(), signal.Signals[os.environ.get(SIGNAL_NAME_ENV, "SIGUSR1")])
            position += 1
            yield batch


class NaNLossTwinFlow(TwinFlow):
    """TwinFlow whose loss (and so every gradient) is NaN at the steps in ``nan_steps``."""

    nan_steps: set[int] = set()

    def loss(self, student, teacher, batch, step):
        loss, logs = super().loss(student, teacher, batch, step)
        if step in self.nan_steps:
            loss = loss * float("nan")
        return loss, logs


class PlainNet(nn.Module):
    """A velocity model with no target-time / sign embedding (no ``time_pair`` attribute)."""

    def __init__(self, data_shape, num_classes=1, **_ignored):
        super().__init__()
        self.net = nn.Linear(int(torch.tensor(data_shape).prod()) + 1, int(torch.tensor(data_shape).prod()))

    def forward(self, x, t, tt=None, cond=None):
        return self.net(torch.cat([x.flatten(1), t[:, None]], 1)).view_as(x)


SLOW_SAMPLING_ENV = "FEWSTEP_TEST_SLOW_SAMPLING"  # seconds each sampled row costs per step (grids, evaluation)


class SlowSampler:
    """``sampler._target_=helpers.faults.SlowSampler``: the run's UCGM sampler, sleeping ``$FEWSTEP_TEST_SLOW_SAMPLING``
    seconds per row and step before it samples, as a large model's sampling would take (a 2-process test then shows
    that no rank waits out the collective timeout while another samples)."""

    def __new__(cls, *args, **kwargs):
        from fewstep.samplers.ucgm import UCGMSampler

        class Slow(UCGMSampler):
            def sample(self, model_fn, x, cond, steps, **kw):
                time.sleep(float(os.environ.get(SLOW_SAMPLING_ENV, "0")) * x.shape[0] * steps)
                return super().sample(model_fn, x, cond, steps, **kw)

        return Slow(*args, **kwargs)


DATA_SLEEP_ENV = "FEWSTEP_TEST_DATA_SLEEP"  # seconds each batch takes to arrive


class SlowToy2D(Toy2DData):
    """``data=toy2d`` with the same batches, each arriving ``$FEWSTEP_TEST_DATA_SLEEP`` seconds late (a slow reader)."""

    def batches(self, seed, position=0, rank=0, world=1):
        for batch in super().batches(seed, position, rank, world):
            time.sleep(float(os.environ.get(DATA_SLEEP_ENV, "0")))
            yield batch
