"""The override check holds with every Hydra flag (-m, --cfg, --package, --info, --help, hydra.* overrides) and
checks each value a multirun sweeps: a group choice or experiment that does not exist fails before anything runs,
with one ``error:`` line and exit status 2 (it was skipped whenever an argument started with '-')."""

from __future__ import annotations

import pytest

from fewstep.config.validate import check_overrides, sweep_points

from helpers import run_cli

OBJECTIVES = "choose one of: dmd2, flow_matching, meanflow, rcgm, scm, twinflow"
EXPERIMENT = "experiment=sweep/objectivs does not exist (did you mean sweep/objectives?); choose one of: "


@pytest.mark.parametrize(
    "argv, message",
    [
        (["experiment=sweep/objectivs", "--cfg", "job"], EXPERIMENT),
        (["-m", "experiment=sweep/objectivs"], EXPERIMENT),
        (["--multirun", "experiment=sweep/objectives,sweep/objectivs"], EXPERIMENT),  # the second value
        (["trainer.max_step=500", "--cfg", "job"], "unknown config key trainer.max_step (did you mean trainer.max_"),
        (["model=tiny_wid", "--cfg", "job"], "model=tiny_wid is not a choice (did you mean tiny?)"),
        (["--cfg=job", "--package", "model", "model=tiny_wid"], "model=tiny_wid is not a choice"),
        (["-c", "all", "--resolve", "sampler=ucgm_anyy"], "sampler=ucgm_anyy is not a choice (did you mean ucgm_any?)"),
        (["--info", "defaults", "model=tiny_wid"], "model=tiny_wid is not a choice"),
        (["--help", "objective=rcgmm"], "objective=rcgmm is not a choice (did you mean rcgm?)"),
        (["--cfg", "job", "-p", "objectiv"], "--package objectiv: no such node in the config (did you mean objective?"),
        (["-m", "objective=rcgm,dmd3"], f"objective=dmd3 is not a choice (did you mean dmd2?); {OBJECTIVES}"),
        (["hydra.mode=MULTIRUN", "objective=rcgm,dmd3"], "objective=dmd3 is not a choice"),
        (["-m", "objective=rcgm", "trainer.lr=choice(1e-3,abc)"], "trainer.lr=abc: Value 'abc' of type 'str' could"),
        (["-m", "objective.estimate_order=range(1,3)", "objective=flow_matching"],
         "unknown config key objective.estimate_order (objective.estimate_order belongs to objective="),
        (["-m", "trainer.lr=interval(0.001,0.01)", "trainer.max_stepz=3"], "unknown config key trainer.max_stepz"),
        (["-m", "model=glob(tiny*)", "trainer.max_stepz=3"], "unknown config key trainer.max_stepz"),
        (["-m", "objective=rcgm,dmd2", "objective.delta_t=0.1"], "unknown config key objective.delta_t"),  # dmd2
        (["hydra.run.dir=/tmp/x", "model=tiny_wid"], "model=tiny_wid is not a choice"),
        (["hydra/launcher=local_paralel"], "hydra/launcher=local_paralel is not a choice (did you mean local_paral"),
        (["hydra.run.dri=/x"], "hydra.run.dri=/x: Hydra's config has no key hydra.run.dri (did you mean hydra.run.dir"),
        (["objective=rcgm,dmd2"], "'objective=rcgm,dmd2': a comma list (or range/choice) sweeps, which needs -m"),
        (["-m", "--cfg", "job", "experiment=sweep/objectives"], "--multirun and --cfg: Hydra takes only one of"),
    ],
)  # fmt: skip
def test_flags_and_sweeps_do_not_skip_the_check(argv, message):
    problem = check_overrides(argv)
    assert problem is not None and message in problem, problem
    assert "\n" not in problem


def test_an_experiment_files_own_grid_is_checked_too(tmp_path, monkeypatch):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "grid.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      objective: rcgm,dmdx\n"
    )
    monkeypatch.chdir(tmp_path)  # ./conf is on the search path
    assert check_overrides(["-m", "experiment=grid"]).startswith("objective=dmdx is not a choice (did you mean dmd2?)")
    assert check_overrides(["-m", "experiment=grid", "objective=rcgm,twinflow"]) is None  # the command line's axis


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "experiment=sweep/objectives"],
        ["-m", "experiment=sweep/optuna_digits", "hydra.sweeper.n_trials=1"],
        ["-m", "experiment=sweep/toy2d_smoke", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"],
        ["-m", "objective.estimate_order=range(1,4)", "objective.delta_t=tag(log,interval(0.002,0.05))"],
        ["experiment=sweep/objectives", "--cfg", "job", "--package", "trainer.init_from"],
        ["--info", "searchpath"],
        ["--cfg", "hydra", "hydra.run.dir=/tmp/x", "hydra.job.chdir=true"],
        ["--version"],
        ["-cn", "another_primary_config", "model=anything"],  # another primary config: Hydra's to compose
    ],
)
def test_valid_command_lines_with_flags_pass(argv):
    assert check_overrides(argv) is None


def test_each_value_of_each_axis_is_composed_once_not_their_product():
    points = sweep_points(["a=1,2,3", "b=x", "c=range(0,2)", "hydra.sweeper.params.d=5,6", "e=glob(*)"])
    assert points == [
        ["a=1", "b=x", "c=0"],
        ["a=2", "b=x", "c=0"],
        ["a=3", "b=x", "c=0"],
        ["a=1", "b=x", "c=1"],
    ]
    assert sweep_points(["+x@pkg=choice(p,q)"]) == [["+x@pkg=p"], ["+x@pkg=q"]]
    assert sweep_points(["lr=interval(1,4)", "s=tag(log,interval(0.002,0.05))"]) == [["lr=1", "s=0.002"]]
    assert sweep_points(["a=[1"]).startswith("cannot parse the overrides:")


@pytest.mark.parametrize(
    "argv, error",
    [
        (["-m", "experiment=sweep/objectivs", "trainer.max_steps=2"], "error: " + EXPERIMENT),
        pytest.param(["experiment=sweep/objectivs", "--cfg", "job"], "error: " + EXPERIMENT, marks=pytest.mark.slow),
        pytest.param(
            ["trainer.max_step=500", "--cfg", "job"],
            "error: unknown config key trainer.max_step (did you mean",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["model=tiny_wid", "--cfg", "job"],
            "error: model=tiny_wid is not a choice (did you mean tiny?)",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_cli_prints_one_error_line_exits_2_and_runs_nothing(argv, error, tmp_path):
    """Before: the misspelt experiment printed the default config (exit 0) or, with -m, trained the default
    model into multirun/ (exit 0); the misspelt key and choice printed Hydra's 7-line block (exit 1)."""
    proc = run_cli(argv, tmp_path, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(error), lines
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == []  # no multirun/, outputs/
