"""Checkpoints pinned further, in one process: a sharded checkpoint of an objective's own networks (weights, EMA,
moments, schedules) round-trips exactly, an average with no state of its own loads from one that recorded none,
optim.pt is read onto the CPU and never runs pickled code, the path a process group shares, and the one-line
message of a failed background write."""

from __future__ import annotations

import json

import pytest
import torch
from test_checkpoint_unit import Code, save_as_if_on_gpu
from test_sharded_checkpoint_unit import Tiny
from torch import nn

import fewstep.training.checkpoint as ck
from fewstep.teachers.base import EMATeacher, StudentTeacher
from fewstep.training import sharded_checkpoint as sc


def network(seed: int, ema: bool = True, steps: int = 2, lr=0.1):
    """A Tiny network, its AdamW and StepLR after ``steps`` steps, and an EMA (decay 0.5) updated at each."""
    module = Tiny(seed)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    average = EMATeacher(decay=0.5) if ema else None
    if average is not None:
        average.bind(module)
    for i in range(steps):
        module.b(module.a(torch.full((3, 4), float(i + seed + 1)))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if average is not None:
            average.update(module, i + 1)
    return module, opt, sched, average


def blank(seed: int, ema: bool = True, lr=0.1):
    """What a resuming run builds: fresh weights (another seed), a fresh AdamW, StepLR and EMA."""
    return network(seed, ema, steps=0, lr=lr)


def save_sharded(root, networks=None, student=None, **kw):
    model, opt, sched, teacher = student or network(0)
    return ck.save_checkpoint(root, 4, model, teacher, opt, sched, 9, networks=networks, sharded=True, **kw)


def replace_file(ckpt, name, write):
    """Rewrite one file of a checkpoint (``write(path)``) and record its new size, so that it still verifies."""
    write(ckpt / name)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"][name] = (ckpt / name).stat().st_size
    (ckpt / "state.json").write_text(json.dumps(state))
    ck.verify(ckpt)


def same(a: nn.Module, b: nn.Module):
    return all(torch.equal(x, y) for x, y in zip(ck.student_state(a).values(), ck.student_state(b).values()))


def test_a_sharded_checkpoint_keeps_the_objectives_networks_their_ema_moments_and_schedules(tmp_path):
    fake, plain = network(3), network(4, ema=False)
    ckpt = save_sharded(tmp_path, {"fake": fake, "plain": plain})
    state = ck.verify(ckpt)
    assert state["networks"] == {"fake": {"current_decay": 0.34375, "last_step": 2}}  # counters: d = 0 → 0.25 → 0.34375
    optim = torch.load(ckpt / "optim.pt", weights_only=True)
    assert optim["networks"] == {
        "fake": {"scheduler": fake[2].state_dict()},
        "plain": {"scheduler": plain[2].state_dict()},
    }
    assert sorted(sc.stored(ckpt, "network_fake")) == ["a.bias", "a.weight", "b.bias", "b.weight", "count"]
    assert sorted(sc.stored(ckpt, "network_plain")) == ["a.bias", "a.weight", "b.bias", "b.weight", "count"]
    assert sorted(sc.stored(ckpt, "network_fake_ema.shadow")) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    assert "b.weight.exp_avg" in sc.stored(ckpt, "network_plain_optimizer.state")

    f, p = blank(13), blank(14, ema=False)
    assert not same(f[0], fake[0]) and not torch.equal(f[3].shadow["a.weight"], fake[3].shadow["a.weight"])
    student = blank(10)
    got = ck.load_checkpoint(ckpt, student[0], student[3], student[1], student[2], restore_rng=False,
                             networks={"fake": f, "plain": p})  # fmt: skip
    assert got["step"] == 4
    for mine, theirs in ((f, fake), (p, plain)):
        assert same(mine[0], theirs[0])
        assert mine[2].state_dict() == theirs[2].state_dict() and mine[2].get_last_lr() == [0.025]
        names, their_names = dict(mine[0].named_parameters()), dict(theirs[0].named_parameters())
        for k in ("a.weight", "b.bias"):
            ours, want = mine[1].state[names[k]], theirs[1].state[their_names[k]]
            assert all(torch.equal(ours[s], want[s]) for s in ("exp_avg", "exp_avg_sq", "step")), k
    assert all(torch.equal(f[3].shadow[k], fake[3].shadow[k]) for k in fake[3].shadow)
    assert (f[3].current_decay, f[3].last_step) == (0.34375, 2)
    assert not torch.equal(fake[3].shadow["a.weight"], fake[0].a.weight)  # the EMA is not the weights


def test_an_average_with_no_state_of_its_own_loads_from_a_checkpoint_that_recorded_none(tmp_path):
    """The student as a network's teacher (no tensors, no counters), resumed from a checkpoint written while the
    network had no average: with or without other networks' counters in state.json."""
    for networks in (["plain"], ["fake", "plain"]):
        root = tmp_path / "_".join(networks)
        nets = {"fake": network(3), "plain": network(4, ema=False)}
        ckpt = save_sharded(root, {n: nets[n] for n in networks})
        assert ("networks" in ck.verify(ckpt)) == ("fake" in networks)
        module, opt, sched, _ = blank(14, ema=False)
        student_teacher = StudentTeacher(allow_student_teacher=True)
        student_teacher.bind(module)
        loading = {"plain": (module, opt, sched, student_teacher)}
        if "fake" in networks:
            loading["fake"] = blank(13)
        ck.load_checkpoint(ckpt, blank(10)[0], restore_rng=False, networks=loading)
        assert same(module, nets["plain"][0]) and student_teacher.shadow is None
        assert sched.state_dict() == nets["plain"][2].state_dict()


def test_a_sharded_resume_with_an_optimizer_and_no_scheduler(tmp_path):
    student = network(0)
    ckpt = save_sharded(tmp_path, student=student)
    model, opt, sched, _ = blank(5, ema=False)
    ck.load_checkpoint(ckpt, model, None, opt, None, restore_rng=False)
    assert same(model, student[0]) and sched.last_epoch == 0  # the schedule was not asked for
    p, q = student[0].a.weight, model.a.weight
    assert torch.equal(opt.state[q]["exp_avg"], student[1].state[p]["exp_avg"])
    model, opt, sched, _ = blank(5, ema=False)
    ck.load_checkpoint(ckpt, model, None, None, sched, restore_rng=False)  # a schedule without its optimizer: kept
    assert same(model, student[0]) and sched.last_epoch == 0 and not opt.state


def test_a_sharded_optim_pt_written_on_a_gpu_is_read_onto_the_cpu(tmp_path, monkeypatch):
    """A tensor learning rate puts tensors into the schedule's state; a file written where they lived on a GPU
    resumes on a machine without one (and on one with a GPU, onto the CPU all the same)."""
    student = network(0, lr=torch.tensor(0.1))
    ckpt = save_sharded(tmp_path, student=student)
    content = torch.load(ckpt / "optim.pt", weights_only=True)
    assert torch.is_tensor(content["scheduler"]["base_lrs"][0])
    replace_file(ckpt, "optim.pt", lambda path: save_as_if_on_gpu(monkeypatch, content, path))
    model, opt, sched, teacher = blank(5, lr=torch.tensor(0.1))
    ck.load_checkpoint(ckpt, model, teacher, opt, sched, restore_rng=False)
    assert sched.state_dict()["last_epoch"] == 2 and sched.base_lrs[0].device == torch.device("cpu")
    assert torch.equal(sched.base_lrs[0], torch.tensor(0.1))


def test_a_sharded_optim_pt_holding_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own default then loads anything
    student = network(0)
    ckpt = save_sharded(tmp_path, student=student)
    content = torch.load(ckpt / "optim.pt", weights_only=True)
    replace_file(ckpt, "optim.pt", lambda path: torch.save({**content, "note": Code()}, path))
    model, opt, sched, teacher = blank(5)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(ckpt, model, teacher, opt, sched, restore_rng=False)
    message = str(err.value)
    assert message.startswith(f"checkpoint {ckpt} could not be read (UnpicklingError: Weights only load failed")
    assert "\n" not in message and message.endswith(f"); {ck._FIX}")


def test_a_sharded_save_under_a_process_group_writes_into_rank_0s_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a wrong relative path would land here, not in the caller's folder
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert ck._shared_path(tmp_path / "x") == tmp_path / "x"
        student = network(0)
        ckpt = save_sharded(tmp_path / "ckpts", student=student)
        assert ckpt == tmp_path / "ckpts" / "step_0000004"
        assert sorted(ck.verify(ckpt)["files"]) == ["dcp/.metadata", "dcp/__0_0.distcp", "optim.pt", "rng.pt"]
        assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["step_0000004"]
        model, opt, sched, teacher = blank(5)
        ck.load_checkpoint(ckpt, model, teacher, opt, sched, restore_rng=False)
        assert same(model, student[0]) and sched.state_dict() == student[2].state_dict()
    finally:
        dist.destroy_process_group()


def test_a_failed_background_write_whose_folder_is_gone_is_one_line_naming_the_fix(tmp_path):
    class Failed:
        def result(self):
            raise OSError("x" * 400 + " tail")

    final = tmp_path / "step_0000005"
    broken = ck.PendingCheckpoint(final, tmp_path / ".tmp_step_0000005_1", Failed(), {"step": 5}, True)
    with pytest.raises(ck.CheckpointError) as err:
        broken.complete()
    assert str(err.value) == (
        f"writing checkpoint {final} in the background failed (OSError: {'x' * 300}); earlier checkpoints are "
        "intact: free space or set trainer.async_checkpoint=false, then restart with trainer.resume=auto"
    )
    assert isinstance(err.value.__cause__, OSError) and not final.exists()
