"""How a run's trainable networks are spread over its processes (``trainer.distributed``).

The loop asks its :class:`Replicated` or :class:`Sharded` strategy to place the networks (``place``, before their
optimizers are built), to prepare networks and optimizers (``prepare``), for the gradient-sync context of the
accumulation micro-batches (``no_sync``) and to clip gradients; nothing else in the loop depends on the choice.
Checkpoints and the EMA teacher work on full tensors through :func:`gathered`, :func:`copy_full_` and
:func:`load_full_state_dict`, which leave unsharded tensors alone.

* ``ddp`` (:class:`Replicated`, the default): Accelerate's own wrapping: DDP replicas across processes (gloo on
  CPU), the plain module in one process.
* ``fsdp`` (:class:`Sharded`): torch FSDP2 ``fully_shard``, which runs the same on CPU (gloo) and GPU (NCCL):
  every parameter of the network is a ``DTensor`` sharded on dim 0 over the processes, so each holds 1/N of the
  weights, gradients and AdamW state; each transformer block (:func:`fewstep.models.family.shard_units`) is
  all-gathered for its own forward/backward and freed after, the rest with the root module. With
  ``trainer.mixed_precision=bf16`` the gathered weights are bf16 and gradients are reduced in fp32. The EMA shadow
  is a ``DTensor`` clone of the shards (the sharded EMA). Accelerate still launches the processes and owns the
  process group; the sharded module is not wrapped in DDP. Only rank 0 reads the pretrained weights: the networks
  are built inside :meth:`Sharded.building`, where the other ranks build them on the ``meta`` device
  (:func:`fewstep.models.family.builds_empty`), and :meth:`Sharded.place` gives each rank its shards of rank 0's
  weights (a broadcast).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from fewstep.models.family import building_empty, loading_onto

log = logging.getLogger("fewstep")


def _dtensor_class():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_shard(t) -> bool:
    """Whether ``t`` is a sharded ``DTensor`` (a parameter, gradient, EMA or optimizer state under FSDP)."""
    return torch.distributed.is_available() and isinstance(t, _dtensor_class())


def is_sharded(module: nn.Module) -> bool:
    return any(is_shard(p) for p in module.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a shard is all-gathered (a collective: every rank must call it, in the same order). gloo and
    NCCL gather no int16, so an int16 shard (the bf16 EMA's low bits, ``fewstep.teachers.base``) travels as the
    same 16 bits typed bfloat16."""
    if not is_shard(t):
        return t
    if t.dtype != torch.int16:
        return t.full_tensor()
    from torch.distributed.tensor import DTensor

    bits = DTensor.from_local(
        t.to_local().view(torch.bfloat16), t.device_mesh, t.placements, shape=t.shape, stride=t.stride()
    )
    return bits.full_tensor().view(torch.int16)


def local_index(like: torch.Tensor) -> tuple[slice, ...]:
    """The part of the whole tensor that the shard ``like`` holds on this rank: one slice per dimension (FSDP2's
    ``Shard(0)``: a contiguous row range, uneven or empty where the rows do not divide)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def local_part(whole, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` as a plain tensor of ``like``'s local shape, device and dtype (a copy, no
    communication) when ``like`` is a shard; else all of ``whole``. ``whole``: a tensor, or anything indexed like
    one that reads on indexing (a stored tensor of a checkpoint, ``whole[()]`` the whole of it): only this rank's
    rows are read then."""
    if not is_shard(like):
        return whole if torch.is_tensor(whole) else whole[()]
    part = whole[local_index(like)]
    return part.to(device=like.device, dtype=like.dtype, copy=torch.is_tensor(whole))  # no view of ``whole`` kept


