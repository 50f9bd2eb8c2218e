"""Reliability: crash-safe checkpoints (SIGKILL at several moments, corrupt / partial checkpoints, keep-last-K),
exact resume after SIGKILL, non-finite steps, the bad-input matrix and a killed rank of a two-process job.

The fault matrix (fault | survived | data lost | test) is in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.config.validate import ConfigError
from fewstep.training import checkpoint as ck
from fewstep.training.checkpoint import CheckpointError, latest_valid, list_checkpoints, load_checkpoint, prune, verify
from fewstep.training.loop import TrainingAborted, train
from fewstep.training.throughput import WALL_CLOCK_KEYS
from fewstep.training.trainables import build_components

from helpers import FAST, compose, faults, torch_threads

TOY = ["data=toy2d", "model=tiny_toy", "data.batch_size=32", *FAST]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ckpts(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*"))


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).glob(".*"))


def step_of(ckpt: Path) -> int:
    return verify(ckpt)["step"]


def load_every_checkpoint(root: Path, overrides=TOY) -> list[int]:
    """verify + load_checkpoint (model, teacher, optimizer, scheduler, RNG file) of every checkpoint under root."""
    _, _, model, teacher, _ = build_components(compose(list(overrides)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    steps = []
    for c in list_checkpoints(root):
        state = load_checkpoint(c, model, teacher, optimizer, scheduler, restore_rng=False)
        torch.load(c / "rng.pt", weights_only=True)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        steps.append(state["step"])
    return steps


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def cli(args: list[str], cwd: Path) -> None:
    """``python -m fewstep`` with tests/ importable (the ``faults.*`` targets); raises on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "fewstep", *args],
        cwd=cwd, env=faults.subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


def one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message, message
    return message


# --------------------------------------------------------------------------- 1. atomic checkpoints

