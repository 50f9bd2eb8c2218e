"""Sharded checkpoints on torch's own engine (``torch.distributed.checkpoint``, DCP): what an FSDP run writes.

A full-state checkpoint gathers every sharded tensor on rank 0, which writes them alone: for a full Qwen-Image
fine-tune that is 81.8 GB of fp32 weights and 163.5 GB of AdamW moments through one process's host memory while
the other ranks wait. A sharded checkpoint has each rank write its own shards, in parallel, with no gather:

    checkpoints/step_0000100/
        dcp/.metadata            the tensors' names, shapes, dtypes and where each chunk lies (rank 0)
        dcp/__<rank>_0.distcp    each rank's shards of the weights, EMA and optimizer moments
        optim.pt                 LR schedulers (no tensors of the size of the model)
        rng.pt, state.json       as in a full-state checkpoint; state.json says ``"format": "dcp"``

The folder is written and committed as a full-state one is (a temporary folder, ``state.json`` last, a rename:
complete or absent), so everything :mod:`fewstep.training.checkpoint` promises holds: ``verify`` checks every file
by size, ``trainer.keep_last`` prunes, ``trainer.resume=auto`` skips a corrupt one. DCP loads into the tensors of
the loading run as they are laid out there: another process count reshards on load; a single process (export,
sampling, evaluation) reads the whole tensors straight into its model, in the model's dtype, one tensor at a time.

The state is keyed by name (a parameter's fully qualified name, the optimizer's state by parameter name too, via
``torch.distributed.checkpoint.state_dict``), never by position, so a model built in another order still loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

DCP_DIR = "dcp"
FORMAT = "dcp"


def _inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper (``AcceleratedOptimizer.optimizer``)."""
    return getattr(optimizer, "optimizer", optimizer)


def _module_state(module: torch.nn.Module) -> dict:
    """What training changes in ``module``: trainable parameters and buffers, the live tensors (shards under FSDP)."""
    state = {k: p for k, p in module.named_parameters() if p.requires_grad}
    state.update(dict(module.named_buffers()))
    return state


def _averages(holder) -> tuple[dict, dict]:
    """``(tensors, counters)`` of a teacher's or an EMA's ``state_dict()``: the weight averages (dicts of tensors,
    the live shadow tensors) and the rest (step counters, for state.json)."""
    state = holder.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, dict)}
    counters = {k: v for k, v in state.items() if not isinstance(v, dict) and v is not None}
    return tensors, counters


def _optimizer_state(module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, _inner(optimizer))


def tensor_state(student, teacher=None, optimizer=None, networks: dict | None = None) -> dict:
    """The tensors of a checkpoint as DCP saves them and loads into them: the live tensors of the run (an optimizer
    that has not stepped yet gets its state initialised first, so that a load has tensors to fill)."""
    state: dict = {"model": _module_state(student)}
    if teacher is not None:
        state["teacher"] = _averages(teacher)[0]
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(student, optimizer)
    for name, (module, net_opt, _sched, average) in (networks or {}).items():
        state[f"network_{name}"] = _module_state(module)
        if average is not None:
            state[f"network_{name}_ema"] = _averages(average)[0]
        if net_opt is not None:
            state[f"network_{name}_optimizer"] = _optimizer_state(module, net_opt)
    return state


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


_BACKGROUND_GROUP: list = []  # the gloo group background writes coordinate over (never the training's NCCL group)


def save(folder: Path, state: dict, background: bool = False):
    """Every rank writes its shards of ``state`` into ``folder/dcp`` (a collective; rank 0 adds the metadata).
    ``background``: the shards are copied to host memory now (this rank's share) and written by a thread while
    training goes on; returns the future of that write (else None)."""
    import torch.distributed.checkpoint as dcp

    checkpoint_id = str(Path(folder) / DCP_DIR)
    if not background:
        with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=checkpoint_id, no_dist=not _distributed())
        return None
    if _distributed() and not _BACKGROUND_GROUP:
        _BACKGROUND_GROUP.append(torch.distributed.new_group(backend="gloo"))  # every rank, at its first save
    group = _BACKGROUND_GROUP[0] if _BACKGROUND_GROUP else None
    return dcp.async_save(state, checkpoint_id=checkpoint_id, process_group=group, no_dist=not _distributed())


def load(ckpt: Path, student, teacher=None, optimizer=None, networks: dict | None = None) -> None:
    """Fill the run's tensors from a sharded checkpoint, resharded to this run's layout. Teachers and EMAs are
    filled in place (their live shadow tensors); optimizer states are set by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    partial = StateDictOptions(strict=False)  # parameters without a saved state (never had a gradient) keep none

    state = tensor_state(student, teacher, optimizer, networks)
    for key in [k for k in state if k == "optimizer" or k.endswith("_optimizer")]:
        state[key] = _only_stored(state[key], stored(ckpt, f"{key}.state"))
    with warnings.catch_warnings():  # one process (export, sampling): "assuming ... a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(ckpt) / DCP_DIR), no_dist=not _distributed())
    if optimizer is not None:
        set_optimizer_state_dict(student, _inner(optimizer), state["optimizer"], options=partial)
    for name, (module, net_opt, _sched, _average) in (networks or {}).items():
        if net_opt is not None:
            set_optimizer_state_dict(module, _inner(net_opt), state[f"network_{name}_optimizer"], options=partial)


def _only_stored(optimizer_state: dict, names: dict) -> dict:
    """The optimizer state to load: only the parameters the checkpoint has a state for. A parameter that never had a
    gradient (Qwen-Image's last text stream) has none there; the state the loader initialised for it is dropped, as
    the saving run never had one."""
    kept = {}
    for fqn, entry in optimizer_state["state"].items():
        entry = {k: v for k, v in entry.items() if f"{fqn}.{k}" in names}
        if entry:
            kept[fqn] = entry
    return {**optimizer_state, "state": kept}


def is_sharded_checkpoint(state: dict) -> bool:
    """Whether a checkpoint's ``state.json`` is a sharded (DCP) one."""
    return state.get("format") == FORMAT


def stored(ckpt: Path, prefix: str) -> dict:
    """Name → (shape, dtype) of the tensors under ``prefix`` (``model``, ``teacher.shadow``, ``network_<name>``,
    ``optimizer.state``) of a sharded checkpoint, from its metadata alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    lead = prefix + "."
    meta = dcp.FileSystemReader(str(Path(ckpt) / DCP_DIR)).read_metadata().state_dict_metadata
    return {
        key[len(lead) :]: (tuple(m.size), m.properties.dtype)
        for key, m in meta.items()
        if key.startswith(lead) and isinstance(m, TensorStorageMetadata)
    }


def load_into(ckpt: Path, prefix: str, tensors: dict) -> None:
    """Read the stored tensors ``prefix.<name>`` into ``tensors[name]`` in this process alone (no collective), each
    converted to its destination's dtype as it is read: no second full-precision copy of a model is built."""
    import torch.distributed.checkpoint as dcp

    nested: dict = {}
    node = nested
    *parents, last = prefix.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = tensors
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(nested, checkpoint_id=str(Path(ckpt) / DCP_DIR), no_dist=True)


def whole_tensors(ckpt: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """The whole tensors under ``prefix`` of a sharded checkpoint (see :func:`stored`), read in this process alone,
    at the shapes and dtypes the metadata records."""
    out = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in stored(ckpt, prefix).items()}
    load_into(ckpt, prefix, out)
    return out
