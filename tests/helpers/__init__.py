"""Shared test helpers: compose configs in-process, run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAST = [
    "trainer.log_every=5",
    "trainer.sample_every=1000",
    "trainer.checkpoint_every=1000",
    "trainer.evaluate=false",
    "trainer.baseline_steps=0",
    "trainer.grid_size=20",
    "logger=none",
]


def compose(overrides: list[str] | None = None):
    """The composed config for ``python -m fewstep <overrides>`` (no Hydra run dir)."""
    from fewstep.config.schema import compose_config

    return compose_config(list(overrides or []))


@contextmanager
def torch_threads(n: int):
    """Run the body with ``n`` torch threads (``trainer.torch_threads`` sets them process-wide), then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 600,
    module: str = "fewstep",
    check: bool = True,
    env: dict | None = None,
):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def toy_overrides():
    return ["data=toy2d", "model=tiny_toy", "data.batch_size=32", *FAST]


def read_shard(path, entry: dict, prompt_only: bool = False) -> dict:
    """A cache shard's rows as ``data=latents`` reads them (float32, masked embeddings zero-padded to their full
    length): ``{"latents" (absent for a prompt-only shard), condition keys...}``, each (N, ...)."""
    import torch

    from fewstep.data.shards import LatentCacheError, ShardReader

    reader = ShardReader(path, entry, prompt_only, None, LatentCacheError)
    rows = [reader.cond(r) for r in range(reader.count)]
    out = {k: torch.cat([row[k] for row in rows]) for k in rows[0]}
    if not prompt_only:
        out["latents"] = torch.cat([reader.latents(r) for r in range(reader.count)])
    return out
