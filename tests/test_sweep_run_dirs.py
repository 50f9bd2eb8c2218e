"""A run of a sweep is usable after the sweep: every tool that reads a run dir (sample, eval, export, report,
resume, trainer.init_from=) works on the runs each shipped sweep preset writes, although a preset may set keys
from Hydra's job state (``${hydra:runtime.choices.objective}``, ``${hydra:runtime.output_dir}``), which only a
Hydra job resolves (fewstep.training.runs.resolve_hydra_interpolations)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fewstep.config.schema import CONF_DIR
from fewstep.training.runs import RunDirError, read_run_config

from helpers import FAST, run_cli

TINY = ["model.width=32", "model.depth=1", "model.emb_dim=16", "data.batch_size=16", "trainer.max_steps=3",
        "trainer.time_limit_s=0", "trainer.grid_size=4", *FAST]  # fmt: skip
# one tiny point of each preset: the command line replaces each swept axis by one value (objectives: two, so that
# its dmd2 arm starts from job 0 as the preset wires it); optuna: one trial, scored on the 1-NFE digits-FD
POINTS = {
    "delta_t_x_enhanced": ["objective.delta_t=0.01", "objective.enhanced_ratio=0.5"],
    "order_x_steps": ["objective.estimate_order=2", "objective.target_step_count=2"],
    "toy2d_smoke": ["objective.delta_t=0.01", "objective.estimate_order=1"],
    "objectives": ["objective=scm,dmd2"],
    "optuna_digits": ["hydra.sweeper.n_trials=1", "trainer.evaluate=true", "trainer.final_nfe=[1]"],
}


def test_every_shipped_sweep_preset_has_a_tiny_point_here():
    assert sorted(POINTS) == sorted(p.stem for p in (CONF_DIR / "experiment" / "sweep").glob("*.yaml"))


def fake_sweep_point(root: Path, objective: str, job: int) -> Path:
    """A run dir as experiment=sweep/objectives writes it: .hydra/config.yaml keeps the preset's ${hydra:...}
    values as written, .hydra/hydra.yaml the job's Hydra state."""
    run = root / str(job)
    (run / ".hydra").mkdir(parents=True)
    preset = yaml.safe_load((CONF_DIR / "experiment" / "sweep" / "objectives.yaml").read_text())
    model = {"_target_": "fewstep.models.tiny.TinyMLP", "width": 32, "time_scale": preset["model"]["time_scale"]}
    trainer = {"init_from": preset["trainer"]["init_from"], "lr": "${model.width}"}
    cfg = OmegaConf.create({"model": model, "trainer": trainer})
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    hydra = {"hydra": {"runtime": {"output_dir": f"/elsewhere/sweep/{job}", "choices": {"objective": objective}},
                       "job": {"num": job}}}  # fmt: skip
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    return run


def test_a_sweep_points_hydra_values_resolve_from_its_hydra_yaml(tmp_path):
    """sample and eval stopped with omegaconf's UnsupportedInterpolationType: "hydra" on these runs."""
    flow = fake_sweep_point(tmp_path / "sweep", "flow_matching", 0)
    scm = fake_sweep_point(tmp_path / "sweep", "scm", 4)
    dmd2 = fake_sweep_point(tmp_path / "sweep", "dmd2", 5)
    assert "${hydra:runtime.choices.objective}" in (scm / ".hydra" / "config.yaml").read_text()
    cfg = read_run_config(flow, "sample")
    assert cfg.model.time_scale == 1000.0 and cfg.trainer.init_from is None
    assert read_run_config(scm, "sample").model.time_scale == 1.0  # sCM trained with c_noise(t) = t
    cfg = read_run_config(dmd2, "eval")
    # runtime.output_dir is the run dir where it is now (the sweep folder moved since: hydra.yaml says /elsewhere)
    assert cfg.model.time_scale == 1000.0 and cfg.trainer.init_from == f"{dmd2.resolve()}/../0"
    assert Path(cfg.trainer.init_from).resolve() == flow.resolve()
    assert OmegaConf.to_container(cfg)["trainer"]["lr"] == "${model.width}"  # other interpolations as written


def test_a_sweep_point_without_its_hydra_yaml_is_one_line(tmp_path):
    run = fake_sweep_point(tmp_path / "sweep", "scm", 4)
    (run / ".hydra" / "hydra.yaml").unlink()
    with pytest.raises(RunDirError, match=r"sets model.time_scale from Hydra's job state .*hydra.yaml is missing"):
        read_run_config(run, "sample")
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"output_dir": "/x"}}}))
    with pytest.raises(RunDirError, match=r"model.time_scale=\$\{fewstep_when:.*does not resolve from"):
        read_run_config(run, "sample")


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(POINTS))
def test_every_tool_works_on_a_run_of_each_sweep_preset(preset, tmp_path):
    from fewstep.eval.__main__ import main as eval_main
    from fewstep.export.command import main as export_main
    from fewstep.report import main as report_main
    from fewstep.sample import main as sample_main

    sweep = tmp_path / "multirun"
    args = ["-m", f"experiment=sweep/{preset}", *TINY, *POINTS[preset], f"hydra.sweep.dir={sweep}"]
    run_cli(args, tmp_path)
    points = sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file())
    assert [p.name for p in points] == (["0", "1"] if preset == "objectives" else ["0"])
    for point in points:
        sample_main([f"run_dir={point}", "nfe=[1]"])
        assert (point / "samples" / "nfe_1.npz").is_file()
        metrics = eval_main([f"run_dir={point}", "nfe=[1]", "baseline_steps=0"])["metrics"]
        assert set(metrics) == {"nfe_1"} and json.loads((point / "eval.json").read_text())["step"] == 3
        with pytest.raises(SystemExit, match="fewstep.export writes diffusers pipelines of the transformer families"):
            export_main([f"run_dir={point}", f"out={tmp_path / 'export'}"])  # a tiny MLP: refused by design
    if preset == "objectives":  # the scm point sampled with the time scale it trained with; dmd2 started from job 0
        assert read_run_config(points[0], "sample").model.time_scale == 1.0
        state = json.loads(next((points[1] / "checkpoints").glob("step_*/state.json")).read_text())
        assert Path(state["init_from"]) == points[0].resolve()
    assert report_main([str(sweep)]) == 0 and (sweep / "report.csv").is_file()

    moved = tmp_path / "moved"  # the sweep folder moved: its runs still read, sample and resume
    shutil.move(sweep, moved)
    sample_main([f"run_dir={moved / points[-1].name}", "nfe=[1]"])
    resumed = run_cli([*args[:-1], "trainer.max_steps=5", f"hydra.sweep.dir={moved}"], tmp_path)
    log = resumed.stdout + resumed.stderr
    assert log.count("resumed from") == len(points), log[-3000:]
    for point in points:
        assert json.loads((moved / point.name / "summary.json").read_text())["steps"] == 5

    model = ["model=tiny_toy", "data=toy2d"] if preset == "toy2d_smoke" else []
    init = run_cli([*model, *TINY, f"trainer.init_from={moved / points[-1].name}",
                    f"hydra.run.dir={tmp_path / 'init'}"], tmp_path)  # fmt: skip
    assert "summary in" in init.stderr + init.stdout
    state = json.loads(next((tmp_path / "init" / "checkpoints").glob("step_*/state.json")).read_text())
    assert Path(state["init_from"]) == (moved / points[-1].name).resolve()
