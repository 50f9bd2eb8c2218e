"""Shared test helpers: compose configs in-process, run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from fewstep.schema import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="fewstep.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def run_cli(args: list[str], cwd: Path, timeout: float = 600, module: str = "fewstep", check: bool = True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def toy_overrides():
    return ["data=toy2d", "model=tiny_toy", "data.batch_size=32", *FAST]
