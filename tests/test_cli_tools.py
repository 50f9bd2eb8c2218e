"""fewstep.sample / fewstep.eval on a saved digits run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fewstep.errors import FewstepError
from fewstep.training.loop import train

from helpers import FAST, compose


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "run"
    train(compose([*FAST, "trainer.max_steps=20", "model.width=64", "data.batch_size=32"]), run_dir=run)
    # a Hydra run dir has the composed config; write it as Hydra does
    from omegaconf import OmegaConf

    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose([*FAST, "trainer.max_steps=20", "model.width=64", "data.batch_size=32"]),
                   run / ".hydra" / "config.yaml")  # fmt: skip
    return run


def test_sample_writes_grids_and_raw_samples(digits_run):
    from fewstep.sample import main

    main([f"run_dir={digits_run}", "nfe=[1,2]"])
    for n in (1, 2):
        assert (digits_run / "samples" / f"nfe_{n}.png").exists()
    # raw samples follow the evaluation protocol (100 per class, fixed noise), written without evaluating
    main([f"run_dir={digits_run}", "nfe=[1]"])
    data = np.load(digits_run / "samples" / "nfe_1.npz")
    assert data["x"].shape == (1000, 1, 8, 8) and data["y"].shape == (1000,)
    assert data["x"].min() >= -1 and data["x"].max() <= 1
    assert np.bincount(data["y"]).tolist() == [100] * 10


def test_sample_of_the_student_weights_keeps_the_runs_own_samples(digits_run, caplog):
    """weights=student wrote over samples/nfe_1.png and .npz, the run's final EMA samples: it now writes
    student_samples/ and says so; the EMA samples stay byte for byte."""
    from fewstep.sample import main

    main([f"run_dir={digits_run}", "nfe=[1]"])
    own = {p.name: p.read_bytes() for p in (digits_run / "samples").glob("nfe_1.*")}
    assert sorted(own) == ["nfe_1.npz", "nfe_1.png"]
    with caplog.at_level("INFO"):
        main([f"run_dir={digits_run}", "nfe=[1]", "weights=student"])
    assert {p.name: p.read_bytes() for p in (digits_run / "samples").glob("nfe_1.*")} == own
    student = digits_run / "student_samples"
    assert sorted(p.name for p in student.iterdir()) == ["nfe_1.npz", "nfe_1.png"]
    assert not np.array_equal(np.load(student / "nfe_1.npz")["x"], np.load(digits_run / "samples" / "nfe_1.npz")["x"])
    assert f"samples in {student}" in caplog.text


def test_eval_writes_eval_json_with_reference_points(digits_run):
    from fewstep.eval.__main__ import main

    main([f"run_dir={digits_run}", "nfe=[1]", "baseline_steps=4"])
    out = json.loads((digits_run / "eval.json").read_text())
    assert set(out["metrics"]) == {"nfe_1", "euler_4"}
    for key in ("acc", "fd", "pixel_fd", "precision", "recall"):
        assert key in out["metrics"]["nfe_1"]
    assert out["reference"]["floor"]["fd"] < 1.0 < out["reference"]["ceiling"]["fd"]
    assert out["step"] == 20


def test_eval_never_writes_into_the_runs_own_samples(digits_run):
    """Without out= it rewrote samples/nfe_*.png and .npz (and added nfe_8.png for nfe=[1,8]) although the README
    says evaluation never writes over the run's own samples: its grids and .npz go to eval_samples/."""
    from fewstep.eval.__main__ import main

    before = {p.name: p.read_bytes() for p in (digits_run / "samples").iterdir()}
    out = main([f"run_dir={digits_run}", "nfe=[1,8]", "baseline_steps=0"])
    assert {p.name: p.read_bytes() for p in (digits_run / "samples").iterdir()} == before
    assert "nfe_8.png" not in before and "nfe_8.npz" not in before
    evaluated = digits_run / "eval_samples"
    assert {"nfe_1.npz", "nfe_1.png", "nfe_8.npz", "nfe_8.png"} <= {p.name for p in evaluated.iterdir()}
    saved = json.loads((digits_run / "eval.json").read_text())
    assert saved["samples_dir"] == out["samples_dir"] == str(evaluated) and set(saved["metrics"]) == {"nfe_1", "nfe_8"}
    assert np.load(evaluated / "nfe_1.npz")["x"].shape == (1000, 1, 8, 8)


