"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step_0000100/`` holding the student's
trainable weights and buffers (``model.safetensors``), the teacher's shadow
(``teacher.safetensors`` + counters in ``state.json``), optimizer and LR
scheduler (``optim.pt``), every RNG state (``rng.pt``), the step and the data
position (``state.json``). It is written to a temporary folder and renamed
into place, so a crash at any moment leaves the previous checkpoints intact;
``state.json`` is written last and names every file with its size. Rewriting an existing step moves the
old folder aside (``.old_*``) before the new one is renamed in; the next save or prune deletes the
``.tmp_*`` / ``.old_*`` leftovers of a killed process (an ``.old_*`` whose step folder is gone is put back).
Under FSDP the sharded tensors are gathered on the way: the files are the same as an unsharded run's. Resuming
under FSDP, each rank reads only its shards' rows of the weight files (``safe_open``) and of the optimizer state
(``torch.load(..., mmap=True)``), not the whole tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fewstep.errors import FewstepError
from fewstep.models.family import builds_empty
from fewstep.training import sharded_checkpoint
from fewstep.training.distributed import (
    full_optimizer_state,
    gathered,
    is_shard,
    is_sharded,
    load_full_state_dict,
    load_optimizer_state,
)

FORMAT_VERSION = 1
PREFIX = "step_"


class CheckpointError(FewstepError, RuntimeError):
    pass


def state_keys(module: torch.nn.Module) -> list[str]:
    """The keys of :func:`student_state` (no tensor is read or gathered)."""
    return [k for k, p in module.named_parameters() if p.requires_grad] + [k for k, _ in module.named_buffers()]


def student_state(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: what training changes (frozen base weights come from the model config).
    Whole CPU tensors: shards are gathered (a collective under FSDP; ``keep=False`` joins it and keeps nothing)."""
    state = {k: p for k, p in module.named_parameters() if p.requires_grad}
    state.update(dict(module.named_buffers()))
    return gathered(state, keep)


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


class _Folder:
    """The temporary folder a checkpoint is written into, or nothing on the ranks that do not write. After a failed
    write it stops writing but the caller goes on gathering (under FSDP the other ranks are in the same collectives);
    :meth:`raise_error` reports the failure at the end."""

    def __init__(self, path: Path | None):
        self.path, self.error = path, None

    @property
    def writing(self) -> bool:
        return self.path is not None and self.error is None

    def put(self, name: str, tensors: dict | None = None, obj=None) -> None:
        if not self.writing:
            return
        try:
            if tensors is not None:
                save_file(tensors, str(self.path / name))
            else:
                torch.save(obj, self.path / name)
        except Exception as err:  # noqa: BLE001 - a full disk surfaces as OSError, SafetensorError or RuntimeError
            self.error = err
            shutil.rmtree(self.path, ignore_errors=True)


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
    networks: dict | None = None,
    write: bool = True,
    sharded: bool = False,
    background: bool = False,
) -> Path | PendingCheckpoint:
    """Write a checkpoint atomically. ``rng_states`` holds one RNG state per process (rank order);
    by default this process's state alone. ``networks``: name → ``(module, optimizer, scheduler, average)``
    of an objective's own networks (``network_<name>.safetensors``, ``network_<name>_ema.safetensors``,
    their optimizer state in ``optim.pt``); none for single-network objectives (the files are then as before).

    Every process calls it; ``write`` is true on the one that writes (rank 0). Sharded weights, EMA and optimizer
    state (FSDP) are gathered to whole tensors on the way (collectives, in the same order on every rank), so the
    files are those of an unsharded run; without shards the other ranks copy nothing. ``sharded``: every rank
    writes its own shards instead (:mod:`fewstep.training.sharded_checkpoint`), into rank 0's temporary folder;
    with ``background`` too, the shards are copied (staged) and written while training goes on: the checkpoint is
    committed by :meth:`PendingCheckpoint.complete`, which every rank calls before the next save."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".tmp_{PREFIX}{step:07d}_{os.getpid()}"
    folder = _Folder(tmp if write else None)
    try:
        if write:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            clean_stale(ckpt_root)  # a killed writer's leftovers; frees their space before this write
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        writing = None
        if sharded:
            tmp = _shared_path(tmp)  # rank 0's folder, once it exists
            optim, net_states, tstate, writing = _put_sharded(
                tmp, student, teacher, optimizer, scheduler, networks, background
            )
        else:
            optim, net_states, tstate = _put_full(folder, student, teacher, optimizer, scheduler, networks, write)
        folder.put("optim.pt", obj=optim)
        folder.put("rng.pt", obj={"ranks": rng_states or [rng_state()]})
        if write and folder.error is not None:
            raise folder.error
        state = {
            "format_version": FORMAT_VERSION,
            **({"format": sharded_checkpoint.FORMAT} if sharded else {}),
            "step": step,
            "data_position": data_position,
            "teacher": tstate,
            **({"networks": net_states} if net_states else {}),
            **(extra or {}),
        }
        if writing is not None:
            return PendingCheckpoint(final, tmp, writing, state, write)
        if not write:
            return final
        _write_state_and_commit(tmp, final, state)
    except BaseException as err:
        if not write:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):  # a full disk surfaces as OSError, SafetensorError or torch's RuntimeError
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"writing checkpoint {final} failed ({type(err).__name__}: {detail}); earlier checkpoints are "
                "intact: if the disk is full, free space (or lower trainer.keep_last), then restart with "
                "trainer.resume=auto"
            ) from err
        raise
    return final


