"""The loop end to end: artifacts of the output contract, exact resume, fault handling."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import fewstep.training.loop
from fewstep.training import checkpoint as ckpt_io
from fewstep.training.loop import RunFinished, TrainingAborted, train
from fewstep.training.resume import GLOBAL_BATCH, changed_settings, finished_problem, run_settings, with_global_batch
from fewstep.training.throughput import WALL_CLOCK_KEYS
from fewstep.training.trainables import lr_factor

from helpers import FAST, compose, run_cli, torch_threads

TOY = ["data=toy2d", "model=tiny_toy", "data.batch_size=32", *FAST]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_ckpt(run_dir):
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


@pytest.mark.slow
def test_cli_toy2d_writes_the_output_contract(tmp_path):
    run_cli([*TOY, "trainer.max_steps=12", "trainer.checkpoint_every=6", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").exists()
    metrics = rows(run)
    assert [r["step"] for r in metrics] == [5, 10, 12]
    for key in ("loss", "loss/main", "loss/rectify", "lr", "grad_norm", "steps_per_s", "nfe/per_step", "nfe/rows_grad"):
        assert key in metrics[-1], key
    assert {p.name for p in (run / "samples").glob("*.png")} == {"nfe_1.png", "nfe_2.png", "nfe_4.png"}
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_0000006", "step_0000012"]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("steps", "wall_time_s", "steps_per_s", "peak_memory_mb"):
        assert key in summary
    assert summary["steps"] == 12
    traj = [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]
    signs = {s for r in traj for s in r["sign"]}
    assert signs == {-1.0, 1.0}  # the adversarial negative times are recorded
    assert (run / "trajectory.png").exists()


def test_resuming_a_run_dir_of_another_objective_names_the_ways_out(tmp_path):
    """A run dir reused with another objective (trainer.resume=auto finds the old checkpoint): the one-line error
    says how to start fresh or take only the weights, not only to resume with the old config."""
    from fewstep.training.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(compose([*TOY, "objective=flow_matching", "trainer.max_steps=2", "trainer.checkpoint_every=2"]), run_dir=run)
    with pytest.raises(CheckpointError) as err:
        train(compose([*TOY, "trainer.max_steps=4", "trainer.resume=auto"]), run_dir=run)
    text = str(err.value)
    assert "does not match the model" in text and "trainer.resume=none" in text and "trainer.init_from=" in text
    assert "\n" not in text


def test_running_a_finished_run_again_changes_nothing_and_names_the_ways_on(tmp_path):
    """The same command again in a run dir that finished trainer.max_steps: not a 0-step "resume" that re-evaluates
    and rewrites summary.json (it wrote wall_time_s 0.0002, steps_per_s 0.0 and dropped euler_50), but one line
    naming how to go on, and every file left as it was. Raising trainer.max_steps trains on."""
    from fewstep.training.loop import RunFinished

    run = tmp_path / "run"
    args = [*TOY, "trainer.torch_threads=1", "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    first = train(compose(args), run_dir=run)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFinished) as err:
        train(compose(args), run_dir=run)
    text = str(err.value)
    assert f"{run} is already finished at step 4 (trainer.max_steps=4); its checkpoints, samples and summary" in text
    for way in ("raise trainer.max_steps", f"fewstep.eval run_dir={run}", f"fewstep.sample run_dir={run}"):
        assert way in text
    assert "another hydra.run.dir" in text and "\n" not in text
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before
    assert json.loads((run / "summary.json").read_text())["steps_per_s"] == first["steps_per_s"] > 0
    more = train(compose([*args[:-2], "trainer.max_steps=6", "trainer.checkpoint_every=2"]), run_dir=run)
    assert (more["start_step"], more["steps"]) == (4, 6)


@pytest.mark.slow
def test_cli_finished_run_again_is_one_error_line_and_a_sweep_again_skips_its_points(tmp_path):
    """CLI: a single run is refused in one ``error:`` line with exit status 2, every file of the finished run left
    byte-identical (Hydra used to rewrite its ``.hydra/*.yaml`` with the refused launch's config and append to its
    log); a sweep launched again into its sweep dir skips its finished points (exit 0, their summaries untouched)
    instead of recording them as failed."""
    args = [*TOY, "trainer.torch_threads=1", "trainer.max_steps=3"]
    run = tmp_path / "run"
    with torch_threads(1):  # the finished run made in-process (trainer.torch_threads sets them process-wide)
        train(compose(args), run_dir=run)
    (run / ".hydra").mkdir()  # the record a CLI launch leaves (in-process training writes none)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"# the finished run's own {name}\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli([*args, "trainer.log_every=7", f"hydra.run.dir={run}"], tmp_path, check=False)
    assert proc.returncode == 2 and {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/run is already finished at step 3") and "Traceback" not in proc.stderr
    sweep = ["-m", *args, "objective.delta_t=0.01,0.02", f"hydra.sweep.dir={tmp_path}/sweep"]
    run_cli(sweep, tmp_path)
    summaries = [(tmp_path / "sweep" / p / "summary.json").read_bytes() for p in "01"]
    again = run_cli(sweep, tmp_path, check=False)
    assert again.returncode == 0, again.stderr
    assert [(tmp_path / "sweep" / p / "summary.json").read_bytes() for p in "01"] == summaries
    assert "skipped: " in (tmp_path / "sweep" / "1" / "__main__.log").read_text()


def test_the_finished_run_check_leaves_a_skipped_checkpoint_to_train_to_report(tmp_path, capsys):
    """A run dir whose newest checkpoint is incomplete: the Hydra callback printed 'skipping checkpoint ...' and
    train() printed it again, the same line twice at every launch."""
    from omegaconf import OmegaConf

    from fewstep.training.resume import FinishedRunCheck

    (tmp_path / "run" / "checkpoints" / "step_0000004").mkdir(parents=True)  # no state.json
    cfg = OmegaConf.create(
        {"hydra": {"run": {"dir": str(tmp_path / "run")}}, "trainer": {"resume": "auto", "max_steps": 4}}
    )
    FinishedRunCheck().on_run_start(cfg)
    assert capsys.readouterr().out == ""


def test_a_time_limited_run_reports_its_final_loss_between_log_steps(tmp_path):
    """Stopped by trainer.time_limit_s before any log step: summary.json still has the loss terms and nfe/*
    (of the steps since the last row), so the sweep report's final-loss and evals/step cells are not blank."""
    run = tmp_path / "run"
    args = [*TOY, "trainer.log_every=100000", "trainer.max_steps=100000", "trainer.time_limit_s=0.5"]
    summary = train(compose([*args, "trainer.final_nfe=[]"]), run_dir=run)
    assert 0 < summary["steps"] < 100000 and (run / "metrics.jsonl").read_text() == ""  # no metrics row yet
    assert math.isfinite(summary["loss"]) and summary["loss/main"] > 0 and summary["nfe/per_step"] > 1
    # it trained its budget: launched again with the same one it is finished (a time-budgeted sweep relaunched
    # skips its points instead of training each for another budget); another budget trains on
    assert summary["time_limit_s"] == 0.5
    with pytest.raises(RunFinished, match=r"already trained its trainer.time_limit_s=0.5 budget \(stopped at step"):
        train(compose([*args, "trainer.final_nfe=[]"]), run_dir=run)
    newest = ckpt_io.resolve_resume("auto", run)
    assert finished_problem(newest, run, 100000, 0.0) is None and finished_problem(newest, run, 100000, 1.0) is None


def test_metrics_jsonl_exists_even_when_no_log_step_was_reached(tmp_path):
    """README lists metrics.jsonl as always there: a run stopped by trainer.time_limit_s before its first log step
    has it, empty (it had none); max_steps below log_every logs its last step, one row."""
    limited = tmp_path / "limited"
    args = [*TOY, "trainer.torch_threads=1", "trainer.final_nfe=[]", "trainer.log_every=100000"]
    summary = train(compose([*args, "trainer.max_steps=100000", "trainer.time_limit_s=0.2"]), run_dir=limited)
    assert 0 < summary["steps"] < 100000 and (limited / "metrics.jsonl").read_text() == ""
    short = tmp_path / "short"
    train(compose([*args, "trainer.max_steps=3"]), run_dir=short)
    assert [r["step"] for r in rows(short)] == [3]


def test_toy2d_scatters_draw_the_data_behind_the_samples(tmp_path, monkeypatch):
    """100 points alone cannot show whether they lie on the moons: the final and validation scatters draw the
    distribution's own points behind them."""
    from matplotlib.axes import Axes

    import fewstep.training.outputs as generate
    from fewstep.training.loop import _validation_grid
    from fewstep.training.outputs import Share
    from fewstep.training.trainables import build_components

    drawn = []
    scatter = Axes.scatter
    monkeypatch.setattr(
        Axes, "scatter", lambda ax, x, y, **kw: drawn.append((kw.get("label"), len(x))) or scatter(ax, x, y, **kw)
    )
    data, objective, _, teacher, sampler = build_components(compose([*TOY, "trainer.torch_threads=1"]))
    generate.final_outputs(tmp_path, teacher.sampling_model, sampler, data, [1], 0, "cpu", evaluate=False)
    assert drawn == [("data", 1000), ("samples", 100)]

    class Writer:
        def log_images(self, step, images):
            pass

    class Acc:
        autocast = __import__("contextlib").nullcontext

    _validation_grid(tmp_path, 1, objective, sampler, teacher.sampling_model, data, "cpu", Acc(), Writer(), Share())
    assert drawn[2:] == [("data", 1000), ("samples", 50)]


def test_final_grid_titles_are_grammatical(tmp_path, monkeypatch):
    """The toy2d scatter's title read "nfe_1 (1 steps)"; one step is "1 step"."""
    import fewstep.training.outputs as generate

    titles = []
    monkeypatch.setattr(generate, "save_samples", lambda image, path, title, nrow, **kw: titles.append(title) or path)
    cfg = compose([*TOY, "trainer.torch_threads=1"])
    from fewstep.training.trainables import build_components

    data, _, model, teacher, sampler = build_components(cfg)
    generate.final_outputs(tmp_path, teacher.sampling_model, sampler, data, [1, 2], 3, "cpu", evaluate=False)
    assert titles == ["nfe_1 (1 step)", "nfe_2 (2 steps)", "euler_3 (3 steps)"]


def test_resume_is_bit_identical(tmp_path):
    base = [*TOY, "trainer.checkpoint_every=8", "trainer.log_every=4", "objective.enhanced_ratio=0.5"]
    base.append("trainer.lr_schedule=constant")  # a cosine schedule depends on max_steps, which differs here
    straight = tmp_path / "straight"
    train(compose([*base, "trainer.max_steps=16"]), run_dir=straight)
    split = tmp_path / "split"
    train(compose([*base, "trainer.max_steps=8"]), run_dir=split)
    resumed = train(compose([*base, "trainer.max_steps=16", "trainer.resume=auto"]), run_dir=split)
    # it went on from the step-8 checkpoint and ran the 8 steps left (a fresh 16-step run would end alike)
    assert (resumed["start_step"], resumed["steps"]) == (8, 16)
    written = json.loads((split / "summary.json").read_text())
    assert (written["start_step"], written["steps"]) == (8, 16)
    a, b = final_ckpt(straight), final_ckpt(split)
    assert a.name == b.name == "step_0000016"
    for name in ("model.safetensors", "teacher.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) == 0.0
    oa = torch.load(a / "optim.pt", weights_only=True)["optimizer"]["state"]
    ob = torch.load(b / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]) for k in oa)
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (a, b))
    assert sa["data_position"] == sb["data_position"] == 16

    def strip(r):
        return {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}

    assert [strip(r) for r in rows(straight)] == [strip(r) for r in rows(split)]


def test_nonfinite_batches_are_skipped_then_abort_keeps_checkpoint(tmp_path):
    from helpers import nan_data

    nan_data.NaNToy2D.nan_positions = {3}
    over = [*TOY, "data._target_=helpers.nan_data.NaNToy2D", "trainer.checkpoint_every=5"]
    summary = train(compose([*over, "trainer.max_steps=10"]), run_dir=tmp_path / "one")
    assert summary["nonfinite_skipped"] == 1
    assert all(
        torch.isfinite(v).all() for v in load_file(str(final_ckpt(tmp_path / "one") / "model.safetensors")).values()
    )

    nan_data.NaNToy2D.nan_positions = set(range(7, 100))
    with pytest.raises(TrainingAborted, match="non-finite steps in a row"):
        train(compose([*over, "trainer.max_steps=30", "trainer.max_nonfinite=3"]), run_dir=tmp_path / "two")
    ckpts = sorted((tmp_path / "two" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000005"]
    nan_data.NaNToy2D.nan_positions = set()


@pytest.mark.slow
def test_unknown_choice_fails_fast_listing_the_options(tmp_path):
    start = time.perf_counter()
    proc = run_cli(["objective=nope"], tmp_path, check=False)
    assert proc.returncode != 0 and time.perf_counter() - start < 5
    for choice in ("flow_matching", "rcgm", "twinflow"):
        assert choice in proc.stderr


@pytest.mark.slow
def test_wrong_type_fails_at_compose_naming_the_key(tmp_path):
    proc = run_cli(["trainer.lr=abc"], tmp_path, check=False)
    assert proc.returncode != 0 and "trainer.lr" in proc.stderr


@pytest.mark.slow
def test_sigint_writes_a_final_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep", *TOY, "trainer.max_steps=100000", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and rows(run)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpt = final_ckpt(run)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] >= 5 and int(ckpt.name.split("_")[1]) == state["step"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == state["step"]


@pytest.mark.slow
def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) with 32 rows per rank ends with the
    weights of 1 process with 32 rows x grad_accum 2: each row's data and noise depend only on its slot in
    the global batch. Only the order of the gradient sums differs, so the weights agree to float32 rounding."""
    common = [
        "data=digits", "data.batch_size=32", "model.width=64", "model.emb_dim=32", "objective.enhanced_ratio=0.5",
        "objective.cond_dropout=0.1", *FAST, "trainer.max_steps=10", "trainer.checkpoint_every=5",
    ]  # fmt: skip
    ddp = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "fewstep", *common, f"hydra.run.dir={ddp}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 10
    assert [r["step"] for r in rows(ddp)] == [5, 10]  # one writer
    state = json.loads((final_ckpt(ddp) / "state.json").read_text())
    assert state["data_position"] == 10
    ranks = torch.load(final_ckpt(ddp) / "rng.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2  # one RNG state per rank in the checkpoint

    single = tmp_path / "single"
    train(compose([*common, "trainer.grad_accum=2"]), run_dir=single)
    # the logged loss is the global batch's (mean over ranks), as the 1-process run's mean over its 2 micro-batches
    logged = {r["step"]: r for r in rows(single)}
    for row in rows(ddp):
        for key in ("loss", "loss/main", "grad_norm"):
            assert row[key] == pytest.approx(logged[row["step"]][key], rel=1e-4), (key, row["step"])
    for name in ("model.safetensors", "teacher.safetensors"):
        a, b = load_file(final_ckpt(ddp) / name), load_file(final_ckpt(single) / name)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, (name, worst)  # stated tolerance: 1e-5 absolute after 10 Adam steps at lr 2e-3
    moved = max(
        (load_file(final_ckpt(single) / "model.safetensors")[k] - v).abs().max().item()
        for k, v in load_file(final_ckpt(ddp).parent / "step_0000005" / "model.safetensors").items()
    )
    assert moved > 1e-3  # the comparison is not vacuous: the weights move by far more than the tolerance


@pytest.mark.slow
def test_wandb_logger_runs_offline_without_an_account(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    over = [o for o in TOY if not o.startswith("logger=")]
    train(compose([*over, "logger=wandb", "trainer.max_steps=6"]), run_dir=tmp_path / "run")
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert [r["step"] for r in rows(tmp_path / "run")] == [5, 6]  # metrics.jsonl is written as well
    run_id = (tmp_path / "run" / "wandb_run_id.txt").read_text().strip()
    assert offline[0].name.endswith(f"-{run_id}")
    # a resume logs into the same W&B run (one id per run dir), not a new one
    train(compose([*over, "logger=wandb", "trainer.max_steps=8"]), run_dir=tmp_path / "run")
    ids = {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")}
    assert ids == {run_id}


def schedule(kind: str, warmup: int, max_steps: int, min_ratio: float):
    from types import SimpleNamespace

    return SimpleNamespace(lr_schedule=kind, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_ratio)


COS_36 = 0.8090169943749475  # cos(pi/5): progress 0.2 of a cosine decay


@pytest.mark.parametrize(
    "kind, warmup, max_steps, min_ratio, expected",
    [
        # warm-up (step + 1)/4 for 4 steps, then decay over 10 steps to 0.1 at step 14, flat after
        ("cosine", 4, 14, 0.1, {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.1 + 0.9 * 0.5 * (1 + COS_36), 9: 0.55, 14: 0.1,
                                20: 0.1}),
        ("linear", 4, 14, 0.1, {0: 0.25, 2: 0.75, 4: 1.0, 6: 0.1 + 0.9 * 0.8, 9: 0.55, 13: 0.19, 14: 0.1, 30: 0.1}),
        ("constant", 4, 14, 0.1, {0: 0.25, 1: 0.5, 3: 1.0, 9: 1.0, 14: 1.0, 30: 1.0}),
        ("cosine", 0, 10, 0.0, {0: 1.0, 5: 0.5, 10: 0.0, 11: 0.0}),  # the default: no warm-up, decay to 0
        ("linear", 0, 8, 0.0, {0: 1.0, 2: 0.75, 6: 0.25, 8: 0.0}),
    ],
)  # fmt: skip
def test_lr_factor_by_hand(kind, warmup, max_steps, min_ratio, expected):
    tr = schedule(kind, warmup, max_steps, min_ratio)
    assert {step: lr_factor(step, tr) for step in expected} == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_grad_accum_updates_the_ema_once_per_optimizer_step_and_logs_the_schedule(tmp_path, monkeypatch):
    """trainer.grad_accum=3 for 4 steps: 12 micro-batch losses, 4 AdamW steps, exactly 4 EMA updates (the
    warm-up decay after 4 updates: 0 -> 0.495 -> 0.6199875 -> 0.6902922 -> 0.7367031); the logged LR is
    lr x lr_factor(step) (warm-up 2, cosine to 0.1 at step 4: 1, 1, 0.55, 0.1)."""
    from fewstep.objectives.twinflow import TwinFlow
    from fewstep.teachers import EMATeacher

    lerps, losses = [], []
    real_lerp, real_loss = EMATeacher._lerp, TwinFlow.loss
    monkeypatch.setattr(EMATeacher, "_lerp", staticmethod(lambda *a: lerps.append(1) or real_lerp(*a)))
    monkeypatch.setattr(TwinFlow, "loss", lambda self, *a: losses.append(1) or real_loss(self, *a))
    over = [*TOY, "trainer.grad_accum=3", "trainer.max_steps=4", "trainer.log_every=1", "trainer.lr=1e-3"]
    over += ["trainer.lr_schedule=cosine", "trainer.warmup_steps=2", "trainer.min_lr_ratio=0.1"]
    train(compose(over), run_dir=tmp_path / "run")
    assert len(losses) == 12 and len(lerps) == 4
    state = json.loads((final_ckpt(tmp_path / "run") / "state.json").read_text())
    assert state["teacher"]["last_step"] == 3
    assert state["teacher"]["current_decay"] == pytest.approx(0.7367031, abs=1e-7)
    adam = torch.load(final_ckpt(tmp_path / "run") / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {4}
    assert [r["lr"] for r in rows(tmp_path / "run")] == pytest.approx([1e-3, 1e-3, 0.55e-3, 0.1e-3], rel=1e-9)


@pytest.mark.slow
def test_bf16_training_on_the_cpu_matches_fp32(tmp_path, fresh_accelerator_state):
    """trainer.mixed_precision=bf16 on the CPU (autocast): 8 digits steps, finite losses within 5e-3 relative of
    the same run in fp32 at every step (measured: at most 7.5e-4), and not identical (autocast is in effect;
    step 1 is identical: the zero-initialised output layers make both runs' first outputs exactly 0)."""
    from accelerate.state import AcceleratorState

    common = ["data=digits", "data.batch_size=32", "model.width=64", "model.emb_dim=32", *FAST]
    common += ["trainer.max_steps=8", "trainer.log_every=1"]
    losses = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(True)
        run = tmp_path / precision
        train(compose([*common, f"trainer.mixed_precision={precision}"]), run_dir=run)
        losses[precision] = [r["loss"] for r in rows(run)]
    fp32, bf16 = losses["no"], losses["bf16"]
    assert len(bf16) == 8 and all(math.isfinite(v) for v in bf16)
    assert bf16 == pytest.approx(fp32, rel=5e-3)
    assert bf16[0] == fp32[0] and max(abs(a - b) for a, b in zip(fp32[1:], bf16[1:])) > 1e-5


def test_fp16_overflow_steps_lower_the_loss_scale_instead_of_aborting(tmp_path, monkeypatch, fresh_accelerator_state):
    """fp16 (a GradScaler; accelerate only builds one on a GPU, so one is put in on the CPU here): a step whose
    scaled gradients overflow is skipped, and the scaler must still back off, else the scale never drops and every
    later step overflows too. Scale 2^127 overflows float32 (at step 2 here); backoff 2^-40 makes the next step
    finite. Before the fix the step after the overflow raised "unscale_() has already been called on this optimizer
    since the last update()" (accelerate's clip_grad_norm_ unscales again without an update in between)."""
    import accelerate

    scalers = []

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-40)
            scalers.append(self.scaler)

        def unscale_gradients(self, optimizer=None):  # what accelerate does for native fp16
            for opt in self._optimizers:
                self.scaler.unscale_(opt.optimizer)

    monkeypatch.setattr(fewstep.training.loop, "Accelerator", ScaledAccelerator)
    over = [*TOY, "trainer.max_steps=6", "trainer.max_nonfinite=3", "trainer.log_every=1"]
    summary = train(compose(over), run_dir=tmp_path / "run")
    assert summary["nonfinite_skipped"] == 1
    assert scalers[0].get_scale() == 2.0**87


def test_fp16_resume_restores_the_loss_scale(tmp_path, monkeypatch, fresh_accelerator_state):
    """The GradScaler's state is part of the resumable state: 3 steps then a resume to 6 equal 6 straight steps
    (emulated CPU scaler as above: the overflow at step 2 backs the scale off from 2^127 to 2^87). Before the fix
    the resumed run restarted at 2^127, overflowed again and skipped one more step (2 skipped against 1)."""
    import accelerate
    from accelerate.state import AcceleratorState

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-40)

        def unscale_gradients(self, optimizer=None):
            for opt in self._optimizers:
                self.scaler.unscale_(opt.optimizer)

    monkeypatch.setattr(fewstep.training.loop, "Accelerator", ScaledAccelerator)
    base = [*TOY, "trainer.max_nonfinite=3", "trainer.checkpoint_every=3", "trainer.lr_schedule=constant"]
    straight = train(compose([*base, "trainer.max_steps=6"]), run_dir=tmp_path / "straight")
    AcceleratorState._reset_state(True)
    train(compose([*base, "trainer.max_steps=3"]), run_dir=tmp_path / "split")
    AcceleratorState._reset_state(True)
    resumed = train(compose([*base, "trainer.max_steps=6", "trainer.resume=auto"]), run_dir=tmp_path / "split")
    assert straight["nonfinite_skipped"] == resumed["nonfinite_skipped"] == 1
    assert (straight["start_step"], straight["steps"]) == (0, 6)
    assert (resumed["start_step"], resumed["steps"]) == (3, 6)  # went on from the step-3 checkpoint: 3 steps ran
    a = load_file(str(final_ckpt(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(final_ckpt(tmp_path / "split") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_grids_sample_in_eval_mode(tmp_path, monkeypatch):
    """The grids drawn during training (trainer.sample_every) sample the model as final_outputs does, in eval mode:
    with model.dropout=0.5 two calls on the same input agree. Before the fix the student stayed in training mode
    and they differed (by 0.02-0.03); training resumes in training mode afterwards."""
    import fewstep.training.outputs as train_mod

    seen = []
    real = train_mod.sample_in_chunks

    def probe(sampler, model_fn, noise, cond, steps, **kwargs):
        t = torch.full((4,), 0.5)
        a, b = model_fn(noise[:4], t, t, cond[:4]), model_fn(noise[:4], t, t, cond[:4])
        seen.append((a - b).abs().max().item())
        return real(sampler, model_fn, noise, cond, steps, **kwargs)

    monkeypatch.setattr(train_mod, "sample_in_chunks", probe)
    modes = []
    over = [*TOY, "model.dropout=0.5", "teacher.decay=0", "trainer.max_steps=3", "trainer.sample_every=1"]
    over += ["trainer.final_nfe=[]", "trainer.baseline_steps=0"]
    from fewstep.objectives.twinflow import TwinFlow

    real_tf_loss = TwinFlow.loss
    monkeypatch.setattr(TwinFlow, "loss", lambda self, student, *a: modes.append(student.training) or real_tf_loss(
        self, student, *a))  # fmt: skip
    train(compose(over), run_dir=tmp_path / "run")
    assert len(seen) == 2 and max(seen) == 0.0
    assert modes == [True, True, True]


def test_the_cli_logs_a_settings_warning_as_one_line_in_the_run_log(caplog):
    import logging
    import warnings

    from fewstep.__main__ import _log_warnings
    from fewstep.config.validate import validate

    with caplog.at_level(logging.WARNING, logger="fewstep"), warnings.catch_warnings():  # restores showwarning
        warnings.simplefilter("always")
        _log_warnings()
        validate(compose([*TOY, "objective=scm"]))
    assert [r.name for r in caplog.records] == ["fewstep"]
    assert caplog.records[0].getMessage().startswith("UserWarning: objective=scm with model.time_scale=1000")


def test_a_resumed_run_reports_the_steps_it_ran(tmp_path, caplog):
    """Resumed at 3 and run to 5, the final line read "done: 5 steps in 0.1 s" for the 2 steps it ran."""
    import logging

    run = tmp_path / "run"
    base = [*TOY, "trainer.checkpoint_every=3", "trainer.evaluate=false", "trainer.final_nfe=[]"]
    train(compose([*base, "trainer.max_steps=3"]), run_dir=run)
    with caplog.at_level(logging.INFO, logger="fewstep"):
        train(compose([*base, "trainer.max_steps=5", "trainer.resume=auto"]), run_dir=run)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert len(done) == 1 and done[0].startswith("done: steps 3 to 5 (2 in "), done


def test_resuming_under_another_lr_schedule_warns_with_the_jump(tmp_path, caplog):
    """Raising trainer.max_steps to train a finished cosine run on recomputes the schedule over the new length:
    the LR jumps back up at the resumed step. Said in one warning; the same schedule resumes silently."""
    import logging

    run = tmp_path / "run"
    base = [*TOY, "trainer.checkpoint_every=4", "trainer.evaluate=false", "trainer.final_nfe=[]"]
    train(compose([*base, "trainer.max_steps=8"]), run_dir=run)
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        same = [*base, "trainer.max_steps=8", f"trainer.resume={run / 'checkpoints' / 'step_0000004'}"]
        train(compose(same), run_dir=tmp_path / "same")
        assert not [r for r in caplog.records if "LR" in r.getMessage()]
        train(compose([*base, "trainer.max_steps=16", "trainer.resume=auto"]), run_dir=run)
    warned = [r.getMessage() for r in caplog.records if "LR" in r.getMessage()]
    assert len(warned) == 1 and "trainer.max_steps" in warned[0] and "from 0 to 0.5 of trainer.lr" in warned[0], warned


def test_each_run_of_a_process_reports_its_own_peak_memory(tmp_path):
    """A sweep's points run one after another in one process: the peak was the process's so far, so every point
    reported at least the largest before it (612, 660, 703 MB for three identical points)."""
    from fewstep.training.memory import peak_host_memory_mb

    big = torch.ones(300 * 2**18)  # 300 MB, touched, then freed
    big.add_(1)
    del big
    before = peak_host_memory_mb()
    args = [*TOY, "trainer.max_steps=2", "trainer.evaluate=false", "trainer.final_nfe=[]"]
    summary = train(compose(args), run_dir=tmp_path / "run")
    assert summary["peak_memory_mb"] < before - 100


def test_resuming_a_run_dir_says_its_checkpoint_replaces_init_from(tmp_path, caplog):
    """A reused run dir with trainer.init_from=RUN resumed its old checkpoint and trained on from those weights:
    init_from's weights were overwritten without a word (found with a stale /tmp run dir of the same name)."""
    import logging

    base = [*TOY, "trainer.checkpoint_every=2", "trainer.evaluate=false", "trainer.final_nfe=[]", "trainer.max_steps=2"]
    train(compose(base), run_dir=tmp_path / "teacher")
    train(compose(base), run_dir=tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        train(compose([*base, f"trainer.init_from={tmp_path / 'teacher'}"]), run_dir=tmp_path / "fresh")
        # a plain resume of a run that started from init_from (interrupted, or trained on; DMD2 needs init_from
        # again for its real score) warned that its checkpoint replaces init_from's weights
        train(compose([*base[:-1], "trainer.max_steps=3", f"trainer.init_from={tmp_path / 'teacher'}"]),
              run_dir=tmp_path / "fresh")  # fmt: skip
        assert not [r for r in caplog.records if "init_from" in r.getMessage()], caplog.records[-1].getMessage()
        train(compose([*base[:-1], "trainer.max_steps=4", f"trainer.init_from={tmp_path / 'teacher'}"]),
              run_dir=tmp_path / "old")  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
    assert len(warned) == 1 and "trainer.resume=none" in warned[0], [r.getMessage() for r in caplog.records]


def test_resuming_a_checkpoint_of_other_settings_names_them(tmp_path, caplog):
    """trainer.resume=auto in a reused run dir trained on from a checkpoint of other settings without a word
    (objective.image_free=true resumed a plain TwinFlow run); the changed keys are named in one warning, run-length
    keys (max_steps, time limit, threads) aside."""
    import logging

    run = tmp_path / "run"
    base = [*TOY, "trainer.checkpoint_every=2", "trainer.evaluate=false", "trainer.final_nfe=[]"]
    train(compose([*base, "trainer.max_steps=2"]), run_dir=run)
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        how = ["trainer.torch_threads=1", "trainer.grid_size=36", "trainer.max_nonfinite=5"]  # not what it trains
        train(compose([*base, "trainer.max_steps=4", *how, "trainer.resume=auto"]), run_dir=run)
        assert not [r for r in caplog.records if "other settings" in r.getMessage()]
        other = ["objective.delta_t=0.02", "trainer.lr_schedule=constant", "trainer.resume=auto"]
        train(compose([*base, "trainer.max_steps=6", *other]), run_dir=run)
    warned = [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]
    assert len(warned) == 1 and "objective.delta_t=0.01 (now 0.02)" in warned[0], warned
    assert "trainer.lr_schedule=cosine (now constant)" in warned[0] and "max_steps" not in warned[0]
    # speed, memory and sharding knobs (same weights) and the docs-only launch.* / a sweeper's optimize_metric
    plain = ["model=sd35", "data=latents"]
    how = [
        "trainer.compile=true",
        "trainer.distributed=fsdp",
        "trainer.checkpoint_format=full",
        "trainer.peak_tflops=989",
        "model.no_grad_chunk=2",
        "launch.num_processes=8",
        "model.gradient_checkpointing=false",
        "data.decode_device=cpu",
        "optimize_metric=eval.nfe_1.fid",
    ]
    assert run_settings(compose([*plain, *how])) == run_settings(compose(plain))
    # a key that only starts like a run-length one is a setting (init_from_ema: the weights DMD2's real score takes)
    assert "trainer.init_from_ema" in run_settings(compose(plain)) and "trainer.init_from" not in run_settings(
        compose(plain)
    )
    # the same global batch on other process counts (2 processes → 1 with grad_accum=2) is no change; another is
    two = with_global_batch(run_settings(compose(plain)), 2)
    one = with_global_batch(run_settings(compose([*plain, "trainer.grad_accum=2"])), 1)
    assert changed_settings(two, one) == [] and two[GLOBAL_BATCH] == str(2 * compose(plain).data.batch_size)
    half = with_global_batch(run_settings(compose(plain)), 1)
    assert changed_settings(two, half) == [f"{GLOBAL_BATCH}={two[GLOBAL_BATCH]} (now {half[GLOBAL_BATCH]})"]
