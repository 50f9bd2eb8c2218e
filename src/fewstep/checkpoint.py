"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step_0000100/`` holding the student's
trainable weights and buffers (``model.safetensors``), the teacher's shadow
(``teacher.safetensors`` + counters in ``state.json``), optimizer and LR
scheduler (``optim.pt``), every RNG state (``rng.pt``), the step and the data
position (``state.json``). It is written to a temporary folder and renamed
into place, so a crash at any moment leaves the previous checkpoints intact;
``state.json`` is written last and names every file with its size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
PREFIX = "step_"


class CheckpointError(RuntimeError):
    pass


def student_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: what training changes (frozen base weights come from the model config)."""
    state = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
    state.update({k: b.detach() for k, b in module.named_buffers()})
    return {k: v.contiguous().cpu() for k, v in state.items()}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    student,
    teacher,
    optimizer,
    scheduler,
    data_position: int,
    extra: dict | None = None,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write a checkpoint atomically. ``rng_states`` holds one RNG state per process (rank order);
    by default this process's state alone."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".tmp_{PREFIX}{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(student_state(student), str(tmp / "model.safetensors"))
        tstate = teacher.state_dict()
        for key in [k for k, v in tstate.items() if isinstance(v, dict) or v is None]:
            tensors = tstate.pop(key)
            if tensors is not None:  # the teacher's weight averages: teacher.safetensors, teacher_<key>.safetensors
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / _teacher_file(key)))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        torch.save({"ranks": rng_states or [rng_state()]}, tmp / "rng.pt")
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "data_position": data_position,
            "teacher": tstate,
            "files": files,
            **(extra or {}),
        }
        with (tmp / "state.json").open("w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _teacher_file(key: str) -> str:
    return "teacher.safetensors" if key == "shadow" else f"teacher_{key}.safetensors"


def verify(ckpt: Path) -> dict:
    """Read ``state.json`` and check every listed file is present with its size; raise CheckpointError."""
    ckpt = Path(ckpt)
    state_path = ckpt / "state.json"
    if not state_path.exists():
        raise CheckpointError(
            f"checkpoint {ckpt} is incomplete (no state.json); pick another or set trainer.resume=none"
        )
    try:
        state = json.loads(state_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"checkpoint {ckpt} has a corrupt state.json ({err}); set trainer.resume=none") from err
    for name, size in state.get("files", {}).items():
        p = ckpt / name
        if not p.exists() or p.stat().st_size != size:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} is missing or truncated")
    return state


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def latest_valid(ckpt_root: Path, warn=print) -> Path | None:
    """Newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as err:
            warn(f"skipping {err}")
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``auto`` = newest valid checkpoint of this run dir (none = fresh start); ``none``; or a path to a
    checkpoint folder or a run dir."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return latest_valid(Path(run_dir) / "checkpoints")
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(f"trainer.resume={resume}: no such path; give a checkpoint or run dir, or 'auto'/'none'")
    if (p / "state.json").exists():
        verify(p)
        return p
    for root in (p / "checkpoints", p):
        found = latest_valid(root)
        if found is not None:
            return found
    raise CheckpointError(f"trainer.resume={resume}: no valid checkpoint found there")


def load_checkpoint(
    ckpt: Path, student, teacher=None, optimizer=None, scheduler=None, restore_rng=True, rank: int = 0
) -> dict:
    state = verify(ckpt)
    ckpt = Path(ckpt)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
        missing = set(student_state(student)) - set(weights)
        if missing:
            raise CheckpointError(
                f"checkpoint {ckpt} does not match the model ({len(missing)} tensors missing, "
                f"e.g. {sorted(missing)[0]}); resume with the run's own model config"
            )
        student.load_state_dict(weights, strict=False)
        if teacher is not None:
            tstate = dict(state["teacher"])
            for p in ckpt.glob("teacher*.safetensors"):
                key = "shadow" if p.name == "teacher.safetensors" else p.name[len("teacher_") : -len(".safetensors")]
                tstate[key] = load_file(str(p))
            teacher.load_state_dict(tstate)
        if optimizer is not None:
            opt = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(opt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(opt["scheduler"])
        if restore_rng:
            ranks = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)["ranks"]
            set_rng_state(ranks[rank % len(ranks)])
    except CheckpointError:
        raise
    except Exception as err:  # safetensors / pickle errors on a damaged file
        raise CheckpointError(f"checkpoint {ckpt} could not be read ({type(err).__name__}: {err})") from err
    return state


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` valid checkpoints; never delete the only valid one."""
    ckpts = list_checkpoints(ckpt_root)
    valid = []
    for c in ckpts:
        try:
            verify(c)
            valid.append(c)
        except CheckpointError:
            pass
    keep = set(valid[-max(keep_last, 1) :])
    for c in ckpts:
        if c not in keep and (c in valid or (valid and c.name < valid[-1].name)):
            shutil.rmtree(c, ignore_errors=True)
