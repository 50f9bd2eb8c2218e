"""Fast unit tests of fewstep.training.checkpoint: every function on a tiny module, exact files, values and messages."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import torch.serialization
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fewstep.training.checkpoint as ck
from fewstep.models.family import building_empty

FIX = "resume from an earlier checkpoint (trainer.resume=auto skips corrupt ones) or set trainer.resume=none"


class Tiny(nn.Module):
    """Two trainable tensors, a frozen one (not in a checkpoint) and a buffer."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(2, 3, generator=g))
            self.lin.bias.copy_(torch.randn(2, generator=g))
        self.frozen = nn.Parameter(torch.full((2,), float(seed)), requires_grad=False)
        self.register_buffer("count", torch.tensor([seed, seed + 1]))


class Avg:
    """A weight average as the checkpoint sees one: dict entries become files, None entries vanish, the rest is JSON."""

    def __init__(self, shadow, low=None, **counters):
        self.shadow, self.low, self.counters = shadow, low, counters
        self.loaded = None

    def state_dict(self):
        return {"shadow": dict(self.shadow), "low": self.low, "unused": None, **self.counters}

    def load_state_dict(self, state):
        self.loaded = {
            k: (
                {kk: (vv if torch.is_tensor(vv) else vv[()]).clone() for kk, vv in v.items()}
                if isinstance(v, dict)
                else v
            )
            for k, v in state.items()
        }
        self.kinds = {k: {type(vv).__name__ for vv in v.values()} for k, v in state.items() if isinstance(v, dict)}