def _put_full(folder: _Folder, student, teacher, optimizer, scheduler, networks, write: bool):
    """The tensors as whole ones (shards gathered on the way): ``model.safetensors``, ``teacher*.safetensors``, the
    objective's networks; returns ``(optim.pt's content, the networks' EMA counters, the teacher's counters)``."""
    folder.put("model.safetensors", student_state(student, keep=write))
    tstate = teacher.state_dict()
    for key in [k for k, v in tstate.items() if isinstance(v, dict) or v is None]:
        tensors = tstate.pop(key)
        if tensors is not None:  # the teacher's weight averages: teacher.safetensors, teacher_<key>.safetensors
            folder.put(teacher_file(key), gathered(tensors, keep=write))
    optim = {"optimizer": full_optimizer_state(optimizer, keep=write), "scheduler": scheduler.state_dict()}
    net_states = {}
    for name, (module, net_opt, net_sched, average) in (networks or {}).items():
        folder.put(f"network_{name}.safetensors", student_state(module, keep=write))
        net_optim = {"optimizer": full_optimizer_state(net_opt, keep=write), "scheduler": net_sched.state_dict()}
        optim.setdefault("networks", {})[name] = net_optim
        if average is not None:
            avg = average.state_dict()
            for key in [k for k, v in avg.items() if isinstance(v, dict) or v is None]:
                tensors = avg.pop(key)
                if tensors is not None:  # network_<name>_ema.safetensors, network_<name>_ema_<key>.safetensors
                    folder.put(network_ema_file(name, key), gathered(tensors, keep=write))
            net_states[name] = {k: v for k, v in avg.items() if not isinstance(v, dict)}
    return optim, net_states, tstate


