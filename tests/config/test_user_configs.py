"""The shipped groups live in the top-level conf/ (packaged as fewstep.conf); a user adds groups and experiments
from a ``conf/`` in the working directory or FEWSTEP_CONFIG_PATH, without editing the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewstep.config.schema import compose_config
from fewstep.config.searchpath import CONF_DIR, ENV_VAR, ConfigPathError, user_config_dirs, with_user_search_path
from fewstep.config.validate import check_overrides

from helpers import FAST, run_cli

ROOT = Path(__file__).resolve().parents[2]
MODEL = """# a user's own model choice
defaults:
  - /schema/model/tiny@_here_
  - _self_

width: 24
depth: 1
emb_dim: 16
"""
EXPERIMENT = """# @package _global_
defaults:
  - override /model: mine
  - override /data: toy2d
  - _self_

data:
  batch_size: 16
trainer:
  max_steps: 3
"""


def write_user_conf(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "mine.yaml").write_text(MODEL)
    (root / "model" / "tiny.yaml").write_text(MODEL.replace("width: 24", "width: 7"))  # shadowed by the shipped one
    (root / "experiment" / "team").mkdir(parents=True)
    (root / "experiment" / "team" / "mine.yaml").write_text(EXPERIMENT)
    return root


def test_shipped_groups_come_from_the_top_level_conf():
    # the source checkout's conf/ is what the package ships (an editable install maps fewstep.conf to it)
    assert CONF_DIR.resolve() == (ROOT / "conf").resolve()
    assert not (ROOT / "src" / "fewstep" / "conf").exists()
    assert compose_config([]).model.width == 256


def test_conf_in_the_working_directory_adds_groups_and_experiments(tmp_path, monkeypatch):
    write_user_conf(tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert user_config_dirs() == [(tmp_path / "conf").resolve()]
    cfg = compose_config(["model=mine"])
    assert (cfg.model.width, cfg.model.depth, cfg.model.emb_dim) == (24, 1, 16)
    cfg = compose_config(["experiment=team/mine"])
    assert (cfg.model.width, cfg.data.batch_size, cfg.trainer.max_steps) == (24, 16, 3)
    assert str(cfg.data._target_).endswith("Toy2DData")
    assert compose_config(["model=tiny"]).model.width == 256  # a shipped name wins over the user's file
    # the pre-run check knows the user's choices (and suggests them)
    assert check_overrides(["experiment=team/mine"]) is None
    assert "did you mean team/mine?" in check_overrides(["experiment=team/mien"])
    assert "did you mean mine?" in check_overrides(["model=mien"])


def test_config_path_env_var_adds_folders_and_merges_with_hydra_searchpath(tmp_path, monkeypatch):
    ours = write_user_conf(tmp_path / "team_conf")
    monkeypatch.chdir(tmp_path)  # no ./conf here
    monkeypatch.setenv(ENV_VAR, str(ours))
    assert compose_config(["model=mine"]).model.width == 24
    # a search path given on the command line is kept, ours is appended after it
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "moons.yaml").write_text("defaults:\n  - toy2d\n  - _self_\n\nbatch_size: 8\n")
    merged = with_user_search_path(["trainer.max_steps=1", f"hydra.searchpath=[file://{other}]"])
    assert merged == ["trainer.max_steps=1", f"hydra.searchpath=['file://{other}','file://{ours.resolve()}']"]
    cfg = compose_config(["model=mine", "data=moons", f"hydra.searchpath=[file://{other}]"])
    assert (cfg.model.width, cfg.data.batch_size, cfg.data.name) == (24, 8, "moons")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ConfigPathError, match=f"{ENV_VAR} names .*missing, which is not a folder"):
        user_config_dirs()


@pytest.mark.slow
def test_cli_trains_a_user_experiment_from_the_working_directory(tmp_path):
    write_user_conf(tmp_path / "conf")
    help_text = run_cli(["--help"], cwd=tmp_path).stdout
    model_line = next(line for line in help_text.splitlines() if line.startswith("model: "))
    assert "mine" in model_line.split(": ")[1].split(", ") and "team/mine" in help_text
    run_cli(["experiment=team/mine", *FAST, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3
    bad = run_cli(["model=tiny"], cwd=tmp_path, check=False, env={ENV_VAR: str(tmp_path / "missing")})
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"error: {ENV_VAR} names")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_user_search_path_joins_the_overrides_before_hydra_flags(tmp_path, monkeypatch):
    write_user_conf(tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    ours = f"hydra.searchpath=['file://{(tmp_path / 'conf').resolve()}']"
    # `model=mine --cfg job --package model`: after the flags argparse would refuse it
    assert with_user_search_path(["model=mine", "--cfg", "job", "--package", "model"]) == [
        "model=mine",
        ours,
        "--cfg",
        "job",
        "--package",
        "model",
    ]
    assert with_user_search_path(["--cfg", "job"]) == ["--cfg", "job", ours]