KILL_INSIDE_SAVE = r"""
import os, signal, sys
from pathlib import Path
import torch
from fewstep.training import checkpoint as ck
from fewstep.teachers import EMATeacher

root, moment = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
teacher = EMATeacher(decay=0.9)
teacher.bind(model)
opt = torch.optim.AdamW(model.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def train_step(i):
    model(torch.randn(2, 4)).square().mean().backward()
    opt.step(), sched.step(), opt.zero_grad()
    teacher.update(model, i)


for s in (1, 2):
    train_step(s)
    ck.save_checkpoint(root, s, model, teacher, opt, sched, data_position=s)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


real_save_file, real_torch_save, real_fsync, real_replace = ck.save_file, torch.save, os.fsync, os.replace
if moment == "model":  # half of model.safetensors on disk
    def save_file(tensors, path):
        real_save_file(tensors, path)
        os.truncate(path, os.path.getsize(path) // 2)
        die()
    ck.save_file = save_file
elif moment == "optim":  # weights and optim.pt written, rng.pt and state.json not
    def save(obj, path, *a, **k):
        real_torch_save(obj, path, *a, **k)
        if Path(path).name == "optim.pt":
            die()
    torch.save = save
elif moment == "state":  # state.json written and synced, folder not yet renamed
    def fsync(fd):
        real_fsync(fd)
        die()
    os.fsync = fsync
elif moment == "swap":  # rewriting step 2: old folder moved aside, new one not yet renamed in
    def replace(a, b):
        real_replace(a, b)
        if Path(b).name.startswith(".old_"):
            die()
    os.replace = replace
elif moment == "committed":  # rewriting step 2: new folder renamed in, the old one not yet deleted
    ck._fsync_dir = lambda path: die()
train_step(3)
rewrite = moment in ("swap", "committed")
ck.save_checkpoint(root, 2 if rewrite else 3, model, teacher, opt, sched, data_position=30)
print("not killed")
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["model", "optim", "state", "swap", "committed"])
def test_sigkill_inside_save_checkpoint_keeps_every_committed_checkpoint(tmp_path, moment):
    """SIGKILL at a chosen moment of a checkpoint write: what was committed before stays loadable, the
    leftovers are ignored by latest_valid and cleaned (or, for a moved-aside step, put back) by the next prune."""
    root = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE_SAVE, str(root), moment],
        env=faults.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    assert leftovers(root), "the kill should leave a .tmp_* / .old_* folder behind"
    found = list_checkpoints(root)
    assert [step_of(c) for c in found] == [1, 2]  # every listed checkpoint verifies
    best = latest_valid(root)
    assert best is not None and step_of(best) == 2
    # the step-2 checkpoint that was committed last: the old one unless the new one was already renamed in
    assert verify(best)["data_position"] == (30 if moment == "committed" else 2)
    for c in found:
        model = torch.nn.Linear(4, 4)
        load_checkpoint(c, model, restore_rng=False)

    prune(root, keep_last=5)  # what the next save runs
    assert leftovers(root) == []
    assert [c.name for c in list_checkpoints(root)] == ["step_0000001", "step_0000002"]
    assert verify(root / "step_0000002")["data_position"] == (30 if moment == "committed" else 2)


def write_checkpoints(root: Path, steps) -> None:
    _, _, model, teacher, _ = build_components(compose(TOY))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for s in steps:
        ck.save_checkpoint(root, s, model, teacher, opt, sched, data_position=s)


def corrupt(ckpt: Path, how: str) -> str:
    """Damage a checkpoint; returns a phrase the CheckpointError must contain."""
    model = ckpt / "model.safetensors"
    if how == "truncated":
        os.truncate(model, model.stat().st_size // 2)
        return "model.safetensors is missing or truncated"
    if how == "garbage_state":
        (ckpt / "state.json").write_bytes(os.urandom(64))
        return "corrupt state.json"
    if how == "empty_state":
        (ckpt / "state.json").write_text("{}")
        return "incomplete state.json"
    if how == "missing_file":
        (ckpt / "optim.pt").unlink()
        return "optim.pt is missing"
    if how == "no_state":
        (ckpt / "state.json").unlink()
        return "no state.json"
    if how == "garbage_same_size":
        model.write_bytes(os.urandom(model.stat().st_size))
        return "model.safetensors is unreadable"
    if how == "garbage_optim_same_size":
        p = ckpt / "optim.pt"
        p.write_bytes(os.urandom(p.stat().st_size))
        return "optim.pt is unreadable"
    raise ValueError(how)


CORRUPTIONS = [
    "truncated",
    "garbage_state",
    "empty_state",
    "missing_file",
    "no_state",
    "garbage_same_size",
    "garbage_optim_same_size",
]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_checkpoint_is_detected_with_a_clear_message(tmp_path, how):
    root = tmp_path / "checkpoints"
    write_checkpoints(root, [1, 2])
    phrase = corrupt(root / "step_0000002", how)
    _, _, model, teacher, _ = build_components(compose(TOY))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(root / "step_0000002", model, teacher)
    message = one_line(err.value)
    assert phrase in message and "step_0000002" in message and "trainer.resume" in message
    warnings = []
    assert latest_valid(root, warn=warnings.append) == root / "step_0000001"
    assert len(warnings) == 1 and phrase in warnings[0]


def test_load_reports_damaged_tensor_bytes_that_pass_verify(tmp_path):
    """Header intact, pickle of optim.pt garbled at the right size: verify passes, load_checkpoint raises."""
    root = tmp_path / "checkpoints"
    write_checkpoints(root, [1])
    ckpt = root / "step_0000001"
    import zipfile

    with zipfile.ZipFile(ckpt / "optim.pt") as zf:
        pickle = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    raw = bytearray((ckpt / "optim.pt").read_bytes())
    start = raw.find(pickle)  # stored uncompressed
    assert start > 0
    raw[start : start + 8] = b"\xff" * 8  # not a pickle opcode stream any more
    (ckpt / "optim.pt").write_bytes(bytes(raw))
    verify(ckpt)
    _, _, model, teacher, _ = build_components(compose(TOY))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="could not be read") as err:
        load_checkpoint(ckpt, model, teacher, opt)
    assert "trainer.resume" in one_line(err.value)


@pytest.mark.parametrize("how", ["truncated", "garbage_same_size", "garbage_optim_same_size", "empty_state"])
def test_keep_last_never_deletes_the_only_good_checkpoint(tmp_path, how):
    root = tmp_path / "checkpoints"
    write_checkpoints(root, [1, 2, 3])
    corrupt(root / "step_0000002", how)
    corrupt(root / "step_0000003", how)
    prune(root, keep_last=1)
    names = [c.name for c in list_checkpoints(root)]
    assert names == ["step_0000001", "step_0000002", "step_0000003"]  # corrupt newer ones: left for inspection
    assert latest_valid(root, warn=lambda m: None) == root / "step_0000001"
    write_checkpoints(root, [4])  # the next good save: now the corrupt older ones and step 1 may go
    prune(root, keep_last=1)
    assert [c.name for c in list_checkpoints(root)] == ["step_0000004"]


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint out of the step_* namespace before deleting it (found by the SIGKILL
    test: a kill inside rmtree left a step_* folder without state.json)."""
    import fewstep.training.checkpoint as ckpt_mod

    root = tmp_path / "checkpoints"
    write_checkpoints(root, [1, 2, 3])
    real_rmtree = ckpt_mod.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "state.json").unlink()  # rmtree got this far ...
        raise KeyboardInterrupt  # ... when the process died

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune(root, keep_last=1)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)
    for c in list_checkpoints(root):  # every step_* folder left is complete
        verify(c)
    assert latest_valid(root, warn=lambda m: None) == root / "step_0000003"
    write_checkpoints(root, [4])  # the next save cleans the leftover
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp_")]