def _write_state_and_commit(tmp: Path, final: Path, state: dict) -> None:
    """``state.json`` (every file of ``tmp`` with its size), fsynced, then the rename that commits the checkpoint."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    with (tmp / "state.json").open("w") as fh:
        json.dump({**state, "files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _commit(tmp, final)


class PendingCheckpoint:
    """A sharded checkpoint whose shards are being written in the background (``trainer.async_checkpoint``).
    :meth:`complete` (every rank) waits for this rank's writes, then rank 0 writes ``state.json`` and commits; until
    then the folder is a ``.tmp_*`` one, so a kill leaves the previous checkpoint as the newest valid one."""

    def __init__(self, final: Path, tmp: Path, writing, state: dict, write: bool):
        self.final, self.tmp, self.writing, self.state, self.write = final, tmp, writing, state, write

    def complete(self) -> Path:
        try:
            self.writing.result()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank's shards are on disk
            if self.write:
                _write_state_and_commit(self.tmp, self.final, self.state)
        except Exception as err:
            if self.write:
                shutil.rmtree(self.tmp, ignore_errors=True)
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"writing checkpoint {self.final} in the background failed ({type(err).__name__}: {detail}); earlier "
                "checkpoints are intact: free space or set trainer.async_checkpoint=false, then restart with "
                "trainer.resume=auto"
            ) from err
        return self.final


def _put_sharded(tmp: Path, student, teacher, optimizer, scheduler, networks, background: bool = False):
    """Every rank's shards into ``tmp/dcp`` (:mod:`fewstep.training.sharded_checkpoint`); the same returns as
    :func:`_put_full`, with no tensor in ``optim.pt``, and the background write (None when written already)."""
    state = sharded_checkpoint.tensor_state(student, teacher, optimizer, networks)
    writing = sharded_checkpoint.save(tmp, state, background=background)
    tstate = {k: v for k, v in teacher.state_dict().items() if not isinstance(v, dict) and v is not None}
    optim = {"scheduler": scheduler.state_dict()}
    net_states = {}
    for name, (_module, _opt, net_sched, average) in (networks or {}).items():
        optim.setdefault("networks", {})[name] = {"scheduler": net_sched.state_dict()}
        if average is not None:
            net_states[name] = {k: v for k, v in average.state_dict().items() if not isinstance(v, dict)}
    return optim, net_states, tstate, writing


def _shared_path(path: Path) -> Path:
    """Rank 0's ``path`` on every rank (a broadcast; after rank 0 made it, so the others may write into it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return path
    shared = [str(path)]
    torch.distributed.broadcast_object_list(shared, src=0)
    return Path(shared[0])


def _commit(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".old_{final.name}_{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint folder: renamed out of the ``step_*`` namespace first (atomic), so a kill during
    the deletion leaves a stale ``.tmp_*`` folder for ``clean_stale``, never a half-deleted ``step_*``."""
    doomed = ckpt.with_name(f".tmp_del_{ckpt.name}_{os.getpid()}")
    try:
        os.replace(ckpt, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _writer_gone(leftover: Path) -> bool:
    """A ``.tmp_*`` / ``.old_*`` folder is stale when its writer (pid suffix) is this process, between
    writes, or no longer runs; a live other process's folder is left alone."""
    try:
        pid = int(leftover.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def clean_stale(ckpt_root: Path) -> None:
    """Delete the leftovers of a killed writer. An ``.old_*`` (a committed checkpoint moved aside while its
    step was rewritten) is renamed back when its step folder is missing."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):  # .old_* sorts before .tmp_*: restored before its rewrite is dropped
        if not (p.is_dir() and p.name.startswith((".tmp_", ".old_")) and _writer_gone(p)):
            continue
        if p.name.startswith(".old_"):
            final = root / p.name[len(".old_") :].rsplit("_", 1)[0]
            if not final.exists():
                try:
                    verify(p)
                    os.replace(p, final)
                    continue
                except (CheckpointError, OSError):
                    pass
        shutil.rmtree(p, ignore_errors=True)


def network_ema_file(name: str, key: str) -> str:
    """The file of the entry ``key`` (a weight average or its low bits) of the objective network ``name``'s EMA."""
    return f"network_{name}_ema.safetensors" if key == "shadow" else f"network_{name}_ema_{key}.safetensors"


def teacher_file(key: str) -> str:
    """The file of the teacher state entry ``key`` (a weight average) inside a checkpoint folder."""
    return "teacher.safetensors" if key == "shadow" else f"teacher_{key}.safetensors"


def verify(ckpt: Path) -> dict:
    """Read ``state.json`` and check every listed file is present with its size and a readable header
    (safetensors header, zip directory of a ``.pt``); raise CheckpointError. Tensor bytes are not checksummed."""
    ckpt = Path(ckpt)
    state_path = ckpt / "state.json"
    if not state_path.exists():
        raise CheckpointError(
            f"checkpoint {ckpt} is incomplete (no state.json); pick another or set trainer.resume=none"
        )
    try:
        state = json.loads(state_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"checkpoint {ckpt} has a corrupt state.json ({err}); {_FIX}") from err
    if not (isinstance(state, dict) and isinstance(state.get("files"), dict) and isinstance(state.get("step"), int)):
        raise CheckpointError(f"checkpoint {ckpt} has an incomplete state.json (no step or file list); {_FIX}")
    for name, size in state["files"].items():
        p = ckpt / name
        if not p.exists() or p.stat().st_size != size:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} is missing or truncated; {_FIX}")
        try:
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(p), framework="pt"):
                    pass
            elif name.endswith(".pt"):
                with zipfile.ZipFile(p) as zf:
                    zf.infolist()
        except Exception as err:  # noqa: BLE001 - safetensors / zipfile raise several types on damaged files
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: {name} is unreadable ({type(err).__name__}); {_FIX}"
            ) from None
    return state