def test_sample_takes_the_runs_thread_setting_as_training_does(digits_run, caplog, monkeypatch):
    import torch

    from fewstep.sample import main
    from fewstep.training import threads

    asked = []

    def choose(requested):
        asked.append(requested)
        return threads.Threads(1, "auto: stand-in")

    monkeypatch.setattr(threads, "choose_threads", choose)
    monkeypatch.setattr(threads, "_last", None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with caplog.at_level("INFO"):
            main([f"run_dir={digits_run}", "nfe=[1]"])
        assert asked == [0] and torch.get_num_threads() == 1  # the run's trainer.torch_threads=0
        assert "1 torch thread (auto: stand-in)" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_eval_of_the_student_weights_keeps_the_runs_own_samples_and_eval_json(digits_run):
    """weights=student wrote over samples/ (the run's final EMA samples) and eval.json: it now writes
    eval_student.json and eval_student_samples/."""
    from fewstep.eval.__main__ import main

    main([f"run_dir={digits_run}", "nfe=[1]", "baseline_steps=0"])
    own = {p.name: p.read_bytes() for p in (digits_run / "samples").glob("nfe_1.*")}
    ema_json = (digits_run / "eval.json").read_bytes()
    out = main([f"run_dir={digits_run}", "nfe=[1]", "baseline_steps=0", "weights=student"])
    assert {p.name: p.read_bytes() for p in (digits_run / "samples").glob("nfe_1.*")} == own
    assert (digits_run / "eval.json").read_bytes() == ema_json
    saved = json.loads((digits_run / "eval_student.json").read_text())
    assert saved["weights"] == "student" and saved["samples_dir"] == str(digits_run / "eval_student_samples")
    assert sorted(p.name for p in (digits_run / "eval_student_samples").iterdir()) == ["nfe_1.npz", "nfe_1.png"]
    assert out["metrics"] == saved["metrics"]
    assert saved["metrics"]["nfe_1"]["fd"] != json.loads(ema_json)["metrics"]["nfe_1"]["fd"]  # other weights


def test_unknown_argument_is_a_clear_error(digits_run):
    from fewstep.sample import main

    with pytest.raises(SystemExit, match="usage: python -m fewstep.sample"):
        main([f"run_dir={digits_run}", "nfes=[1]"])


def test_a_checkpoint_that_does_not_exist_is_named_without_the_trainers_advice(digits_run, tmp_path):
    from fewstep.eval.__main__ import main

    with pytest.raises(FewstepError, match=r"^checkpoint=.*nope does not exist; give a folder .*/checkpoints/step_\*"):
        main([f"run_dir={digits_run}", f"checkpoint={tmp_path / 'nope'}"])
    with pytest.raises(FewstepError, match=r"is incomplete \(no state.json\); give a folder"):
        main([f"run_dir={digits_run}", f"checkpoint={tmp_path}"])


def test_missing_run_dir_names_the_problem(tmp_path):
    from fewstep.sample import main

    with pytest.raises(FileNotFoundError, match="not a fewstep run dir"):
        main([f"run_dir={tmp_path}"])


def test_eval_on_data_without_an_evaluator_is_one_error_line(tmp_path, monkeypatch):
    """A latent-cache run has no evaluator: `error: ...` (run_cli: exit 2) naming fewstep.sample, no bare text."""
    import types

    import fewstep.eval.__main__ as eval_cli

    monkeypatch.setattr(eval_cli, "load_run", lambda *a, **k: types.SimpleNamespace(data=object()))
    with pytest.raises(SystemExit) as err:
        eval_cli.main([f"run_dir={tmp_path}"])
    text = str(err.value.code)
    assert text.startswith("error: ") and "\n" not in text and "python -m fewstep.sample" in text


@pytest.mark.slow
def test_eval_with_sampler_overrides_scores_the_same_weights_under_another_sampler(digits_run, tmp_path):
    from fewstep.eval.__main__ import main

    main([f"run_dir={digits_run}", "nfe=[2]", "baseline_steps=0"])  # the run's own samples/nfe_2.npz
    own = np.load(digits_run / "samples" / "nfe_2.npz")["x"]
    base = main([f"run_dir={digits_run}", "nfe=[1,2]", "baseline_steps=0", f"out={tmp_path / 'a.json'}"])
    few = main([f"run_dir={digits_run}", "nfe=[1,2]", "baseline_steps=0", f"out={tmp_path / 'b.json'}",
                "sampler.style=few", "sampler.stochast_ratio=1.0"])  # fmt: skip
    assert (base["sampler"]["style"], few["sampler"]["style"], few["sampler"]["stochast_ratio"]) == ("any", "few", 1.0)
    # one step from t = 1 targets t = 0 in either style: identical; two steps differ
    assert base["metrics"]["nfe_1"] == few["metrics"]["nfe_1"]
    assert base["metrics"]["nfe_2"]["fd"] != few["metrics"]["nfe_2"]["fd"]
    # another sampler's samples go beside its JSON; the run's own samples are left as they were
    assert few["samples_dir"] == str(tmp_path / "b_samples")
    other = np.load(tmp_path / "b_samples" / "nfe_2.npz")["x"]
    assert np.array_equal(np.load(digits_run / "samples" / "nfe_2.npz")["x"], own)
    assert not np.array_equal(other, own)
    with pytest.raises(FewstepError, match="sampler override"):
        main([f"run_dir={digits_run}", "nfe=[1]", f"out={tmp_path / 'c.json'}", "sampler.stochast=1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chekpoint=x.pth"], "error: unknown argument chekpoint= (did you mean checkpoint=?); usage: "),
        (["zzz=1"], "error: unknown argument zzz=; usage: "),
        (["checkpoint"], "error: expected key=value, got 'checkpoint'; usage: "),
        (["out=[1"], "error: "),
        (["out=o"], "error: run_dir= is required; usage: "),
        (["nfe=1,2"], "error: nfe=1,2: give a list of positive integers, e.g. nfe=[1,2,4]; usage: "),
        (["nfe=[0]"], "error: nfe=[0]: give a list of positive integers, e.g. nfe=[1,2,4]; usage: "),
    ],
)
def test_tool_arguments_fail_in_one_line_naming_the_fix(argv, message):
    """Every tool parses key=value through fewstep.cli.parse_kv: one line, the closest known key, the usage."""
    from fewstep.cli import parse_kv

    defaults = {"checkpoint": "", "out": "", "nfe": [1, 2, 4], "run_dir": "???"}
    argv = argv if any(a.startswith("out=") for a in argv) else ["run_dir=r", *argv]
    with pytest.raises(SystemExit) as err:
        parse_kv(argv, defaults, "usage: python -m fewstep.tool checkpoint=FILE\n    out=DIR [nfe=[1,2,4]]")
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text
    assert parse_kv(["nfe=[1]", "out=o", "run_dir=r"], defaults, "usage").nfe == [1]
    assert parse_kv(["nfe=2", "run_dir=r"], defaults, "usage").nfe == [2]  # one NFE without the brackets


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["fewstep.export", "fewstep.precompute", "fewstep.bench", "fewstep.convert_openuni"])
def test_every_tool_exits_2_with_one_error_line(tool, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", tool, "outt=x"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown argument outt= (did you mean out=?); usage: ")


@pytest.mark.parametrize("module", ["fewstep.export", "fewstep.precompute", "fewstep.convert_openuni"])
def test_a_missing_required_argument_is_one_line_with_the_usage(module):
    import importlib

    command = importlib.import_module(module)
    if hasattr(command, "__path__"):  # a package (fewstep.export): its command module
        command = importlib.import_module(f"{module}.command")
    with pytest.raises((FewstepError, SystemExit)) as err:
        command.main([])
    assert "= is required; usage: python -m " + module in str(err.value) and "\n" not in str(err.value)


def test_eval_with_a_sampler_group_choice_names_the_keys_and_the_euler_baseline():
    """sampler=euler, as in training, read "unknown argument sampler=" with no hint of what to give instead."""
    from fewstep.eval.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["run_dir=r", "sampler=euler"])
    text = str(err.value)
    assert text.startswith("error: sampler=euler: ") and "sampler.KEY=VALUE" in text and "baseline_steps=" in text
    assert "\n" not in text