def shard_like(whole, like: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``like``: this rank's slice as a DTensor (no communication) when ``like`` is a shard
    (``whole`` as in :func:`local_part`)."""
    if not is_shard(like):
        return local_part(whole, like)
    from torch.distributed.tensor import DTensor

    part = local_part(whole, like)
    return DTensor.from_local(part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


@torch.no_grad()
def copy_full_(dst: torch.Tensor, whole) -> None:
    """Copy a whole tensor (or a stored one, see :func:`local_part`) into ``dst`` (into its local shard when ``dst``
    is a shard: only that part is read). A shard laid out as ``dst`` (a sharded checkpoint's, loaded in place) copies
    shard to shard."""
    if whole is dst:
        return
    if is_shard(dst) and is_shard(whole) and whole.placements == dst.placements and whole.shape == dst.shape:
        dst.to_local().copy_(whole.to_local())
        return
    if is_shard(dst):
        dst.to_local().copy_(whole[local_index(dst)])
    else:
        dst.copy_(local_part(whole, dst))


def gathered(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole, contiguous CPU copies of ``tensors`` (shards all-gathered, in key order); ``keep=False`` (the ranks
    that do not write) joins the gathers and keeps nothing, so an unsharded run copies nothing there."""
    out = {}
    for key, value in tensors.items():
        value = full(value.detach())
        if keep:
            out[key] = value.contiguous().cpu()
    return out


def full_optimizer_state(optimizer, keep: bool = True) -> dict:
    """``optimizer.state_dict()`` with sharded state (AdamW moments) gathered to whole CPU tensors: the format of an
    unsharded run (states keyed by parameter index). Unsharded states are left as they are."""
    state = optimizer.state_dict()
    for index in sorted(state["state"]):
        entry = state["state"][index] = dict(state["state"][index])  # state_dict() shares the live entries
        for key in sorted(entry):
            if is_shard(entry[key]):
                value = full(entry[key])
                entry[key] = value.cpu() if keep else None
    return state if keep else {}


def _state_part(value, param: torch.Tensor):
    """An optimizer state entry for the sharded ``param``: a tensor of its shape becomes this rank's slice (only
    that part of a memory-mapped state is read), another tensor (AdamW's step) a copy; no view of ``value``."""
    if not torch.is_tensor(value):
        return value
    return shard_like(value, param) if is_shard(param) and value.shape == param.shape else value.clone()


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a whole-tensor optimizer state (:func:`full_optimizer_state`); over sharded parameters each state
    tensor of the parameter's shape becomes this rank's slice (``state`` may be memory-mapped: ``torch.load(...,
    mmap=True)``, then only the slices are read)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(is_shard(p) for p in params):
        state = {**state, "state": dict(state["state"])}
        for index, entry in state["state"].items():
            param = params[int(index)]
            state["state"][index] = {k: _state_part(v, param) for k, v in entry.items()}
    optimizer.load_state_dict(state)


def load_full_state_dict(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(weights, strict=False)`` for whole tensors, into shards when ``module`` is sharded
    (keys the module lacks are ignored, as there); there the values may be stored ones (see :func:`local_part`),
    of which only this rank's rows are read."""
    if not is_sharded(module):
        module.load_state_dict(weights, strict=False)
        return
    own = dict(module.named_parameters())
    own.update(module.named_buffers())
    for key, value in weights.items():
        if key in own:
            copy_full_(own[key], value)


def local_numel(module: nn.Module) -> int:
    """Parameter elements this process holds (its shards under FSDP)."""
    return sum((p.to_local() if is_shard(p) else p).numel() for p in module.parameters())


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


_LOCKSTEP: list = []  # the device of the collective flag while the networks are sharded (set by Sharded)


def lockstep() -> bool:
    """Whether every model call is a collective that all processes must make together (the networks are sharded:
    each forward all-gathers the weights). Objectives then decide to skip a call on a subset of rows together
    (:func:`fewstep.objectives.base.call_rows`)."""
    return bool(_LOCKSTEP)


def any_process(flag: bool) -> bool:
    """``flag`` on any process (an all-reduce while :func:`lockstep`, else ``flag`` itself)."""
    if not _LOCKSTEP:
        return bool(flag)
    value = torch.tensor([int(flag)], device=_LOCKSTEP[0])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class Replicated:
    """``trainer.distributed=ddp``: Accelerate's wrapping (DDP across processes, the module itself in one)."""

    name = "ddp"

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def building(self):
        """Around building the networks: every process builds them whole (each reads the pretrained weights, straight
        onto its GPU: :func:`fewstep.models.family.loading_onto`)."""
        return loading_onto(self.accelerator.device)

    def place(self, module: nn.Module) -> nn.Module:
        """Lay ``module`` out before its optimizer is built (nothing to do for replicas)."""
        return module

    def prepare(self, modules: list, optimizers: list) -> tuple[list, list]:
        """``(wrapped modules, prepared optimizers)``."""
        prepared = self.accelerator.prepare(*modules, *optimizers)
        if len(modules) + len(optimizers) == 1:
            prepared = (prepared,)
        return list(prepared[: len(modules)]), list(prepared[len(modules) :])

    def unwrap(self, wrapped) -> nn.Module:
        return self.accelerator.unwrap_model(wrapped)

    def no_sync(self, wrapped):
        """Around a micro-batch's forward and backward: accumulate gradients without reducing them."""
        return self.accelerator.no_sync(wrapped)

    def clip_grad_norm_(self, params: list, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(params, max_norm)


class Local(Replicated):
    """One process without Accelerate (the bench's step runner): networks on ``device``, nothing wrapped."""

    name = "local"

    def __init__(self, device: torch.device):
        self.device = device

    def building(self):
        return loading_onto(self.device)

    def place(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def prepare(self, modules: list, optimizers: list) -> tuple[list, list]:
        return list(modules), list(optimizers)

    def unwrap(self, wrapped) -> nn.Module:
        return wrapped

    def no_sync(self, wrapped):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params: list, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class Sharded(Replicated):
    """``trainer.distributed=fsdp``: torch FSDP2 over all processes (module docstring)."""

    name = "fsdp"

    def __init__(self, accelerator, mixed_precision: str = "no"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        super().__init__(accelerator)
        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        _LOCKSTEP[:] = [accelerator.device]
        bf16 = mixed_precision == "bf16"
        self.policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )

    @contextlib.contextmanager
    def building(self):
        """Around building the networks: the ranks other than 0 build them on the ``meta`` device (no pretrained
        weight is read there: :func:`fewstep.models.family.builds_empty`); :meth:`place` then fills every rank's
        shards from rank 0."""
        rank = self.accelerator.process_index
        if rank == 0:
            yield
            return
        log.info("rank %d builds the networks on the meta device; rank 0 reads the weights", rank)
        with building_empty():
            yield

    def place(self, module: nn.Module) -> nn.Module:
        """Shard each block, then the root, and fill every rank's shards with rank 0's weights (a broadcast; the
        ranks that built ``module`` on ``meta`` give their shards storage first). Every module, the root included,
        frees its gathered weights after its forward (``reshard_after_forward=True``; FSDP2 keeps the root's by
        default), so between forward passes every parameter is a shard: what the EMA teacher's in-place swap relies
        on."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        source = module.state_dict() if self.accelerator.process_index == 0 else {}  # whole tensors, not copies
        for unit in shard_units(module):
            fully_shard(unit, mesh=self.mesh, mp_policy=self.policy, reshard_after_forward=True)
        fully_shard(module, mesh=self.mesh, mp_policy=self.policy, reshard_after_forward=True)
        if _has_meta(module):
            _materialise(module, self.accelerator.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(module, source, options=options)
        return module

    def prepare(self, modules: list, optimizers: list) -> tuple[list, list]:
        if not optimizers:
            return list(modules), []
        prepared = self.accelerator.prepare(*optimizers)
        if len(optimizers) == 1:
            prepared = (prepared,)
        return list(modules), list(prepared)

    def unwrap(self, wrapped) -> nn.Module:
        return wrapped

    @contextlib.contextmanager
    def no_sync(self, wrapped):
        """FSDP2 reads the flag in backward: the context must span it (the loop's does)."""
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, params: list, max_norm: float) -> torch.Tensor:
        """torch's clipping over sharded gradients: the total norm is reduced over the shards (a full tensor)."""
        grads = [p.grad for p in params if p.grad is not None]
        total = full(torch.nn.utils.get_total_norm(grads, 2.0))
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total


def _materialise(module: nn.Module, device: torch.device) -> None:
    """Storage (uninitialised) for the ``meta`` tensors of ``module``; the buffers computed at construction (rotary
    tables, which no state dict carries) are kept as they are."""
    kept = [(sub, name, buf) for sub in module.modules() for name, buf in sub._buffers.items() if buf is not None]
    module.to_empty(device=device)
    for sub, name, buf in kept:
        if not buf.is_meta:
            sub._buffers[name] = buf.to(device)


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The sub-modules sharded one by one under ``trainer.distributed=fsdp`` (each all-gathered for its own
    forward and freed after it): instances of the classes a diffusers model names in ``_no_split_modules`` (its
    transformer blocks), else the members of a ``ModuleList`` whose name ends in ``blocks``; outermost matches
    only, in module order. Whatever no unit holds (embeddings, final norm and projection) is sharded with the root.
    One rule for every family (SD3 ``JointTransformerBlock``, Qwen-Image ``QwenImageTransformerBlock``, ...)."""
    names = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    if names:
        found = [sub for sub in module.modules() if type(sub).__name__ in names]
    else:
        found = [
            block
            for name, sub in module.named_modules()
            if isinstance(sub, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("blocks")
            for block in sub
        ]
    inner = {id(m) for unit in found for m in unit.modules() if m is not unit}
    return [unit for unit in found if id(unit) not in inner]


def strategy_for(accelerator, distributed: str, mixed_precision: str) -> Replicated:
    """The strategy of ``trainer.distributed`` for this launch; FSDP over one process has nothing to shard."""
    if distributed == "fsdp":
        if accelerator.num_processes > 1:
            return Sharded(accelerator, mixed_precision)
        log.warning("trainer.distributed=fsdp with one process: nothing to shard, training the whole model")
    return Replicated(accelerator)