_FIX = "resume from an earlier checkpoint (trainer.resume=auto skips corrupt ones) or set trainer.resume=none"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """The ``step_*`` folders, oldest first; an ``.old_step_*`` whose ``step_*`` is gone (a rewrite of that step
    was killed between its two renames) stands in for it until :func:`clean_stale` renames it back."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = {}
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.startswith(PREFIX):
            found[p.name] = p
        elif p.is_dir() and p.name.startswith(f".old_{PREFIX}"):
            found.setdefault(p.name[len(".old_") :].rsplit("_", 1)[0], p)
    return [found[k] for k in sorted(found)]


def latest_valid(ckpt_root: Path, warn=print) -> Path | None:
    """Newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as err:
            warn(f"skipping {err}")
    return None


def resolve_resume(resume: str, run_dir: Path, key: str = "trainer.resume", warn=print) -> Path | None:
    """``auto`` = newest valid checkpoint of this run dir (none = fresh start); ``none``; or a path to a
    checkpoint folder or a run dir. ``key`` is the setting the errors name; ``warn`` reports skipped corrupt ones."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return latest_valid(Path(run_dir) / "checkpoints", warn=warn)
    p = Path(resume)
    if not p.exists():
        also = ", or 'auto'/'none'" if key == "trainer.resume" else ""
        raise CheckpointError(f"{key}={resume}: no such path; give a checkpoint or run dir{also}")
    if (p / "state.json").exists():
        verify(p)
        return p
    for root in (p / "checkpoints", p):
        found = latest_valid(root, warn=warn)
        if found is not None:
            return found
    raise CheckpointError(f"{key}={resume}: no valid checkpoint found there")


class _Stored:
    """One tensor of an open safetensors file, read when indexed as a tensor is: ``stored[rows, cols]`` reads only
    that part from disk, ``stored[()]`` all of it (see :func:`fewstep.training.distributed.local_part`)."""

    def __init__(self, file, key: str):
        self.file, self.key = file, key

    def __getitem__(self, index):
        return self.file.get_tensor(self.key) if index == () else self.file.get_slice(self.key)[index]


@contextlib.contextmanager
def _tensors(path: Path, sharded: bool):
    """The tensors of a safetensors file by key: read whole; for a ``sharded`` (FSDP) target as :class:`_Stored`
    ones, so that each rank reads only its slices while the file is open."""
    if not sharded:
        yield load_file(str(path))
        return
    with safe_open(str(path), framework="pt") as file:
        yield {key: _Stored(file, key) for key in file.keys()}


def _load_module(path: Path, module, ckpt: Path, what: str = "the model") -> None:
    with _tensors(path, is_sharded(module)) as weights:
        missing = set(state_keys(module)) - set(weights)
        if missing:
            raise CheckpointError(
                f"checkpoint {ckpt} does not match {what} ({len(missing)} tensors missing, "
                f"e.g. {sorted(missing)[0]}); resume with the run's own model and objective config"
            )
        load_full_state_dict(module, weights)  # into this rank's shards under FSDP (reading only those)


def _load_optim(ckpt: Path, optimizer) -> dict:
    """``optim.pt``; memory-mapped for sharded parameters, whose states then read only this rank's slices."""
    sharded = any(is_shard(p) for group in optimizer.param_groups for p in group["params"])
    return torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True, mmap=sharded)


