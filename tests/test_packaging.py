"""The configs ship inside the package: a non-editable wheel runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_runs_from_any_directory(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", str(ROOT), "-w", str(wheels)], check=True, capture_output=True)
    wheel = next(wheels.glob("fewstep-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import fewstep; print(fewstep.__file__)"], cwd="/", env=env, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target))
    shipped = subprocess.run(
        [sys.executable, "-c", "from fewstep.models import architectures as a; print(a.names())"],
        cwd="/", env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        shipped.stdout.split("]")[0] + "]"
        == "['openuni_l_512', 'qwen_image', 'sana_1600m_1024px', 'sd35_large', 'sd35_medium', 'sdxl_base']"
    )
    run = subprocess.run(
        [sys.executable, "-m", "fewstep", "data=toy2d", "model=tiny_toy", "trainer.max_steps=3",
         "trainer.evaluate=false", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").exists()
