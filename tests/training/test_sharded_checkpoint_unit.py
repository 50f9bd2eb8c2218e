"""The sharded (torch.distributed.checkpoint) format in one process, fast: what an FSDP run writes, read back without
a process group (export, sampling) and by a resume; background saves; whole tensors of either format."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fewstep.training.checkpoint as ck
from fewstep.training import sharded_checkpoint as sc


class Tiny(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("count", torch.tensor([seed, seed + 1]))


class Teacher:
    """An EMA as the checkpoint sees one: the shadow tensors (filled in place on load) and counters."""

    def __init__(self, module):
        self.shadow = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
        self.last_step = 0

    def state_dict(self):
        return {"shadow": dict(self.shadow), "last_step": self.last_step}

    def load_state_dict(self, state):
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        self.last_step = state["last_step"]


def trained(seed=0, steps=3):
    model = Tiny(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    teacher = Teacher(model)
    for i in range(steps):
        model.b(model.a(torch.full((5, 4), float(i + 1)))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        for k, p in model.named_parameters():
            if p.requires_grad:
                teacher.shadow[k].mul_(0.5).add_(p.detach(), alpha=0.5)
    teacher.last_step = steps
    return model, opt, sched, teacher


def save(tmp_path, step=3, background=False):
    model, opt, sched, teacher = trained()
    out = ck.save_checkpoint(tmp_path / "ckpts", step, model, teacher, opt, sched, 7, extra={"note": 1},
                             sharded=True, background=background)  # fmt: skip
    return out, (model, opt, sched, teacher)


def test_a_sharded_checkpoint_lists_its_shards_and_holds_no_whole_tensor_files(tmp_path):
    ckpt, _ = save(tmp_path)
    state = ck.verify(ckpt)
    assert ckpt.name == "step_0000003" and state["format"] == "dcp" and sc.is_sharded_checkpoint(state)
    assert sorted(state["files"]) == ["dcp/.metadata", "dcp/__0_0.distcp", "optim.pt", "rng.pt"]
    assert all(state["files"][n] == (ckpt / n).stat().st_size for n in state["files"])
    assert (state["step"], state["data_position"], state["teacher"], state["note"]) == (3, 7, {"last_step": 3}, 1)
    assert set(torch.load(ckpt / "optim.pt", weights_only=True)) == {"scheduler"}  # moments live in dcp/
    assert sorted(sc.stored(ckpt, "model")) == ["a.bias", "a.weight", "b.bias", "b.weight", "count"]  # no frozen
    assert sc.stored(ckpt, "model")["a.weight"] == ((3, 4), torch.float32)
    assert sorted(sc.stored(ckpt, "teacher.shadow")) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    assert sc.stored(ckpt, "optimizer.state")["b.weight.exp_avg_sq"] == ((2, 3), torch.float32)
    assert not sc.is_sharded_checkpoint({"format_version": 1})


def test_a_resume_restores_weights_ema_moments_schedule_and_counters_exactly(tmp_path):
    ckpt, (model, opt, sched, teacher) = save(tmp_path)
    fresh = Tiny(5)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    fresh_teacher = Teacher(fresh)
    state = ck.load_checkpoint(ckpt, fresh, fresh_teacher, fresh_opt, fresh_sched, restore_rng=False)
    assert state["step"] == 3
    for (k, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q) or k == "frozen", k
    assert all(torch.equal(teacher.shadow[k], fresh_teacher.shadow[k]) for k in teacher.shadow)
    assert fresh_teacher.last_step == 3 and fresh_sched.state_dict() == sched.state_dict()
    assert fresh_sched.get_last_lr() == [0.05]
    names = dict(model.named_parameters())
    fresh_names = dict(fresh.named_parameters())
    for k in ("a.weight", "b.bias"):
        mine, theirs = opt.state[names[k]], fresh_opt.state[fresh_names[k]]
        assert all(torch.equal(mine[s], theirs[s]) for s in ("exp_avg", "exp_avg_sq", "step")), k


def test_a_parameter_without_a_saved_state_gets_none_on_resume(tmp_path):
    model = Tiny(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.a(torch.ones(2, 4)).sum().backward()  # b never gets a gradient: no AdamW state
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    ckpt = ck.save_checkpoint(tmp_path, 1, model, Teacher(model), opt, sched, 1, sharded=True)
    fresh = Tiny(1)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    ck.load_checkpoint(ckpt, fresh, None, fresh_opt, torch.optim.lr_scheduler.StepLR(fresh_opt, 2), restore_rng=False)
    held = {k for k, p in fresh.named_parameters() if p in fresh_opt.state}
    assert held == {"a.weight", "a.bias"}


def test_whole_tensors_and_read_tensors_read_either_format_in_one_process(tmp_path):
    ckpt, (model, _opt, sched, teacher) = save(tmp_path / "sharded")
    whole = ck.read_tensors(ckpt, "model")
    assert whole.keys() == {"a.weight", "a.bias", "b.weight", "b.bias", "count"}
    assert all(torch.equal(whole[k], model.state_dict()[k]) for k in whole)
    assert whole["count"].dtype == torch.int64
    ema = ck.read_tensors(ckpt, "teacher")
    assert all(torch.equal(ema[k], teacher.shadow[k]) for k in teacher.shadow)
    full = ck.save_checkpoint(tmp_path / "full", 3, model, teacher, _opt, sched, 7)
    assert all(torch.equal(ck.read_tensors(full, "model")[k], whole[k]) for k in whole)
    assert all(torch.equal(ck.read_tensors(full, "teacher")[k], ema[k]) for k in ema)
    with pytest.raises(ValueError, match=r"part='optimizer' must be model or teacher"):
        ck.read_tensors(ckpt, "optimizer")
    into = {"a.weight": torch.zeros(3, 4, dtype=torch.bfloat16)}  # read straight into another dtype
    sc.load_into(ckpt, "model", into)
    assert into["a.weight"].dtype == torch.bfloat16 and torch.equal(into["a.weight"], whole["a.weight"].bfloat16())


def test_init_from_a_sharded_checkpoint_takes_its_ema_or_its_weights(tmp_path):
    ckpt, (model, _opt, _sched, teacher) = save(tmp_path)
    target = Tiny(9)
    assert ck.load_initial_weights(str(ckpt), target, use_ema=True) == ckpt
    assert torch.equal(target.a.weight, teacher.shadow["a.weight"]) and torch.equal(target.count, model.count)
    target = Tiny(9)
    ck.load_initial_weights(str(ckpt), target, use_ema=False)
    assert torch.equal(target.a.weight, model.a.weight) and not torch.equal(target.a.weight, teacher.shadow["a.weight"])


def test_a_background_save_is_committed_only_when_completed(tmp_path):
    pending, (model, *_rest) = save(tmp_path, background=True)
    assert isinstance(pending, ck.PendingCheckpoint) and pending.final.name == "step_0000003"
    assert not pending.final.exists() and pending.tmp.name.startswith(".tmp_step_0000003_")
    assert ck.latest_valid(tmp_path / "ckpts") is None  # nothing committed yet: a crash here loses nothing older
    done = pending.complete()
    assert done == pending.final and ck.latest_valid(tmp_path / "ckpts") == done and not pending.tmp.exists()
    state = json.loads((done / "state.json").read_text())
    assert state["format"] == "dcp" and "dcp/__0_0.distcp" in state["files"]
    assert all(torch.equal(ck.read_tensors(done)[k], model.state_dict()[k]) for k in ("a.weight", "count"))


def test_a_failed_background_write_is_one_error_and_removes_its_folder(tmp_path):
    pending, _ = save(tmp_path, background=True)
    pending.complete()

    class Failed:
        def result(self):
            raise OSError("No space left on device")

    tmp = tmp_path / "ckpts" / ".tmp_step_0000005_1"
    tmp.mkdir()
    broken = ck.PendingCheckpoint(tmp_path / "ckpts" / "step_0000005", tmp, Failed(), {"step": 5}, True)
    with pytest.raises(
        ck.CheckpointError,
        match=r"step_0000005 in the background failed \(OSError: No space left on "
        r"device\); earlier checkpoints are intact: free space or set trainer.async_checkpoint=false",
    ):
        broken.complete()
    assert not tmp.exists() and ck.latest_valid(tmp_path / "ckpts").name == "step_0000003"