def load_checkpoint(
    ckpt: Path, student, teacher=None, optimizer=None, scheduler=None, restore_rng=True, rank: int = 0,
    networks: dict | None = None,
) -> dict:  # fmt: skip
    """Restore what :func:`save_checkpoint` wrote (``networks`` as there); returns ``state.json``. Into an unsharded
    or a sharded (FSDP, any process count) run alike: under FSDP each rank reads only its slices of the weights, the
    EMA and the optimizer state."""
    state = verify(ckpt)
    ckpt = Path(ckpt)
    try:
        if sharded_checkpoint.is_sharded_checkpoint(state):
            _load_sharded(ckpt, state, student, teacher, optimizer, scheduler, networks)
        else:
            _load_full(ckpt, state, student, teacher, optimizer, scheduler, networks)
        if restore_rng:
            ranks = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)["ranks"]
            set_rng_state(ranks[rank % len(ranks)])
    except CheckpointError:
        raise
    except Exception as err:  # safetensors / pickle / DCP errors on a damaged file
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"checkpoint {ckpt} could not be read ({type(err).__name__}: {detail}); {_FIX}") from err
    return state


def _load_sharded(ckpt: Path, state: dict, student, teacher, optimizer, scheduler, networks) -> None:
    """A sharded (DCP) checkpoint into this run, resharded to its layout; then the schedulers and counters."""
    sharded_checkpoint.load(ckpt, student, teacher, optimizer, networks)
    opt = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True)
    if teacher is not None:
        tensors = {k: v for k, v in teacher.state_dict().items() if isinstance(v, dict)}  # filled in place
        teacher.load_state_dict({**state["teacher"], **tensors})
    for name, (_module, net_opt, net_sched, average) in (networks or {}).items():
        if average is not None:
            tensors = {k: v for k, v in average.state_dict().items() if isinstance(v, dict)}
            average.load_state_dict({**state.get("networks", {}).get(name, {}), **tensors})
        if net_opt is not None:
            net_sched.load_state_dict(opt["networks"][name]["scheduler"])
    if optimizer is not None and scheduler is not None:
        scheduler.load_state_dict(opt["scheduler"])


