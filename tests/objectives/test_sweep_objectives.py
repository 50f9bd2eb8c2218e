"""experiment=sweep/objectives: the six objectives at one wall budget, dmd2 starting from the sweep's own
flow-matching run, and the report table."""

from __future__ import annotations

import csv
import json

import pytest

from fewstep.config.schema import compose_config, when

from helpers import FAST, run_cli

OBJECTIVES = ["flow_matching", "rcgm", "twinflow", "meanflow", "scm", "dmd2"]


def test_preset_sweeps_every_objective_in_order_at_one_budget():
    cfg = compose_config(["experiment=sweep/objectives"], return_hydra_config=True)
    assert str(cfg.hydra.sweeper.params.objective).split(",") == OBJECTIVES  # flow matching first: job 0
    assert cfg.trainer.time_limit_s == 240 and cfg.trainer.lr_schedule == "constant"
    assert when("dmd2", "dmd2", "/runs/0") == "/runs/0" and when("scm", "dmd2", "/runs/0") is None


@pytest.mark.slow
def test_objectives_sweep_runs_and_reports(tmp_path):
    sweep = tmp_path / "multirun"
    # at most 6 steps (one DMD2 critic/generator cycle) within the 1 s budget: the assertions read the table
    args = ["-m", "experiment=sweep/objectives", "trainer.time_limit_s=1", "trainer.max_steps=6", "data.batch_size=16",
            *FAST,
            "trainer.final_nfe=[1]", "trainer.log_every=1", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    run_cli(args, tmp_path)
    with (sweep / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["objective"] for r in rows] == OBJECTIVES
    assert all(r["status"] == "ok" and float(r["nfe/per_step"]) >= 1 for r in rows)
    # each point's final checkpoint records the init_from it started from (resolved): dmd2 the sweep's own
    # flow-matching run (job 0), the others nothing
    started = []
    for job in range(len(OBJECTIVES)):
        final = sorted((sweep / str(job) / "checkpoints").glob("step_*"))[-1]
        started.append(json.loads((final / "state.json").read_text())["init_from"])
    assert started == [None] * 5 + [str((sweep / "0").resolve())]
    assert "DMD2" in (sweep / "5" / "summary.json").read_text()
