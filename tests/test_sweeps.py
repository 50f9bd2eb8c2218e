"""Sweeps: the experiment=sweep/* presets, the launcher/sweeper plugins, real tiny multiruns and the report."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from fewstep.config.schema import CONF_DIR, compose_config
from fewstep.report import collect, lookup_metric, write_report
from fewstep.report import main as report_main

from helpers import FAST, run_cli

ROOT = Path(__file__).resolve().parents[1]
SWEEP_CONF = CONF_DIR / "experiment" / "sweep"
# grid presets: swept key -> number of values
GRIDS = {
    "delta_t_x_enhanced": {"objective.delta_t": 3, "objective.enhanced_ratio": 3},
    "order_x_steps": {"objective.estimate_order": 3, "objective.target_step_count": 3},
    "toy2d_smoke": {"objective.delta_t": 2, "objective.estimate_order": 2},
    "objectives": {"objective": 6},
}
DIGITS_BUDGET_S = 30 * 60  # a default digits sweep must finish in 30 min on 2 cores
PER_RUN_OVERHEAD_S = 40  # start-up, 1/2/4-NFE evaluation and checkpoints, on top of trainer.time_limit_s
TOY = ["data=toy2d", "model=tiny_toy", "data.batch_size=32", *FAST]


def compose_hydra(overrides: list[str]):
    """Composed config including the ``hydra`` node (sweeper params, launcher, callbacks)."""
    return compose_config(overrides, return_hydra_config=True)


def csv_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "module, package",
    [
        ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
        ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
        ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    ],
)
def test_sweep_plugins_of_the_dev_extras_are_installed(module, package):
    """The launcher/sweeper tests below use these plugins unconditionally (`make setup` installs them)."""
    assert importlib.util.find_spec(module) is not None, f"{package} not installed: pip install -e '.[dev]'"


def test_every_preset_is_known_and_has_a_script():
    presets = {p.stem for p in SWEEP_CONF.glob("*.yaml")}
    assert presets == set(GRIDS) | {"optuna_digits"}
    for name in presets:
        script = (ROOT / "sweeps" / f"{name}.sh").read_text()
        assert f"experiment=sweep/{name}" in script, name


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_grid_preset_composes_with_its_grid_and_report_callback(name):
    cfg = compose_hydra([f"experiment=sweep/{name}"])
    params = cfg.hydra.sweeper.params
    assert {k: len(str(v).split(",")) for k, v in params.items()} == GRIDS[name]
    assert cfg.hydra.callbacks.sweep_report._target_ == "fewstep.report.SweepReportCallback"
    assert cfg.objective.probs.adv > 0  # TwinFlow proper, not RCGM
    if cfg.data._target_.endswith("DigitsData"):
        points = 1
        for n in GRIDS[name].values():
            points *= n
        assert cfg.trainer.time_limit_s > 0
        assert points * (cfg.trainer.time_limit_s + PER_RUN_OVERHEAD_S) <= DIGITS_BUDGET_S


def test_command_line_values_override_a_preset_axis():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_hydra(["experiment=sweep/delta_t_x_enhanced"])
    declared = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides([*declared, "objective.enhanced_ratio=0.5"])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert len(jobs) == 3 and all("objective.enhanced_ratio=0.5" in job for job in jobs)


def test_slurm_launcher_preset_runs_one_task_per_gpu():
    cfg = compose_hydra(["experiment=sweep/delta_t_x_enhanced", "hydra/launcher=slurm_accelerate"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.nodes == 1


def test_local_parallel_launcher_preset_composes():
    cfg = compose_hydra(["experiment=sweep/toy2d_smoke", "hydra/launcher=local_parallel"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_optuna_preset_composes_with_its_search_space():
    cfg = compose_hydra(["experiment=sweep/optuna_digits"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {
        "objective.delta_t",
        "objective.enhanced_ratio",
        "objective.estimate_order",
        "objective.dist_match_coef",
    }
    assert cfg.optimize_metric == "eval.nfe_1.fd"


# --------------------------------------------------------------------------- the report on fabricated runs


def fake_run(root: Path, num: int, overrides: list[str], summary: dict | None, losses=(2.0, 1.5, 1.2)):
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = [{"step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def digits_summary(fd: float, acc: float = 0.9) -> dict:
    metrics = {"acc": acc, "fd": fd, "pixel_fd": fd / 10, "precision": 0.5, "recall": 0.4}
    return {
        "steps": 30,
        "wall_time_s": 3.0,
        "steps_per_s": 10.0,
        "peak_memory_mb": 100.0,
        "nfe/per_step": 3.0,
        "loss": 1.2,
        "eval": {"nfe_1": metrics, "nfe_2": {**metrics, "fd": fd / 2}, "euler_50": {**metrics, "fd": 1.0}},
    }


def test_report_on_a_grid_with_failed_runs(tmp_path):
    fd = {(0.01, 0): 30.0, (0.01, 0.5): 20.0, (0.02, 0): 25.0}
    num = 0
    for (dt, er), value in fd.items():
        fake_run(tmp_path, num, [f"objective.delta_t={dt}", f"objective.enhanced_ratio={er}", "logger=none"],
                 digits_summary(value))  # fmt: skip
        num += 1
    fake_run(tmp_path, num, ["objective.delta_t=0.02", "objective.enhanced_ratio=0.5", "logger=none"], None, (2.0,))
    broken = fake_run(tmp_path, num + 1, ["objective.delta_t=0.03", "objective.enhanced_ratio=0", "logger=none"], None)
    (broken / "summary.json").write_text("{not json")
    (tmp_path / ".submitit").mkdir()  # launcher folders are not runs

    out = write_report(tmp_path)

    assert out["params"] == ["objective.delta_t", "objective.enhanced_ratio"]
    assert out["headline"] == "nfe_1/fd" and out["runs"] == 5 and out["failed"] == 2
    rows = csv_rows(tmp_path / "report.csv")
    with open(tmp_path / "report.csv") as f:
        header = next(csv.reader(f))
    assert len(header) == len(set(header)) and header.count("nfe/per_step") == 1  # no column twice
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert [float(r["nfe_1/fd"]) for r in rows[:3]] == [30.0, 20.0, 25.0]
    assert float(rows[1]["nfe_2/fd"]) == 10.0 and float(rows[0]["euler_50/fd"]) == 1.0
    assert rows[3]["steps"] == "10" and float(rows[3]["loss"]) == 2.0  # how far the failed run got
    assert rows[3]["nfe_1/fd"] == ""
    for col in ("steps_per_s", "wall_time_s", "peak_memory_mb", "nfe_1/acc", "nfe_1/pixel_fd", "nfe_1/precision"):
        assert col in rows[0], col
    md = (tmp_path / "report.md").read_text()
    assert "run 1 (objective.delta_t=0.01, objective.enhanced_ratio=0.5) = 20" in md
    assert "Failed or unfinished (no summary.json): 3, 4" in md
    assert "nfe_1/precision" not in md  # the Markdown table keeps the headline metrics
    assert (tmp_path / "heatmap_nfe_1_fd.png").stat().st_size > 0
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_report_one_axis_gives_a_line_plot_and_three_axes_none(tmp_path):
    one = tmp_path / "one"
    for i, lr in enumerate(("1e-3", "1e-4")):
        fake_run(one, i, [f"trainer.lr={lr}", "data=toy2d"], {"steps": 5, "loss": 1.0 + i, "eval": {}})
    out = write_report(one)
    assert out["params"] == ["trainer.lr"] and out["headline"] == "loss"
    assert (one / "line_loss.png").exists() and not list(one.glob("heatmap_*"))

    three = tmp_path / "three"
    for i in range(2):
        fake_run(three, i, [f"a.x={i}", f"a.y={i}", f"a.z={i}"], {"steps": 5, "eval": {"nfe_1": {"swd": 0.1 * i}}})
    out = write_report(three)
    assert out["params"] == ["a.x", "a.y", "a.z"] and out["headline"] == "nfe_1/swd"
    assert not list(three.glob("heatmap_*")) and not list(three.glob("line_*"))
    assert "No heatmap: 3 parameters vary" in (three / "report.md").read_text()


def test_report_footer_names_only_the_metrics_the_runs_have(tmp_path):
    """The footer said "precision and recall included" for every sweep; a toy2d sweep has swd only, a sweep without
    evaluation no metric at all. It names the metrics that only report.csv has, or says there are none."""
    digits, toy, plain = tmp_path / "digits", tmp_path / "toy", tmp_path / "plain"
    for i in range(2):
        fake_run(digits, i, [f"trainer.lr={i}"], digits_summary(10.0 + i))
        fake_run(toy, i, [f"trainer.lr={i}"], {"steps": 5, "eval": {"nfe_1": {"swd": 0.1 + i}}})
        fake_run(plain, i, [f"trainer.lr={i}"], {"steps": 5, "loss": 1.0 + i, "eval": {}})
    footers = {}
    for root in (digits, toy, plain):
        write_report(root)
        footers[root.name] = (root / "report.md").read_text().strip().splitlines()[-1]
    assert footers == {
        "digits": "baseline; report.csv has every column, precision and recall included.",
        "toy": "baseline; report.csv has every column.",
        "plain": "No quality metrics: the runs were not evaluated (trainer.evaluate=false, or data without an "
        "evaluator); report.csv has every column.",
    }


def test_report_reads_declared_sweep_keys_for_a_single_run_and_eval_json(tmp_path):
    run = fake_run(tmp_path, 0, ["objective.delta_t=0.01", "data=toy2d"], {"steps": 5, "eval": {}})
    (run / "eval.json").write_text(json.dumps({"metrics": {"nfe_1": {"swd": 0.25}}}))
    params = {"objective.delta_t": "0.01,0.02", "objective.enhanced_ratio": "0,0.5"}
    task = ["data=toy2d", "objective.enhanced_ratio=0"]  # the command line collapsed one declared axis
    multirun = {"hydra": {"sweeper": {"params": params}, "overrides": {"task": task}}}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    runs, params = collect(tmp_path)
    assert params == ["objective.delta_t"]
    assert runs[0].values["nfe_1/swd"] == 0.25


def test_report_cli_without_runs_fails_with_one_line(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_report_cli_errors_are_one_error_line_like_every_tool(tmp_path):
    """They were argparse's two lines, ``usage: ...`` then ``python -m fewstep.report: error: ...``; now the one
    ``error: ...; usage: ...`` line and exit status 2 of every fewstep tool. The positional dir still works."""
    usage = "usage: python -m fewstep.report [-h] [multirun_dir]"
    for args, problem in (
        ([str(tmp_path / "nope")], f"{tmp_path / 'nope'}: not a directory"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        ([], "no MULTIRUN_DIR given and no multirun/<date>/<time> with runs under the current directory"),
    ):
        proc = run_cli(args, tmp_path, module="fewstep.report", check=False)
        assert (proc.returncode, proc.stderr) == (2, f"error: {problem}; {usage}\n")
    fake_run(tmp_path / "sweep", 0, ["trainer.lr=1"], {"steps": 5, "loss": 1.0, "eval": {}})
    proc = run_cli([str(tmp_path / "sweep")], tmp_path, module="fewstep.report")
    assert "| 0 | ok | 5 |" in proc.stdout and (tmp_path / "sweep" / "report.csv").exists()


def test_lookup_metric_walks_the_summary_and_names_what_exists():
    summary = digits_summary(12.5)
    assert lookup_metric(summary, "eval.nfe_1.fd") == 12.5
    assert lookup_metric(summary, "steps_per_s") == 10.0
    with pytest.raises(KeyError, match="no 'nfe_4' in eval .has: euler_50, nfe_1, nfe_2"):
        lookup_metric(summary, "eval.nfe_4.fd")


# --------------------------------------------------------------------------- real tiny multiruns


@pytest.mark.slow
def test_plain_override_sweep_then_report(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    args = [
        "-m", *TOY, "trainer.max_steps=6",
        "objective.delta_t=0.01,0.02", "objective.enhanced_ratio=0,0.5", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    run_cli(args, tmp_path)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    assert report_main([str(sweep)]) == 0  # the CLI's own process: test_report_cli_errors_are_one_error_line_...
    assert "| 3 | ok | 0.02 | 0.5 | 6 |" in capsys.readouterr().out
    rows = csv_rows(sweep / "report.csv")
    assert [(r["objective.delta_t"], r["objective.enhanced_ratio"]) for r in rows] == [
        ("0.01", "0"), ("0.01", "0.5"), ("0.02", "0"), ("0.02", "0.5"),
    ]  # fmt: skip
    assert all(r["status"] == "ok" and r["steps"] == "6" and float(r["loss"]) > 0 for r in rows)
    assert (sweep / "heatmap_loss.png").exists() and (sweep / "loss_curves.png").exists()


@pytest.mark.slow
def test_sweep_preset_reports_itself_with_a_failed_point(tmp_path):
    sweep = tmp_path / "multirun"
    # 1-NFE evaluation only (the report's metric here; the preset's default also evaluates 2 and 4 NFE)
    args = ["-m", "experiment=sweep/toy2d_smoke", "trainer.max_steps=4", "objective.estimate_order=1",
            "trainer.final_nfe=[1]"]  # fmt: skip
    proc = run_cli([*args, "objective.delta_t=0.01,0.9", f"hydra.sweep.dir={sweep}"], tmp_path, check=False)
    assert proc.returncode != 0 and "objective.delta_t=0.9 must lie in (0, 0.5]" in proc.stderr
    rows = csv_rows(sweep / "report.csv")  # written by the preset's callback after each job, failed ones too
    assert [(r["objective.delta_t"], r["status"]) for r in rows] == [("0.01", "ok"), ("0.9", "failed")]
    assert float(rows[0]["nfe_1/swd"]) > 0 and rows[1]["nfe_1/swd"] == ""
    assert (sweep / "line_nfe_1_swd.png").exists() and not list(sweep.glob("heatmap_*"))
    assert "Failed or unfinished (no summary.json): 1" in (sweep / "report.md").read_text()
    # the report says "See each run's `__main__.log`": the failed point's log holds the error
    assert "objective.delta_t=0.9 must lie in (0, 0.5]" in (sweep / "1" / "__main__.log").read_text()


@pytest.mark.slow
def test_local_parallel_launcher_runs_points_in_parallel(tmp_path):
    sweep = tmp_path / "multirun"
    args = ["-m", "experiment=sweep/toy2d_smoke", "hydra/launcher=local_parallel", "trainer.torch_threads=1"]
    args += ["trainer.max_steps=3", "objective.estimate_order=1", "trainer.final_nfe=[1]"]
    run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = csv_rows(sweep / "report.csv")
    assert [(r["objective.delta_t"], r["status"], r["steps"]) for r in rows] == [
        ("0.01", "ok", "3"),
        ("0.05", "ok", "3"),
    ]


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_point_as_a_job(tmp_path):
    sweep = tmp_path / "multirun"
    args = ["-m", *TOY, "trainer.max_steps=3", "objective.delta_t=0.01,0.02", "hydra/launcher=submitit_local"]
    run_cli([*args, "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}"], tmp_path)
    for num in ("0", "1"):
        assert json.loads((sweep / num / "summary.json").read_text())["steps"] == 3
    assert write_report(sweep)["failed"] == 0


@pytest.mark.slow
def test_optuna_sweep_optimises_the_returned_metric(tmp_path):
    sweep = tmp_path / "multirun"
    args = [
        "-m", "experiment=sweep/optuna_digits", *TOY, "trainer.evaluate=true", "trainer.max_steps=4",
        "trainer.final_nfe=[1]", "optimize_metric=eval.nfe_1.swd", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    run_cli(args, tmp_path)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [float(r["nfe_1/swd"]) for r in csv_rows(sweep / "report.csv")]
    assert result["best_value"] == pytest.approx(min(values))


def test_the_report_quotes_why_a_failed_run_failed(tmp_path):
    """A failed row said only "See each run's __main__.log"; the log's "run failed:" line is quoted beside it."""
    fake_run(tmp_path, 0, ["objective.delta_t=0.01"], digits_summary(20.0))
    failed = fake_run(tmp_path, 1, ["objective.delta_t=0.02"], None)
    (failed / "__main__.log").write_text(
        "[2026-11-27 01:45:14,384][INFO] run dir ...\n"
        "[2026-11-27 01:45:14,385][ERROR] run failed: trainer.init_from=/x/../0: no valid checkpoint found there\n"
    )
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "- 1: trainer.init_from=/x/../0: no valid checkpoint found there\n" in md