def _load_full(ckpt: Path, state: dict, student, teacher, optimizer, scheduler, networks) -> None:
    """A full-state checkpoint into this run (each rank reading only its slices under FSDP)."""
    _load_module(ckpt / "model.safetensors", student, ckpt)
    opt = None
    for name, (module, net_opt, net_sched, average) in (networks or {}).items():
        path = ckpt / f"network_{name}.safetensors"
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {ckpt} has no network {name!r}: it was written by another objective; resume "
                "with the run's own objective or set trainer.resume=none"
            )
        _load_module(path, module, ckpt, what=f"the objective's network {name!r}")
        if average is not None:
            keys = [k for k, v in average.state_dict().items() if isinstance(v, dict) or v is None]
            with contextlib.ExitStack() as files:
                paths = {key: ckpt / network_ema_file(name, key) for key in keys}
                tensors = {key: files.enter_context(_tensors(path, is_sharded(module))) if path.exists() else None
                           for key, path in paths.items()}  # fmt: skip
                average.load_state_dict({**state["networks"][name], **tensors})
        if net_opt is not None:
            opt = opt or _load_optim(ckpt, net_opt)
            load_optimizer_state(net_opt, opt["networks"][name]["optimizer"])
            net_sched.load_state_dict(opt["networks"][name]["scheduler"])
    if teacher is not None:
        tstate = dict(state["teacher"])
        with contextlib.ExitStack() as files:
            for p in ckpt.glob("teacher*.safetensors"):
                key = "shadow" if p.name == "teacher.safetensors" else p.stem[len("teacher_") :]
                tstate[key] = files.enter_context(_tensors(p, is_sharded(student)))
            teacher.load_state_dict(tstate)
    if optimizer is not None:
        opt = _load_optim(ckpt, optimizer)
        load_optimizer_state(optimizer, opt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(opt["scheduler"])


def read_tensors(ckpt: Path, part: str = "model") -> dict[str, torch.Tensor]:
    """Whole tensors of a checkpoint of either format, in this process alone: ``part`` ``model`` (the trainable
    weights and buffers) or ``teacher`` (the teacher's EMA)."""
    ckpt = Path(ckpt)
    if part not in ("model", "teacher"):
        raise ValueError(f"part={part!r} must be model or teacher")
    if sharded_checkpoint.is_sharded_checkpoint(verify(ckpt)):
        return sharded_checkpoint.whole_tensors(ckpt, "model" if part == "model" else "teacher.shadow")
    return load_file(str(ckpt / ("model.safetensors" if part == "model" else teacher_file("shadow"))))


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` valid checkpoints; never delete the only valid one. Also deletes a killed
    writer's ``.tmp_*`` leftovers (see :func:`clean_stale`)."""
    clean_stale(ckpt_root)
    ckpts = list_checkpoints(ckpt_root)
    valid = []
    for c in ckpts:
        try:
            verify(c)
            valid.append(c)
        except CheckpointError:
            pass
    keep = set(valid[-max(keep_last, 1) :])
    newest = ckpts.index(valid[-1]) if valid else -1
    for i, c in enumerate(ckpts):  # invalid ones newer than the newest valid one are left for inspection
        if c not in keep and (c in valid or i < newest):
            _remove(c)


def load_initial_weights(source: str | Path, student, use_ema: bool = True) -> Path:
    """``trainer.init_from``: start ``student`` from a finished run's weights (a run dir: its newest valid
    checkpoint; or a checkpoint folder). Loads ``model.safetensors`` and, with ``use_ema``, overlays the run's
    EMA teacher weights (``teacher.safetensors``, what the run sampled with). Every tensor in the file must
    exist in ``student`` with its shape; tensors only the student has (e.g. the zero-initialised time-pair
    embeddings of an SD3 model on top of a flow-matching run) keep their initial values; a model with an
    ``adapt_initial_weights(weights)`` method maps the file's tensors to its layout first (``TinyMLP``: a
    flow-matching run into a TwinFlow model). Under ``trainer.distributed=fsdp`` only rank 0 reads the files (the
    other ranks built the student on ``meta``; sharding fills them from rank 0). Returns the checkpoint."""
    ckpt = resolve_resume(str(source), Path(source), key="trainer.init_from")
    if ckpt is None:
        raise CheckpointError(f"trainer.init_from={source}: no valid checkpoint there; give a finished run dir")
    if builds_empty():  # a rank other than 0 of a sharded run: rank 0's weights reach its shards
        return ckpt
    if sharded_checkpoint.is_sharded_checkpoint(verify(ckpt)):
        weights = sharded_checkpoint.whole_tensors(ckpt, "model")
        if use_ema:
            weights.update(sharded_checkpoint.whole_tensors(ckpt, "teacher.shadow"))
    else:
        weights = load_file(str(ckpt / "model.safetensors"))
        ema = ckpt / "teacher.safetensors"
        if use_ema and ema.exists():
            weights.update(load_file(str(ema)))
    adapt = getattr(student, "adapt_initial_weights", None)  # e.g. a vanilla run into a time-pair model
    if adapt is not None:
        weights = adapt(weights)
    own = student.state_dict()
    foreign = [k for k in weights if k not in own or own[k].shape != weights[k].shape]
    if foreign:
        raise CheckpointError(
            f"trainer.init_from={source}: {len(foreign)} tensors do not fit this model (e.g. {foreign[0]}); "
            "use the same model config as that run"
        )
    student.load_state_dict(weights, strict=False)
    return ckpt