def trained(seed=0, lr=0.1):
    """A Tiny model, its AdamW after one step and a StepLR after one step."""
    model = Tiny(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model.lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def fresh(seed=7, lr=0.1):
    model = Tiny(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def teacher_for(model):
    shadow = {k: v.detach() * 2 for k, v in ck.student_state(model).items() if k.startswith("lin.")}
    return Avg(shadow, low={"lin.weight": torch.full((2, 3), 3, dtype=torch.int16)}, decay=0.5, last_step=4)


def save(root, step=5, seed=0, **kw):
    model, opt, sched = trained(seed)
    teacher = kw.pop("teacher", None) or teacher_for(model)
    path = ck.save_checkpoint(root, step, model, teacher, opt, sched, data_position=17, **kw)
    return path, model, opt, sched, teacher


def write_state(ckpt, state):
    (ckpt / "state.json").write_text(json.dumps(state))


def valid_dir(path, step=1):
    """A minimal checkpoint folder that verifies: one listed file."""
    path.mkdir(parents=True)
    (path / "a.bin").write_bytes(b"abc")
    write_state(path, {"step": step, "files": {"a.bin": 3}})
    return path


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run in a temporary folder: a broken write (a path lost on the way) lands there, not in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def live_pid():
    # SIGHUP back to its default (a run under nohup ignores it, and the child inherits that): a stray signal kills it
    proc = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def undeletable(monkeypatch, name):
    """Files called ``name`` cannot be deleted (a busy file on a network disk)."""
    real = os.unlink

    def unlink(path, *a, **kw):
        if os.path.basename(str(path)) == name:
            raise PermissionError(f"busy: {name}")
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- small helpers -------------------------------------------------------------------------------------------


def test_state_keys_and_student_state():
    model = Tiny(1)
    assert ck.state_keys(model) == ["lin.weight", "lin.bias", "count"]
    state = ck.student_state(model)
    assert list(state) == ["lin.weight", "lin.bias", "count"]
    assert torch.equal(state["lin.weight"], model.lin.weight.detach())
    assert torch.equal(state["count"], torch.tensor([1, 2]))
    assert not state["lin.weight"].requires_grad
    assert ck.student_state(model, keep=False) == {}
    assert ck.student_state(model, False) == {}


def test_file_names():
    assert ck.teacher_file("shadow") == "teacher.safetensors"
    assert ck.teacher_file("low") == "teacher_low.safetensors"
    assert ck.network_ema_file("critic", "shadow") == "network_critic_ema.safetensors"
    assert ck.network_ema_file("critic", "low") == "network_critic_ema_low.safetensors"
    assert ck.FORMAT_VERSION == 1 and ck.PREFIX == "step_"
    assert issubclass(ck.CheckpointError, RuntimeError)


def test_rng_state_round_trip():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.randn()  # a cached gaussian in the numpy state
    state = ck.rng_state()
    assert sorted(state) == ["cuda", "numpy", "python", "torch"]
    assert state["cuda"] == []
    assert state["python"] == repr(random.getstate())
    np_state = np.random.get_state()
    assert state["numpy"][0] == "MT19937"
    assert state["numpy"][1] == np_state[1].tolist() and len(state["numpy"][1]) == 624
    assert state["numpy"][2:] == list(np_state[2:])
    assert torch.equal(state["torch"], torch.get_rng_state())
    want = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ck.set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    assert np.array_equal(got[2], want[2]) and got[3] == want[3]


def test_rng_state_cuda(monkeypatch):
    calls = []
    cuda_states = [torch.tensor([1, 2], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    state = ck.rng_state()
    # a state with GPU generators restored where there is no GPU: left alone
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ck.set_rng_state({**state, "cuda": cuda_states})
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ck.set_rng_state({**state, "cuda": []})
    assert calls == []
    ck.set_rng_state({**state, "cuda": cuda_states})
    assert calls == [cuda_states]
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    assert ck.rng_state()["cuda"] is cuda_states
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ck.rng_state()["cuda"] == []


# --- _Folder ---------------------------------------------------------------------------------------------------


def test_folder_writes_tensors_and_objects(tmp_path):
    folder = ck._Folder(tmp_path)
    assert folder.writing and folder.path == tmp_path and folder.error is None
    folder.put("w.safetensors", {"a": torch.arange(3.0)})
    folder.put("o.pt", obj={"k": torch.tensor([5])})
    folder.put("n.pt")  # obj None: a file holding None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.pt", "o.pt", "w.safetensors"]
    assert_same_tensors(load_file(str(tmp_path / "w.safetensors")), {"a": torch.arange(3.0)})
    assert torch.load(tmp_path / "o.pt", weights_only=True)["k"].tolist() == [5]
    assert torch.load(tmp_path / "n.pt", weights_only=True) is None
    nothing = ck._Folder(None)
    assert not nothing.writing
    nothing.put("w.safetensors", {"a": torch.zeros(1)})
    assert nothing.error is None


def test_folder_stops_after_a_failed_write(tmp_path):
    shared = torch.zeros(3)
    folder = ck._Folder(tmp_path / "f")
    (tmp_path / "f").mkdir()
    folder.put("bad.safetensors", {"a": shared, "b": shared})  # safetensors refuses tensors sharing memory
    assert isinstance(folder.error, RuntimeError) and "share memory" in str(folder.error)
    assert not (tmp_path / "f").exists() and not folder.writing
    first = folder.error
    (tmp_path / "f").mkdir()
    folder.put("later.pt", obj=1)
    assert folder.error is first and list((tmp_path / "f").iterdir()) == []
    # a write into a folder that is gone: the error is kept, removing the missing folder raises nothing
    gone = ck._Folder(tmp_path / "missing")
    gone.put("x.safetensors", {"a": torch.zeros(1)})
    assert gone.error is not None and not gone.writing


# --- save_checkpoint --------------------------------------------------------------------------------------------


def test_save_checkpoint_files_and_state(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    model, opt, sched = trained()
    teacher = teacher_for(model)
    torch.manual_seed(11)
    rng_before = ck.rng_state()
    path = ck.save_checkpoint(root, 5, model, teacher, opt, sched, data_position=17, extra={"note": "x"})
    assert path == root / "step_0000005"
    assert [p.name for p in root.iterdir()] == ["step_0000005"]
    names = sorted(p.name for p in path.iterdir())
    assert names == ["model.safetensors", "optim.pt", "rng.pt", "state.json", "teacher.safetensors",
                     "teacher_low.safetensors"]  # fmt: skip
    state = json.loads((path / "state.json").read_text())
    sizes = {n: (path / n).stat().st_size for n in names if n != "state.json"}
    assert state == {
        "format_version": 1,
        "step": 5,
        "data_position": 17,
        "teacher": {"decay": 0.5, "last_step": 4},
        "files": sizes,
        "note": "x",
    }
    assert_same_tensors(load_file(str(path / "model.safetensors")), ck.student_state(model))
    assert_same_tensors(load_file(str(path / "teacher.safetensors")), teacher.shadow)
    assert_same_tensors(load_file(str(path / "teacher_low.safetensors")), teacher.low)
    optim = torch.load(path / "optim.pt", weights_only=True)
    assert sorted(optim) == ["optimizer", "scheduler"]
    assert optim["scheduler"] == sched.state_dict()
    assert torch.equal(optim["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert optim["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert sorted(rng) == ["ranks"] and len(rng["ranks"]) == 1
    assert torch.equal(rng["ranks"][0]["torch"], rng_before["torch"])
    assert rng["ranks"][0]["python"] == rng_before["python"] and rng["ranks"][0]["numpy"] == rng_before["numpy"]
    assert ck.verify(path) == state


def test_save_checkpoint_given_rng_states_and_no_extra(tmp_path):
    states = [{"torch": torch.tensor([1], dtype=torch.uint8)}, {"torch": torch.tensor([2], dtype=torch.uint8)}]
    path, *_ = save(tmp_path, step=12345678, rng_states=states)
    assert path.name == "step_12345678"
    assert [s["torch"].tolist() for s in torch.load(path / "rng.pt", weights_only=True)["ranks"]] == [[1], [2]]
    state = json.loads((path / "state.json").read_text())
    assert sorted(state) == ["data_position", "files", "format_version", "step", "teacher"]


def test_save_checkpoint_networks(tmp_path):
    critic, copt, csched = trained(seed=3, lr=0.2)
    avg = Avg({"lin.weight": torch.full((2, 3), 4.0)}, low={"lin.weight": torch.ones(2, 3, dtype=torch.int16)},
              current_decay=0.25)  # fmt: skip
    plain, popt, psched = trained(seed=4)
    nets = {"critic": (critic, copt, csched, avg), "plain": (plain, popt, psched, None)}
    path, *_ = save(tmp_path, networks=nets)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["model.safetensors", "network_critic.safetensors", "network_critic_ema.safetensors",
                     "network_critic_ema_low.safetensors", "network_plain.safetensors", "optim.pt", "rng.pt",
                     "state.json", "teacher.safetensors", "teacher_low.safetensors"]  # fmt: skip
    state = json.loads((path / "state.json").read_text())
    assert state["networks"] == {"critic": {"current_decay": 0.25}}
    assert_same_tensors(load_file(str(path / "network_critic.safetensors")), ck.student_state(critic))
    assert_same_tensors(load_file(str(path / "network_plain.safetensors")), ck.student_state(plain))
    assert_same_tensors(load_file(str(path / "network_critic_ema.safetensors")), avg.shadow)
    assert_same_tensors(load_file(str(path / "network_critic_ema_low.safetensors")), avg.low)
    optim = torch.load(path / "optim.pt", weights_only=True)
    assert sorted(optim["networks"]) == ["critic", "plain"]
    assert sorted(optim["networks"]["critic"]) == ["optimizer", "scheduler"]
    assert optim["networks"]["critic"]["scheduler"] == csched.state_dict()
    assert optim["networks"]["critic"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1)
    assert torch.equal(
        optim["networks"]["plain"]["optimizer"]["state"][1]["exp_avg"], popt.state_dict()["state"][1]["exp_avg"]
    )
    # networks without averages: no "networks" entry in state.json
    path2, *_ = save(tmp_path, step=6, networks={"plain": (plain, popt, psched, None)})
    assert "networks" not in json.loads((path2 / "state.json").read_text())


def test_save_checkpoint_not_writing(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    model, opt, sched = trained()
    path = ck.save_checkpoint(root, 3, model, teacher_for(model), opt, sched, 0, write=False)
    assert path == root / "step_0000003" and not root.exists()
    # a rank that does not write keeps no copy of any state and writes nothing, even where its folder exists
    teacher = teacher_for(model)
    results = []
    for name in ("student_state", "gathered", "full_optimizer_state"):
        real = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda *a, _real=real, **kw: results.append(_real(*a, **kw)) or results[-1])
    tmp = root / f".tmp_step_0000003_{os.getpid()}"
    tmp.mkdir(parents=True)
    critic, copt, csched = trained(seed=3)
    avg = Avg({"lin.weight": torch.ones(2, 3)}, low={"lin.weight": torch.ones(2, 3, dtype=torch.int16)}, n=1)
    nets = {"critic": (critic, copt, csched, avg)}
    assert ck.save_checkpoint(root, 3, model, teacher, opt, sched, 0, networks=nets, write=False) == path
    assert len(results) == 10 and all(r == {} for r in results)  # 3 student_state, 5 gathered, 2 optimizers
    assert list(tmp.iterdir()) == [] and [p.name for p in root.iterdir()] == [tmp.name]

    class Broken(Avg):
        def state_dict(self):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="^boom$"):
        ck.save_checkpoint(root, 3, model, Broken({}), opt, sched, 0, write=False)
    assert [p.name for p in root.iterdir()] == [tmp.name]


def test_save_checkpoint_rewrites_a_step_and_cleans_leftovers(tmp_path, dead_pid, live_pid):
    first, *_ = save(tmp_path, step=5, seed=0)
    stale = tmp_path / f".tmp_step_0000009_{dead_pid}"
    stale.mkdir()
    live = tmp_path / f".tmp_step_0000009_{live_pid.pid}"
    live.mkdir()
    own = tmp_path / f".tmp_step_0000005_{os.getpid()}"
    own.mkdir()
    (own / "junk").write_text("x")
    second, model, *_ = save(tmp_path, step=5, seed=1)
    assert second == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "step_0000005"])
    assert_same_tensors(load_file(str(second / "model.safetensors")), ck.student_state(model))
    assert live_pid.poll() is None


def test_save_checkpoint_failure_reports_and_cleans(tmp_path):
    good, *_ = save(tmp_path, step=1)
    model, opt, sched = trained()
    shared = torch.zeros(2)
    bad = Avg({"a": shared, "b": shared}, decay=0.5)
    with pytest.raises(ck.CheckpointError) as err:
        ck.save_checkpoint(tmp_path, 2, model, bad, opt, sched, 0)
    final = tmp_path / "step_0000002"
    detail = " ".join(str(err.value.__cause__).split())[:300]
    assert str(err.value) == (
        f"writing checkpoint {final} failed (RuntimeError: {detail}); earlier checkpoints are intact: if the disk "
        "is full, free space (or lower trainer.keep_last), then restart with trainer.resume=auto"
    )
    assert isinstance(err.value.__cause__, RuntimeError) and "share memory" in str(err.value.__cause__)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    assert ck.verify(good)["step"] == 1

    class Long(Avg):
        def state_dict(self):
            raise OSError("no   space\n" * 40)

    with pytest.raises(ck.CheckpointError) as err:
        ck.save_checkpoint(tmp_path, 3, model, Long({}), opt, sched, 0)
    detail = ("no space " * 40)[:300]
    assert str(err.value).startswith(f"writing checkpoint {tmp_path / 'step_0000003'} failed (OSError: {detail}); ")
    assert len(detail) == 300
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]

    in_the_way = tmp_path / f".tmp_step_0000005_{os.getpid()}"
    in_the_way.write_text("a file, not a leftover folder")
    with pytest.raises(ck.CheckpointError) as err:
        ck.save_checkpoint(tmp_path, 5, model, teacher_for(model), opt, sched, 0)
    assert str(err.value).startswith(
        f"writing checkpoint {tmp_path / 'step_0000005'} failed (NotADirectoryError: [Errno 20] Not a directory: "
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_the_way.name, "step_0000001"]
    in_the_way.unlink()

    class Interrupted(Avg):
        def state_dict(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 4, model, Interrupted({}), opt, sched, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]


# --- _commit, _remove, _fsync_dir ---------------------------------------------------------------------------------


def test_commit(tmp_path, monkeypatch):
    synced = []
    real = ck._fsync_dir
    monkeypatch.setattr(ck, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    tmp, final = tmp_path / ".tmp_x", tmp_path / "step_0000001"
    tmp.mkdir()
    (tmp / "f").write_text("new")
    ck._commit(tmp, final)
    assert (final / "f").read_text() == "new" and not tmp.exists() and synced == [tmp_path]
    # over an existing step, with a leftover .old_ of this process in the way
    old = tmp_path / f".old_step_0000001_{os.getpid()}"
    old.mkdir()
    (old / "g").write_text("older")
    tmp.mkdir()
    (tmp / "f").write_text("newer")
    ck._commit(tmp, final)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    assert [p.name for p in final.iterdir()] == ["f"] and (final / "f").read_text() == "newer"
    # the rename fails: the old step is put back
    with pytest.raises(FileNotFoundError):
        ck._commit(tmp_path / ".tmp_missing", final)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"] and (final / "f").read_text() == "newer"
    with pytest.raises(FileNotFoundError) as err:
        ck._commit(tmp_path / ".tmp_missing", tmp_path / "step_0000002")
    assert err.value.filename == str(tmp_path / ".tmp_missing")
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]


def test_commit_old_step_undeletable(tmp_path, monkeypatch):
    final = valid_dir(tmp_path / "step_0000001")
    tmp = tmp_path / ".tmp_x"
    tmp.mkdir()
    (tmp / "f").write_text("new")
    undeletable(monkeypatch, "a.bin")
    ck._commit(tmp, final)  # the old step cannot be deleted: left for clean_stale, no error
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".old_step_0000001_{os.getpid()}", "step_0000001"]
    assert [p.name for p in final.iterdir()] == ["f"]


def test_commit_keeps_a_new_final_on_failure(tmp_path, monkeypatch):
    """A failure after the rename: the new step stays, the old one is not put over it."""
    final = tmp_path / "step_0000001"
    final.mkdir()
    (final / "f").write_text("old")
    tmp = tmp_path / ".tmp_x"
    tmp.mkdir()
    (tmp / "f").write_text("new")

    def fail(path):
        raise RuntimeError("fsync")

    monkeypatch.setattr(ck, "_fsync_dir", fail)
    with pytest.raises(RuntimeError, match="^fsync$"):
        ck._commit(tmp, final)
    assert (final / "f").read_text() == "new"


def test_remove(tmp_path, monkeypatch):
    ckpt = valid_dir(tmp_path / "step_0000001")
    ck._remove(ckpt)
    assert list(tmp_path.iterdir()) == []
    ck._remove(tmp_path / "step_0000002")  # already gone: nothing raised
    ckpt = valid_dir(tmp_path / "step_0000003")
    undeletable(monkeypatch, "a.bin")
    ck._remove(ckpt)  # a file that cannot be deleted: left in the renamed folder, no error
    assert [p.name for p in tmp_path.iterdir()] == [f".tmp_del_step_0000003_{os.getpid()}"]


def test_fsync_dir(tmp_path, monkeypatch):
    seen, closed = [], []
    real_close = os.close
    monkeypatch.setattr(os, "fsync", lambda fd: seen.append(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    ck._fsync_dir(tmp_path)
    assert seen == [str(tmp_path)] and len(closed) == 1
    ck._fsync_dir(tmp_path / "missing")
    assert seen == [str(tmp_path)] and len(closed) == 1

    def fail(fd):
        raise OSError("EINVAL")

    monkeypatch.setattr(os, "fsync", fail)
    ck._fsync_dir(tmp_path)
    assert len(closed) == 2


# --- stale leftovers ------------------------------------------------------------------------------------------


def test_writer_gone(tmp_path, live_pid, dead_pid, monkeypatch):
    assert ck._writer_gone(tmp_path / f".tmp_step_0000005_{os.getpid()}")
    assert not ck._writer_gone(tmp_path / f".tmp_step_0000005_{live_pid.pid}")
    with pytest.raises(subprocess.TimeoutExpired):  # asked with signal 0 only: still running
        live_pid.wait(timeout=0.2)
    assert ck._writer_gone(tmp_path / f".old_step_0000005_{dead_pid}")
    assert ck._writer_gone(tmp_path / ".tmp_step_abc")
    assert ck._writer_gone(tmp_path / "nounderscore")

    def denied(pid, sig):
        raise PermissionError("not yours")

    with monkeypatch.context() as patch:
        patch.setattr(os, "kill", denied)
        assert not ck._writer_gone(tmp_path / f".tmp_step_0000005_{live_pid.pid}")


def test_clean_stale(tmp_path, live_pid, dead_pid):
    ck.clean_stale(tmp_path / "missing")  # nothing raised
    dead, live = dead_pid, live_pid.pid
    (tmp_path / f".tmp_step_0000003_{dead}").mkdir()
    (tmp_path / f".tmp_step_0000004_{live}").mkdir()
    (tmp_path / f".tmp_file_{dead}").write_text("a file")
    (tmp_path / f"other_{dead}").mkdir()
    valid_dir(tmp_path / f".old_step_0000002_{dead}", step=2)  # its step is gone: put back
    valid_dir(tmp_path / "step_0000006", step=6)
    valid_dir(tmp_path / f".old_step_0000006_{dead}", step=60)  # its step exists: dropped
    (tmp_path / f".old_step_0000007_{dead}").mkdir()  # invalid: dropped
    valid_dir(tmp_path / f".old_step_0000008_{live}", step=8)  # a live writer's: left alone
    ck.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f".tmp_step_0000004_{live}", f".tmp_file_{dead}", f"other_{dead}", "step_0000002", "step_0000006",
        f".old_step_0000008_{live}",
    ])  # fmt: skip
    assert ck.verify(tmp_path / "step_0000002")["step"] == 2
    assert ck.verify(tmp_path / "step_0000006")["step"] == 6


def test_clean_stale_undeletable(tmp_path, dead_pid, monkeypatch):
    stale = valid_dir(tmp_path / f".tmp_step_0000002_{dead_pid}")
    (stale / "b.bin").write_text("b")
    undeletable(monkeypatch, "a.bin")
    ck.clean_stale(tmp_path)  # what cannot be deleted stays, no error
    assert [p.name for p in tmp_path.iterdir()] == [stale.name] and [p.name for p in stale.iterdir()] == ["a.bin"]


def test_clean_stale_rename_failure_drops_the_old_folder(tmp_path, dead_pid, monkeypatch):
    valid_dir(tmp_path / f".old_step_0000002_{dead_pid}", step=2)

    def fail(src, dst):
        raise OSError("cross-device")

    monkeypatch.setattr(os, "replace", fail)
    ck.clean_stale(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- verify ------------------------------------------------------------------------------------------------------


def test_verify_messages(tmp_path):
    ckpt = tmp_path / "step_0000001"
    ckpt.mkdir()
    with pytest.raises(ck.CheckpointError) as err:
        ck.verify(ckpt)
    assert str(err.value) == f"checkpoint {ckpt} is incomplete (no state.json); pick another or set trainer.resume=none"
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError) as err:
        ck.verify(ckpt)
    assert str(err.value) == (
        f"checkpoint {ckpt} has a corrupt state.json (Expecting property name enclosed in double quotes: "
        f"line 1 column 2 (char 1)); {FIX}"
    )
    assert isinstance(err.value.__cause__, ValueError)
    incomplete = f"checkpoint {ckpt} has an incomplete state.json (no step or file list); {FIX}"
    for bad in ([], {"step": 1}, {"files": {}}, {"files": [], "step": 1}, {"files": {}, "step": "1"}):
        write_state(ckpt, bad)
        with pytest.raises(ck.CheckpointError) as err:
            ck.verify(ckpt)
        assert str(err.value) == incomplete, bad
    write_state(ckpt, {"step": 3, "files": {}, "x": [1]})
    assert ck.verify(str(ckpt)) == {"step": 3, "files": {}, "x": [1]}


def test_verify_files(tmp_path):
    path, *_ = save(tmp_path, step=2)
    state = ck.verify(path)
    assert state["step"] == 2
    model = path / "model.safetensors"
    data = model.read_bytes()
    for name, damage, why in (
        ("model.safetensors", lambda p: p.unlink(), "is missing or truncated"),
        ("model.safetensors", lambda p: p.write_bytes(data[:-1]), "is missing or truncated"),
        ("model.safetensors", lambda p: p.write_bytes(b"\xff" * len(data)), "is unreadable (SafetensorError)"),
    ):
        damage(path / name)
        with pytest.raises(ck.CheckpointError) as err:
            ck.verify(path)
        assert str(err.value) == f"checkpoint {path} is corrupt: {name} {why}; {FIX}"
        assert err.value.__cause__ is None
        model.write_bytes(data)
    optim = path / "optim.pt"
    size = optim.stat().st_size
    optim.write_bytes(b"\0" * size)
    with pytest.raises(ck.CheckpointError) as err:
        ck.verify(path)
    assert str(err.value) == f"checkpoint {path} is corrupt: optim.pt is unreadable (BadZipFile); {FIX}"
    # a listed file of another kind is checked for its size only
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_bytes(b"\0" * 4)
    write_state(other, {"step": 1, "files": {"notes.txt": 4}})
    assert ck.verify(other)["files"] == {"notes.txt": 4}


# --- listing, latest, resolve, prune -----------------------------------------------------------------------------


def test_list_checkpoints(tmp_path):
    assert ck.list_checkpoints(tmp_path / "missing") == []
    for name in ("step_0000010", "step_0000002", ".old_step_0000005_123", ".old_step_0000002_9", "other",
                 ".old_other_1", ".tmp_step_0000011_1"):  # fmt: skip
        (tmp_path / name).mkdir()
    (tmp_path / "step_0000003").write_text("a file")
    assert ck.list_checkpoints(str(tmp_path)) == [
        tmp_path / "step_0000002",
        tmp_path / ".old_step_0000005_123",
        tmp_path / "step_0000010",
    ]


def test_latest_valid(tmp_path, capsys):
    assert ck.latest_valid(tmp_path) is None
    valid_dir(tmp_path / "step_0000001")
    valid_dir(tmp_path / "step_0000002")
    (tmp_path / "step_0000003").mkdir()
    warned = []
    assert ck.latest_valid(tmp_path, warn=warned.append) == tmp_path / "step_0000002"
    assert warned == [
        f"skipping checkpoint {tmp_path / 'step_0000003'} is incomplete (no state.json); pick another or set "
        "trainer.resume=none"
    ]
    assert ck.latest_valid(tmp_path) == tmp_path / "step_0000002"
    assert capsys.readouterr().out == warned[0] + "\n"
    shutil.rmtree(tmp_path / "step_0000001")
    shutil.rmtree(tmp_path / "step_0000002")
    assert ck.latest_valid(tmp_path, warn=warned.append) is None


def test_resolve_resume(tmp_path, capsys):
    run = tmp_path / "run"
    for off in ("none", "", None):
        assert ck.resolve_resume(off, run) is None
    assert ck.resolve_resume("auto", run) is None
    valid_dir(run / "checkpoints" / "step_0000001")
    (run / "checkpoints" / "step_0000002").mkdir()
    warned = []
    assert ck.resolve_resume("auto", run, warn=warned.append) == run / "checkpoints" / "step_0000001"
    assert len(warned) == 1 and warned[0].startswith("skipping checkpoint")
    assert ck.resolve_resume(str(run), tmp_path, warn=warned.append) == run / "checkpoints" / "step_0000001"
    assert len(warned) == 2
    assert ck.resolve_resume(str(run / "checkpoints"), tmp_path, warn=warned.append) == run / "checkpoints" / (
        "step_0000001"
    )
    assert ck.resolve_resume(str(run / "checkpoints" / "step_0000001"), tmp_path) == run / "checkpoints" / (
        "step_0000001"
    )
    assert capsys.readouterr().out == ""
    write_state(run / "checkpoints" / "step_0000002", {"step": 2})
    with pytest.raises(ck.CheckpointError, match="has an incomplete state.json"):
        ck.resolve_resume(str(run / "checkpoints" / "step_0000002"), tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(ck.CheckpointError) as err:
        ck.resolve_resume(str(missing), run)
    assert str(err.value) == f"trainer.resume={missing}: no such path; give a checkpoint or run dir, or 'auto'/'none'"
    with pytest.raises(ck.CheckpointError) as err:
        ck.resolve_resume(str(missing), run, key="trainer.init_from")
    assert str(err.value) == f"trainer.init_from={missing}: no such path; give a checkpoint or run dir"
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ck.CheckpointError) as err:
        ck.resolve_resume(str(empty), run, key="x.y")
    assert str(err.value) == f"x.y={empty}: no valid checkpoint found there"


def test_prune(tmp_path, dead_pid):
    def names():
        return sorted(p.name for p in tmp_path.iterdir())

    ck.prune(tmp_path, 2)  # empty: nothing
    (tmp_path / "step_0000001").mkdir()  # invalid, older than a valid one: removed
    for step in (2, 3, 4, 5):
        valid_dir(tmp_path / f"step_{step:07d}", step=step)
    (tmp_path / "step_0000006").mkdir()  # invalid, newest: left for inspection
    (tmp_path / f".tmp_step_0000007_{dead_pid}").mkdir()
    ck.prune(tmp_path, 2)
    assert names() == ["step_0000004", "step_0000005", "step_0000006"]
    ck.prune(tmp_path, 0)  # never deletes the only valid one
    assert names() == ["step_0000005", "step_0000006"]
    ck.prune(tmp_path, 5)
    assert names() == ["step_0000005", "step_0000006"]
    shutil.rmtree(tmp_path / "step_0000005")
    (tmp_path / "step_0000002").mkdir()
    ck.prune(tmp_path, 1)  # nothing valid: nothing deleted
    assert names() == ["step_0000002", "step_0000006"]


# --- reading tensors -----------------------------------------------------------------------------------------------


def test_stored_and_tensors(tmp_path):
    whole = torch.arange(12.0).reshape(4, 3)
    path = tmp_path / "w.safetensors"
    save_file({"w": whole, "b": torch.tensor([1.0, 2.0])}, str(path))
    with safe_open(str(path), framework="pt") as file:
        stored = ck._Stored(file, "w")
        assert stored.file is file and stored.key == "w"
        assert torch.equal(stored[()], whole)
        assert torch.equal(stored[1:3], whole[1:3])
        assert torch.equal(stored[1:3, 0:2], whole[1:3, 0:2])
    with ck._tensors(path, False) as tensors:
        assert_same_tensors(tensors, {"b": torch.tensor([1.0, 2.0]), "w": whole})
    with ck._tensors(path, True) as tensors:
        assert sorted(tensors) == ["b", "w"] and all(isinstance(v, ck._Stored) for v in tensors.values())
        assert tensors["w"].key == "w" and torch.equal(tensors["w"][2:4], whole[2:4])
        assert torch.equal(tensors["b"][()], torch.tensor([1.0, 2.0]))


def test_load_module_mismatch(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"lin.bias": torch.zeros(2)}, str(path))
    with pytest.raises(ck.CheckpointError) as err:
        ck._load_module(path, Tiny(0), tmp_path)
    assert str(err.value) == (
        f"checkpoint {tmp_path} does not match the model (2 tensors missing, e.g. count); resume with the run's own "
        "model and objective config"
    )
    with pytest.raises(ck.CheckpointError, match=r"does not match the critic \(2 tensors missing, e\.g\. count\)"):
        ck._load_module(path, Tiny(0), tmp_path, what="the critic")
    model = Tiny(0)
    save_file({"lin.bias": torch.full((2,), 9.0), "lin.weight": torch.ones(2, 3), "count": torch.tensor([4, 5]),
               "extra": torch.zeros(1)}, str(path))  # fmt: skip
    ck._load_module(path, model, tmp_path)
    assert model.lin.bias.tolist() == [9.0, 9.0] and model.count.tolist() == [4, 5]
    assert model.frozen.tolist() == [0.0, 0.0]


def sharded_reads(monkeypatch, modules):
    """Treat ``modules`` (and their parameters) as sharded: records the kinds of values loaded into them."""
    params = {id(p) for m in modules for p in m.parameters()}
    monkeypatch.setattr(ck, "is_sharded", lambda m: any(id(p) in params for p in m.parameters()))
    monkeypatch.setattr(ck, "is_shard", lambda p: id(p) in params)
    kinds = []

    def load_full(module, weights):
        kinds.append({type(v).__name__ for v in weights.values()})
        module.load_state_dict({k: v[()] for k, v in weights.items()}, strict=False)

    monkeypatch.setattr(ck, "load_full_state_dict", load_full)
    return kinds


def test_load_module_sharded_reads_lazily(tmp_path, monkeypatch):
    model = Tiny(0)
    kinds = sharded_reads(monkeypatch, [model])
    path = tmp_path / "m.safetensors"
    save_file({"lin.bias": torch.full((2,), 9.0), "lin.weight": torch.ones(2, 3), "count": torch.tensor([4, 5])},
              str(path))  # fmt: skip
    ck._load_module(path, model, tmp_path)
    assert kinds == [{"_Stored"}]
    assert model.lin.bias.tolist() == [9.0, 9.0]


# --- _load_optim ----------------------------------------------------------------------------------------------


def overwrite_floats(path, old, new):
    data = path.read_bytes()
    i = data.find(struct.pack(f"<{len(old)}f", *old))
    assert i > 0 and data.find(struct.pack(f"<{len(old)}f", *old), i + 1) == -1
    with open(path, "r+b") as fh:
        fh.seek(i)
        fh.write(struct.pack(f"<{len(new)}f", *new))


def test_load_optim_maps_sharded_state(tmp_path, monkeypatch):
    model, opt, _ = fresh()
    torch.save({"optimizer": {"state": {0: {"exp_avg": torch.full((4,), 7.0)}}}}, tmp_path / "optim.pt")
    plain = ck._load_optim(tmp_path, opt)
    sharded_reads(monkeypatch, [model])
    mapped = ck._load_optim(tmp_path, opt)
    overwrite_floats(tmp_path / "optim.pt", [7.0] * 4, [1.0, 2.0, 3.0, 4.0])
    # memory-mapped (sharded): the file's bytes are read when used; else read at once
    assert mapped["optimizer"]["state"][0]["exp_avg"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert plain["optimizer"]["state"][0]["exp_avg"].tolist() == [7.0] * 4


def save_as_if_on_gpu(monkeypatch, obj, path):
    """torch.save with every storage tagged cuda:0, as a GPU run writes it."""
    registry = list(torch.serialization._package_registry)
    monkeypatch.setattr(torch.serialization, "_package_registry", [(0, lambda s: "cuda:0", None), *registry])
    torch.save(obj, path)
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)


def test_load_optim_gpu_file_onto_cpu(tmp_path, monkeypatch):
    _, opt, _ = fresh()
    save_as_if_on_gpu(monkeypatch, {"optimizer": {"state": {0: {"exp_avg": torch.arange(3.0)}}}}, tmp_path / "optim.pt")
    for sharded in (False, True):
        if sharded:  # memory-mapped
            monkeypatch.setattr(ck, "is_shard", lambda p: True)
        value = ck._load_optim(tmp_path, opt)["optimizer"]["state"][0]["exp_avg"]
        assert value.device == torch.device("cpu") and value.tolist() == [0.0, 1.0, 2.0]


class Code:
    """A pickled object that is no tensor: a file holding it could run code; weights_only refuses it."""

    def __reduce__(self):
        return (dict, ())


def test_load_optim_and_rng_refuse_pickled_code(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own default then loads anything
    _, opt, _ = fresh()
    torch.save({"optimizer": Code()}, tmp_path / "optim.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ck._load_optim(tmp_path, opt)
    monkeypatch.setattr(ck, "is_shard", lambda p: True)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ck._load_optim(tmp_path, opt)
    path, model, *_ = save(tmp_path / "ck")
    torch.save({"ranks": [Code()]}, path / "rng.pt")
    state = json.loads((path / "state.json").read_text())
    state["files"]["rng.pt"] = (path / "rng.pt").stat().st_size
    write_state(path, state)
    with pytest.raises(ck.CheckpointError, match=r"could not be read \(UnpicklingError: Weights only load failed"):
        ck.load_checkpoint(path, fresh()[0])


# --- load_checkpoint ------------------------------------------------------------------------------------------------


def test_load_checkpoint_round_trip(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    path, model, opt, sched, teacher = save(tmp_path, step=4)
    want = (torch.rand(2), random.random(), np.random.rand())
    student, sopt, ssched = fresh()
    loader = Avg({})
    state = ck.load_checkpoint(str(path), student, loader, sopt, ssched)
    assert state == json.loads((path / "state.json").read_text())
    assert_same_tensors(ck.student_state(student), ck.student_state(model))
    assert student.frozen.tolist() == [7.0, 7.0]  # not in the checkpoint
    assert sorted(loader.loaded) == ["decay", "last_step", "low", "shadow"]
    assert loader.loaded["decay"] == 0.5 and loader.loaded["last_step"] == 4
    assert_same_tensors(loader.loaded["shadow"], teacher.shadow)
    assert_same_tensors(loader.loaded["low"], teacher.low)
    assert ssched.state_dict() == sched.state_dict()
    got, ref = sopt.state_dict(), opt.state_dict()
    assert got["param_groups"] == ref["param_groups"]
    for i in (0, 1):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["state"][i][k], ref["state"][i][k])
    assert (torch.rand(2).tolist(), random.random(), np.random.rand()) == (want[0].tolist(), want[1], want[2])


def test_load_checkpoint_parts(tmp_path):
    path, model, opt, sched, teacher = save(tmp_path)
    # the student only; the RNG left alone
    student = fresh()[0]
    ck.load_checkpoint(path, student, restore_rng=False)
    assert_same_tensors(ck.student_state(student), ck.student_state(model))
    student = fresh()[0]
    torch.manual_seed(1)
    expect = torch.rand(1)
    torch.manual_seed(1)
    ck.load_checkpoint(path, student, restore_rng=False)
    assert torch.equal(torch.rand(1), expect)
    # an optimizer without a scheduler
    student, sopt, ssched = fresh()
    ck.load_checkpoint(path, student, optimizer=sopt)
    assert sopt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert ssched.state_dict()["last_epoch"] == 0


def test_load_checkpoint_rank_rng(tmp_path):
    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(ck.rng_state())
    path, *_ = save(tmp_path, rng_states=states)
    draws = {}
    for seed in (10, 11):
        torch.manual_seed(seed)
        draws[seed] = torch.rand(3)
    for rank, seed in ((None, 10), (0, 10), (1, 11), (3, 11), (2, 10)):
        torch.manual_seed(0)
        kw = {} if rank is None else {"rank": rank}
        ck.load_checkpoint(path, fresh()[0], **kw)
        assert torch.equal(torch.rand(3), draws[seed]), rank


def test_load_checkpoint_rng_from_a_gpu_run(tmp_path, monkeypatch):
    path, *_ = save(tmp_path)
    torch.manual_seed(21)
    state = ck.rng_state()
    want = torch.rand(2)
    save_as_if_on_gpu(monkeypatch, {"ranks": [state]}, path / "rng.pt")
    save_as_if_on_gpu(monkeypatch, torch.load(path / "optim.pt", weights_only=True), path / "optim.pt")
    meta = json.loads((path / "state.json").read_text())
    meta["files"].update({n: (path / n).stat().st_size for n in ("rng.pt", "optim.pt")})
    write_state(path, meta)
    student, sopt, ssched = fresh()
    ck.load_checkpoint(path, student, optimizer=sopt, scheduler=ssched)
    assert torch.equal(torch.rand(2), want)
    assert sopt.state_dict()["state"][0]["exp_avg"].device == torch.device("cpu")


def test_load_checkpoint_mismatch_and_read_errors(tmp_path):
    path, *_ = save(tmp_path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(1, 1)

    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(path, Other())
    assert str(err.value) == (
        f"checkpoint {path} does not match the model (2 tensors missing, e.g. head.bias); resume with the run's "
        "own model and objective config"
    )

    class Fails(Avg):
        def load_state_dict(self, state):
            raise ValueError("bad  teacher\n" * 30)

    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(path, fresh()[0], Fails({}))
    detail = ("bad teacher " * 30)[:300]
    assert str(err.value) == f"checkpoint {path} could not be read (ValueError: {detail}); {FIX}"
    assert isinstance(err.value.__cause__, ValueError)
    with pytest.raises(ck.CheckpointError, match="is incomplete"):
        ck.load_checkpoint(tmp_path, fresh()[0])


def test_load_checkpoint_networks(tmp_path):
    critic, copt, csched = trained(seed=3, lr=0.2)
    avg = Avg({"lin.weight": torch.full((2, 3), 4.0)}, low={"lin.weight": torch.ones(2, 3, dtype=torch.int16)},
              current_decay=0.25)  # fmt: skip
    path, *_ = save(tmp_path, networks={"critic": (critic, copt, csched, avg)})
    module, mopt, msched = fresh(lr=0.2)
    loading = Avg({}, low=None, extra={"x": torch.zeros(1)})
    ck.load_checkpoint(path, fresh()[0], networks={"critic": (module, mopt, msched, loading)})
    assert_same_tensors(ck.student_state(module), ck.student_state(critic))
    assert sorted(loading.loaded) == ["current_decay", "extra", "low", "shadow", "unused"]
    assert loading.loaded["current_decay"] == 0.25
    assert loading.loaded["unused"] is None and loading.loaded["extra"] is None  # no file for these
    assert_same_tensors(loading.loaded["shadow"], avg.shadow)
    assert_same_tensors(loading.loaded["low"], avg.low)
    assert msched.state_dict() == csched.state_dict()
    assert torch.equal(mopt.state_dict()["state"][0]["exp_avg"], copt.state_dict()["state"][0]["exp_avg"])
    # the main optimizer too, after the network's (both from optim.pt)
    module, mopt, msched = fresh(lr=0.2)
    student, sopt, ssched = fresh()
    ck.load_checkpoint(path, student, None, sopt, ssched, networks={"critic": (module, mopt, msched, None)})
    assert torch.equal(mopt.state_dict()["state"][1]["exp_avg"], copt.state_dict()["state"][1]["exp_avg"])
    assert sopt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert msched.state_dict()["last_epoch"] == 1
    # no optimizer for the network: its weights only
    module = Tiny(9)
    ck.load_checkpoint(path, fresh()[0], networks={"critic": (module, None, None, None)})
    assert_same_tensors(ck.student_state(module), ck.student_state(critic))


def test_load_checkpoint_network_errors(tmp_path):
    path, *_ = save(tmp_path)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(path, fresh()[0], networks={"critic": (Tiny(1), None, None, None)})
    assert str(err.value) == (
        f"checkpoint {path} has no network 'critic': it was written by another objective; resume with the run's "
        "own objective or set trainer.resume=none"
    )
    save_file({"lin.bias": torch.zeros(2)}, str(path / "network_critic.safetensors"))
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(path, fresh()[0], networks={"critic": (Tiny(1), None, None, None)})
    assert str(err.value) == (
        f"checkpoint {path} does not match the objective's network 'critic' (2 tensors missing, e.g. count); "
        "resume with the run's own model and objective config"
    )


def test_load_checkpoint_sharded_reads_lazily(tmp_path, monkeypatch):
    critic, copt, csched = trained(seed=3)
    avg = Avg({"lin.weight": torch.full((2, 3), 4.0)}, current_decay=0.25)
    path, model, opt, sched, teacher = save(tmp_path, networks={"critic": (critic, copt, csched, avg)})
    student, module = fresh()[0], Tiny(8)
    kinds = sharded_reads(monkeypatch, [student, module])
    loader, loading = Avg({}), Avg({})
    ck.load_checkpoint(path, student, loader, networks={"critic": (module, None, None, loading)})
    assert kinds == [{"_Stored"}, {"_Stored"}]
    assert loader.kinds == {"shadow": {"_Stored"}, "low": {"_Stored"}}
    assert loading.kinds == {"shadow": {"_Stored"}}
    assert_same_tensors(loader.loaded["shadow"], teacher.shadow)
    assert_same_tensors(loading.loaded["shadow"], avg.shadow)
    assert_same_tensors(ck.student_state(module), ck.student_state(critic))


# --- load_initial_weights --------------------------------------------------------------------------------------------


def test_load_initial_weights(tmp_path):
    run = tmp_path / "run"
    path, model, opt, sched, teacher = save(run / "checkpoints", step=3)
    student = Tiny(5)
    assert ck.load_initial_weights(run, student, use_ema=False) == path
    assert_same_tensors(ck.student_state(student), ck.student_state(model))
    assert student.frozen.tolist() == [5.0, 5.0]
    student = Tiny(5)
    assert ck.load_initial_weights(str(path), student) == path  # the EMA by default
    assert torch.equal(student.lin.weight.detach(), teacher.shadow["lin.weight"])
    assert torch.equal(student.lin.bias.detach(), teacher.shadow["lin.bias"])
    assert student.count.tolist() == [0, 1]
    (path / "teacher.safetensors").unlink()  # no EMA file: the model weights (the check of sizes is verify's)
    meta = json.loads((path / "state.json").read_text())
    del meta["files"]["teacher.safetensors"]
    write_state(path, meta)
    student = Tiny(5)
    ck.load_initial_weights(path, student, use_ema=True)
    assert_same_tensors(ck.student_state(student), ck.student_state(model))
    with building_empty():  # a rank other than 0 of a sharded run reads nothing
        student = Tiny(5)
        assert ck.load_initial_weights(path, student) == path
        assert student.lin.bias.tolist() == Tiny(5).lin.bias.tolist()


def test_load_initial_weights_adapt_and_extra_student_tensors(tmp_path):
    path, model, *_ = save(tmp_path, step=3)

    class Wider(Tiny):
        def __init__(self):
            super().__init__(6)
            self.time_embed = nn.Parameter(torch.zeros(2))

        def adapt_initial_weights(self, weights):
            self.seen = sorted(weights)
            return {k: v for k, v in weights.items() if k != "lin.bias"}

    student = Wider()
    ck.load_initial_weights(path, student, use_ema=False)
    assert student.seen == ["count", "lin.bias", "lin.weight"]
    assert torch.equal(student.lin.weight.detach(), model.lin.weight.detach())
    assert student.lin.bias.tolist() == Tiny(6).lin.bias.tolist()  # dropped by adapt_initial_weights
    assert student.time_embed.tolist() == [0.0, 0.0]


def test_load_initial_weights_errors(tmp_path, monkeypatch):
    path, *_ = save(tmp_path / "run" / "checkpoints", step=3)

    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.register_buffer("count", torch.zeros(2, dtype=torch.int64))

    with pytest.raises(ck.CheckpointError) as err:
        ck.load_initial_weights(path, Narrow(), use_ema=False)
    assert str(err.value) == (
        f"trainer.init_from={path}: 2 tensors do not fit this model (e.g. lin.bias); use the same model config as "
        "that run"
    )

    class Fewer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(2, dtype=torch.int64))

    with pytest.raises(
        ck.CheckpointError, match=r"^trainer\.init_from=.*: 2 tensors do not fit this model \(e\.g\. li"
    ):
        ck.load_initial_weights(path, Fewer(), use_ema=False)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_initial_weights("none", Tiny(0))
    assert str(err.value) == "trainer.init_from=none: no valid checkpoint there; give a finished run dir"
    missing = tmp_path / "nope"
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_initial_weights(missing, Tiny(0))
    assert str(err.value) == f"trainer.init_from={missing}: no such path; give a checkpoint or run dir"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "auto").mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "auto" / "checkpoints")
    assert ck.load_initial_weights("auto", Tiny(0)).resolve() == (tmp_path / "auto" / "checkpoints" / path.name)


def test_zip_check_reads_the_directory(tmp_path):
    """verify opens a .pt as a zip: a zip of the right size with another layout passes (tensors are not checked)."""
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    with zipfile.ZipFile(ckpt / "x.pt", "w") as zf:
        zf.writestr("a", "b")
    write_state(ckpt, {"step": 1, "files": {"x.pt": (ckpt / "x.pt").stat().st_size}})
    assert ck.verify(ckpt)["step"] == 1