FALLBACK = [*TOY, "trainer.checkpoint_every=5", "trainer.keep_last=3", "trainer.log_every=5"]


@pytest.fixture(scope="module")
def ten_step_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ten") / "run"
    train(compose([*FALLBACK, "trainer.max_steps=10"]), run_dir=run)
    assert [c.name for c in ckpts(run)] == ["step_0000005", "step_0000010"]
    return run


@pytest.mark.parametrize("how", ["truncated", "garbage_state", "missing_file", "garbage_same_size"])
def test_resume_auto_falls_back_to_the_newest_good_checkpoint(tmp_path, ten_step_run, how):
    base, run = FALLBACK, tmp_path / "run"
    shutil.copytree(ten_step_run, run)
    corrupt(run / "checkpoints" / "step_0000010", how)
    summary = train(compose([*base, "trainer.max_steps=12", "trainer.resume=auto"]), run_dir=run)
    assert summary["start_step"] == 5 and summary["steps"] == 12
    assert [r["step"] for r in rows(run)] == [5, 10, 12]  # rows after the checkpoint were re-logged once
    assert load_every_checkpoint(run / "checkpoints") == [5, 10, 12]  # step 10 rewritten, good again
    assert leftovers(run / "checkpoints") == []


def tmp_dir_appears(root: Path, timeout: float) -> bool:
    """Busy-poll (about every 0.5 ms) for a checkpoint being written (a ``.tmp_*`` folder)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(name.startswith(".tmp_") for name in os.listdir(root)):
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    return False


@pytest.mark.slow
def test_sigkill_during_training_with_a_checkpoint_every_step(tmp_path):
    """Real runs (checkpoint_every=1) killed with SIGKILL, each resumed with trainer.resume=auto. Three kills
    are aimed at a write (as soon as a ``.tmp_*`` folder shows, plus 0-4 ms), one lands at a random moment.
    Every checkpoint left loads, progress never goes back, metrics.jsonl stays one contiguous run and the
    leftovers are gone once training continues."""
    run = tmp_path / "run"
    args = [
        *TOY, "trainer.checkpoint_every=1", "trainer.keep_last=3", "trainer.log_every=1",
        "trainer.resume=auto", f"hydra.run.dir={run}",
    ]  # fmt: skip
    best, left = 0, []
    for i, (aimed, delay) in enumerate([(True, 0.0), (True, 0.002), (True, 0.004), (False, 0.013)]):
        with open(tmp_path / f"log{i}.txt", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fewstep", *args, "trainer.max_steps=100000"],
                cwd=tmp_path, env=faults.subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                wait_for(
                    lambda target=best + 2: len(ckpts(run)) > 0 and int(ckpts(run)[-1].name[5:]) >= target,
                    180, proc, "two new checkpoints",
                )  # fmt: skip
                if aimed:
                    assert tmp_dir_appears(run / "checkpoints", 60)
                time.sleep(delay)
            finally:
                proc.kill()
                proc.wait(timeout=60)
        left.append(leftovers(run / "checkpoints"))  # a .tmp_* when the kill landed in a write
        steps = load_every_checkpoint(run / "checkpoints")
        newest = step_of(latest_valid(run / "checkpoints"))
        assert steps and newest == steps[-1] >= best + 2
        best = newest
    print("leftovers after each kill:", left)  # usually 2-3 of the aimed kills land in a write; not asserted
    final = best + 3
    cli([*args, f"trainer.max_steps={final}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == best and summary["steps"] == final
    assert leftovers(run / "checkpoints") == []
    assert load_every_checkpoint(run / "checkpoints")[-1] == final
    assert [r["step"] for r in rows(run)] == list(range(1, final + 1))


# --------------------------------------------------------------------------- 2. exact resume after SIGKILL

EXACT = [
    *TOY, "data._target_=helpers.faults.StallingToy2D", "objective.enhanced_ratio=0.5", "trainer.max_steps=20",
    "trainer.checkpoint_every=10", "trainer.log_every=4", "trainer.keep_last=5", "trainer.torch_threads=1",
]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    env = faults.subprocess_env(**{faults.STALL_ENV: "13"})  # cannot reach step 20: stalls after step 13
    with open(tmp_path / "killed.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fewstep", *EXACT, f"hydra.run.dir={killed}"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(lambda: (killed / "checkpoints" / "step_0000010").exists(), 180, proc, "step_0000010")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [c.name for c in ckpts(killed)] == ["step_0000010"] and not (killed / "summary.json").exists()

    cli([*EXACT, "trainer.resume=auto", f"hydra.run.dir={killed}"], tmp_path)
    assert json.loads((killed / "summary.json").read_text())["start_step"] == 10
    straight = tmp_path / "straight"
    with torch_threads(1):  # EXACT sets trainer.torch_threads=1 for the whole process
        train(compose(EXACT), run_dir=straight)

    a, b = straight / "checkpoints" / "step_0000020", killed / "checkpoints" / "step_0000020"
    for name in ("model.safetensors", "teacher.safetensors"):  # weights and the EMA teacher
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = (torch.load(c / "optim.pt", weights_only=True) for c in (a, b))
    assert oa["scheduler"] == ob["scheduler"]
    sa, sb = oa["optimizer"]["state"], ob["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][field], sb[k][field]), (k, field)
    ra, rb = (torch.load(c / "rng.pt", weights_only=True)["ranks"][0]["torch"] for c in (a, b))
    assert torch.equal(ra, rb)
    ja, jb = (json.loads((c / "state.json").read_text()) for c in (a, b))
    assert ja["data_position"] == jb["data_position"] == 20
    assert ja["teacher"] == jb["teacher"]

    def strip(r):
        return {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}

    assert [strip(r) for r in rows(straight)] == [strip(r) for r in rows(killed)]
    assert rows(killed)[-1]["step"] == 20


# --------------------------------------------------------------------------- 3. non-finite steps


def test_nan_batch_and_nan_loss_are_skipped_and_counted(tmp_path):
    """Extends tests/training/test_train.py (NaN batch): a NaN loss (NaN gradients) at steps 2 and 6 plus a NaN
    batch at step 4 are three skipped optimizer steps, counted in summary, metrics and the checkpoint."""
    from helpers import nan_data

    over = [
        *TOY, "data._target_=helpers.nan_data.NaNToy2D", "objective._target_=helpers.faults.NaNLossTwinFlow",
        "trainer.max_steps=10", "trainer.checkpoint_every=5",
    ]  # fmt: skip
    nan_data.NaNToy2D.nan_positions, faults.NaNLossTwinFlow.nan_steps = {4}, {2, 6}
    try:
        summary = train(compose(over), run_dir=tmp_path / "run")
    finally:
        nan_data.NaNToy2D.nan_positions, faults.NaNLossTwinFlow.nan_steps = set(), set()
    assert summary["nonfinite_skipped"] == 3
    assert [(r["step"], r["nonfinite_skipped"]) for r in rows(tmp_path / "run")] == [(5, 2), (10, 3)]
    last = ckpts(tmp_path / "run")[-1]
    assert json.loads((last / "state.json").read_text())["nonfinite_total"] == 3
    adam = torch.load(last / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {7}  # 10 steps, 3 skipped
    assert all(torch.isfinite(v).all() for v in load_file(str(last / "model.safetensors")).values())


def test_nan_loss_in_a_row_aborts_keeping_a_resumable_checkpoint(tmp_path):
    run = tmp_path / "run"
    over = [
        *TOY,
        "objective._target_=helpers.faults.NaNLossTwinFlow",
        "trainer.checkpoint_every=5",
        "trainer.max_steps=10",
    ]
    faults.NaNLossTwinFlow.nan_steps = set(range(7, 100))
    try:
        with pytest.raises(TrainingAborted) as err:
            train(compose([*over, "trainer.max_nonfinite=3"]), run_dir=run)
    finally:
        faults.NaNLossTwinFlow.nan_steps = set()
    message = one_line(err.value)
    assert "3 non-finite steps in a row" in message and "trainer.lr" in message
    assert [c.name for c in ckpts(run)] == ["step_0000005"] and leftovers(run / "checkpoints") == []
    summary = train(compose([*over, "trainer.resume=auto"]), run_dir=run)  # the cause fixed: resume
    assert summary["start_step"] == 5 and summary["steps"] == 10 and summary["nonfinite_skipped"] == 0


# --------------------------------------------------------------------------- 4. bad inputs
# Covered elsewhere (not repeated here): unknown group choice and wrong type -> tests/training/test_train.py
# (test_unknown_choice_fails_fast_listing_the_options, test_wrong_type_fails_at_compose_naming_the_key);
# out-of-range objective / trainer values -> tests/config/test_configs.py
# (test_bad_values_fail_before_any_weight_loads_with_the_fix); unreadable image in precompute and latent
# shards with mismatched shapes -> tests/test_precompute_export.py
# (test_precompute_writes_latents_embeddings_and_reports_skipped, test_latent_data_errors_name_the_fix).


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_latent_dir_fails_before_the_model_is_built(tmp_path, kind, monkeypatch):
    from fewstep.errors import FewstepError

    path = tmp_path / "cache"
    if kind == "empty":
        path.mkdir()
    pretrained = tmp_path / "pipe"  # the check reads the transformer's config.json only
    (pretrained / "transformer").mkdir(parents=True)
    (pretrained / "transformer" / "config.json").write_text('{"in_channels": 4}')
    monkeypatch.setattr(
        "fewstep.training.trainables.build_model", lambda *a, **k: pytest.fail("model built"), raising=False
    )
    start = time.perf_counter()
    with pytest.raises(FewstepError) as err:
        model = ["model=sd35", f"model.pretrained={pretrained}"]
        train(compose([*model, "data=latents", f"data.path={path}", *FAST]), run_dir=tmp_path / "run")
    assert time.perf_counter() - start < 30
    message = one_line(err.value)
    assert f"data.path={path}" in message and "precompute" in message
    assert ("no such folder" if kind == "missing" else "no manifest.json") in message
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("model", ["sd35", "sd35_lora", "sd15 diff2flow.enabled=true objective.allow_diff2flow=true"])
def test_missing_pretrained_fails_in_validate_before_anything_loads(tmp_path, model, monkeypatch):
    import fewstep.training.loop

    monkeypatch.setattr(fewstep.training.loop, "build_components", lambda *a, **k: pytest.fail("components built"))
    model, *extra = model.split()
    over = [f"model={model}", f"model.pretrained={tmp_path}/nonexistent", *extra, *FAST]
    with pytest.raises(ConfigError) as err:
        train(compose(over), run_dir=tmp_path)
    message = one_line(err.value)
    assert f"model.pretrained={tmp_path}/nonexistent" in message and "no such folder" in message


def test_twinflow_on_a_model_without_sign_and_target_time_fails_at_build(tmp_path):
    with pytest.raises(ValueError) as err:
        train(compose([*TOY, "model._target_=helpers.faults.PlainNet"]), run_dir=tmp_path / "run")
    message = one_line(err.value)
    assert "PlainNet has no target-time/sign embedding" in message and "TwinFlow" in message
    assert "time_pair" in message and not (tmp_path / "run" / "checkpoints").exists()
    build_components(compose([*TOY, "model._target_=helpers.faults.PlainNet", "objective=flow_matching"]))  # fine there


@pytest.mark.parametrize("failing", ["model.safetensors", "optim.pt"])
def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch, failing):
    """ENOSPC half-way through writing step 10: a one-line error naming the fix, step 5 intact, no tmp left;
    with space back, trainer.resume=auto continues from step 5."""
    run = tmp_path / "run"
    base = [*TOY, "trainer.checkpoint_every=5", "trainer.max_steps=10"]
    real_save_file, real_torch_save = ck.save_file, torch.save

    def disk_full(path):
        path = Path(path)
        if path.name == failing and path.parent.name.startswith(".tmp_step_0000010"):
            with open(path, "wb") as fh:
                fh.write(b"\0" * 100)  # a partial file, as a full disk leaves it
            raise OSError(28, "No space left on device")

    def save_file(tensors, path, *a, **k):
        disk_full(path)
        return real_save_file(tensors, path, *a, **k)

    def torch_save(obj, path, *a, **k):
        disk_full(path)
        return real_torch_save(obj, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", save_file)
    monkeypatch.setattr(ck.torch, "save", torch_save)
    with pytest.raises(CheckpointError) as err:
        train(compose(base), run_dir=run)
    message = one_line(err.value)
    assert "No space left on device" in message and "free space" in message and "trainer.resume" in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == 28
    assert [c.name for c in ckpts(run)] == ["step_0000005"] and leftovers(run / "checkpoints") == []
    assert load_every_checkpoint(run / "checkpoints") == [5]

    monkeypatch.undo()
    summary = train(compose([*base, "trainer.resume=auto"]), run_dir=run)
    assert summary["start_step"] == 5 and [c.name for c in ckpts(run)] == ["step_0000005", "step_0000010"]


REAL_WRITE_ERROR = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from fewstep.training import checkpoint as ck
from fewstep.training.loop import train
from helpers import FAST, compose, torch_threads

run, failing = Path(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG instead
real_save_file, real_torch_save = ck.save_file, torch.save


def limit(path):
    path = Path(path)
    if path.name == failing and path.parent.name.startswith(".tmp_step_0000010"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def save_file(tensors, path, *a, **k):
    limit(path)
    return real_save_file(tensors, path, *a, **k)


def save(obj, path, *a, **k):
    limit(path)
    return real_torch_save(obj, path, *a, **k)


ck.save_file, torch.save = save_file, save
over = ["data=toy2d", "model=tiny_toy", "data.batch_size=32", *FAST, "trainer.checkpoint_every=5",
        "trainer.max_steps=10"]
try:
    train(compose(over), run_dir=run)
except ck.CheckpointError as err:
    print(json.dumps({"message": str(err), "cause": type(err.__cause__).__name__}))
    sys.exit(3)
"""


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["model.safetensors", "optim.pt"])
def test_a_real_write_error_in_the_native_writers_is_reported_in_one_line(tmp_path, failing):
    """A real kernel write failure (the file-size limit, EFBIG) inside safetensors' and torch's own writers,
    which raise SafetensorError / RuntimeError rather than OSError: still one CheckpointError naming the fix,
    the previous checkpoint intact and no tmp folder left."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", REAL_WRITE_ERROR, str(run), failing],
        env=faults.subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    message = report["message"]
    assert "\n" not in message and "step_0000010 failed" in message and "free space" in message
    assert "too large" in message.lower() or "unexpected pos" in message, message
    assert report["cause"] in ("SafetensorError", "RuntimeError", "OSError")
    assert [c.name for c in ckpts(run)] == ["step_0000005"] and leftovers(run / "checkpoints") == []
    assert load_every_checkpoint(run / "checkpoints") == [5]


@pytest.mark.slow
def test_sigterm_writes_a_final_checkpoint_and_exits_143(tmp_path):
    """SIGINT (exit 130) is tested in tests/training/test_train.py; SIGTERM is what SLURM and Kubernetes send."""
    run = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fewstep", *TOY, "trainer.max_steps=100000", f"hydra.run.dir={run}"],
            cwd=tmp_path, env=faults.subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(lambda: (run / "metrics.jsonl").exists() and rows(run), 180, proc, "a metrics row")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 143, (tmp_path / "log.txt").read_text()[-3000:]
    state = verify(ckpts(run)[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == state["step"] >= 5
    assert state["data_position"] == state["step"] and leftovers(run / "checkpoints") == []
    assert load_every_checkpoint(run / "checkpoints")[-1] == state["step"]


# --------------------------------------------------------------------------- 5. two processes


# docs/reliability.md: the launcher exits 1 within 5 s of a rank's SIGKILL (measured 0.58 s and 0.67 s for
# ranks 1 and 0 on 2 CPU cores; the bound leaves room for a loaded machine).
LAUNCHER_EXIT_S = 5.0


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_killing_one_rank_stops_the_job_without_a_corrupt_checkpoint(tmp_path, rank):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU; SIGKILL one worker once a checkpoint exists:
    the launcher exits 1 within LAUNCHER_EXIT_S, every checkpoint loads and resumes in one process.
    (That two ranks equal one process with grad_accum 2 is tested in tests/training/test_train.py.)"""
    import psutil

    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "fewstep", *TOY, "trainer.max_steps=100000", "trainer.checkpoint_every=5", "trainer.keep_last=3",
        f"hydra.run.dir={run}",
    ]  # fmt: skip
    workers = {}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=faults.subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(ckpts(run)) > 0, 300, proc, "a checkpoint")
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    env = child.environ()
                except psutil.Error:
                    continue
                if "RANK" in env and "LOCAL_RANK" in env:
                    workers[int(env["RANK"])] = child
            assert sorted(workers) == [0, 1]
            os.kill(workers[rank].pid, signal.SIGKILL)
            start = time.time()
            returncode = proc.wait(timeout=180)
            stopped_in = time.time() - start
        finally:
            if proc.poll() is None:
                proc.kill()
            for worker in workers.values():  # the other worker, should it linger
                if worker.is_running():
                    worker.kill()
    assert returncode == 1, (tmp_path / "log.txt").read_text()[-3000:]
    assert stopped_in < LAUNCHER_EXIT_S, f"launcher exited {stopped_in:.1f} s after the kill"
    steps = load_every_checkpoint(run / "checkpoints")
    assert steps and all(s % 5 == 0 for s in steps)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    if lines and not lines[-1].endswith("}"):
        lines.pop()  # rank 0 killed while appending a row: the resumed writer drops it
    losses = [json.loads(line)["loss"] for line in lines]
    assert losses and all(isinstance(v, float) and v == v for v in losses)  # finite (NaN is logged as a string)
    newest = steps[-1]
    ranks = torch.load(ckpts(run)[-1] / "rng.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2

    # the 2-rank checkpoint resumes in one process (each rank's RNG is kept; rank 0's is used here)
    summary = train(compose([*TOY, f"trainer.max_steps={newest + 2}", "trainer.resume=auto"]), run_dir=run)
    assert summary["start_step"] == newest and summary["steps"] == newest + 2
