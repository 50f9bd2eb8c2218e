"""Peak memory of a training step, estimated without allocating it: ``python -m fewstep.bench estimate_memory=true``.

The step that :class:`fewstep.bench.runner.StepRunner` measures (model, optimizer, EMA, the objective's own
networks, one optimizer step at a time) runs under torch's ``FakeTensorMode``: every tensor has its real
shape, dtype and storage size but no data, so a 20 B-parameter model "fits" on a laptop and a step costs
seconds. :class:`StepMemory` counts the bytes of the storages alive after every operation (each rounded up
to 512 bytes, as CUDA's caching allocator does) and keeps the maximum.

An objective branches on values (TwinFlow's time-range masks, ``bool(rows.any())``): tensors of at most
``SMALL`` elements (times, masks, per-sample scales) therefore also run for real beside their fake, so
the branches and row counts are those of a real step; large tensors (latents, activations, weights) never
hold data. A decision on a large tensor's values is an error naming the operation.

What it leaves out: the GPU's kernel workspaces (cuBLAS, attention), the caching allocator's
fragmentation and transient peaks while the model is built; on the H100 rows of docs/realsize.md the
estimate is within a few percent of ``torch.cuda.max_memory_allocated`` (the table there).
"""

from __future__ import annotations

import contextlib
import gc
import json
import weakref

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from fewstep.bench.runner import StepRunner
from fewstep.errors import FewstepError


def _flop_formulas() -> dict:
    """torch's FLOP formulas (``torch.utils.flop_counter``: matmuls, convolutions, fused attention, forward and
    backward), keyed by op packet, plus the CPU's fused attention (what the estimate dispatches to), whose
    arguments start as the CUDA kernels' do."""
    from torch.utils import flop_counter

    formulas = dict(flop_counter.flop_registry)
    aten = torch.ops.aten
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = flop_counter.sdpa_flop
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_counter.sdpa_backward_flop
    formulas[aten.convolution_backward] = flop_counter.shape_wrapper(_conv_backward_flops)
    return formulas


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """A convolution's backward: each requested gradient (input, weight) costs one forward's multiply-adds.
    torch's own formula counts the weight gradient of a grouped convolution ``groups`` times over (SANA's
    depthwise Mix-FFN convolution: 2,240×)."""
    from torch.utils import flop_counter

    transposed, output_mask = args[4], args[7]
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


SMALL = 1 << 16  # elements: tensors at most this large also hold real values (times, masks, scales)
BLOCK = 512  # bytes: the CUDA caching allocator's rounding of every allocation
INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}  # (self, indices, ...)


def _rounded(nbytes: int) -> int:
    return (nbytes + BLOCK - 1) // BLOCK * BLOCK


class StepMemory(TorchDispatchMode):
    """Live and peak storage bytes of the fake tensors created under it, with real values for small ones."""

    def __init__(self, fake_mode: FakeTensorMode | None):
        """``fake_mode`` None: the same accounting of a real step (no values to keep; the tests compare)."""
        super().__init__()
        self.fake_mode = fake_mode
        self.real = WeakIdKeyDictionary()  # fake tensor -> its real values (small tensors only)
        self.sizes: dict[int, int] = {}  # id(storage) -> rounded bytes, while alive
        self.live = 0
        self.peak = 0
        self.flops = 0  # floating-point operations of the matmuls, convolutions and attention run under it
        self.formulas = _flop_formulas()

    # -- accounting -------------------------------------------------------------------------------

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.sizes:
            return
        self.sizes[key] = size = _rounded(storage.nbytes())
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def rebase(self) -> None:
        """Let the peak restart from what is alive now (the built runner: weights, optimizer state, EMA, data):
        transients of building (construction-time tables computed on the host) no longer count. Only storages
        made under this mode are counted, never another test's or fake mode's leftovers."""
        gc.collect()
        self.peak = self.live

    # -- values of small tensors ------------------------------------------------------------------

    def _value(self, x):
        if isinstance(x, FakeTensor):
            return self.real.get(x)
        return x  # a real tensor (a constant made outside the mode) or not a tensor

    def _run_real(self, func, flat, spec):
        real = [self._value(a) for a in flat]
        args, kwargs = tree_unflatten(real, spec)
        with unset_fake_temporarily():
            return func(*args, **kwargs)

    def _fake(self, value):
        return tree_map(
            lambda v: self.fake_mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v, value
        )

    def _count(self, func, args, kwargs, out) -> None:
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake_mode is None:
            out = func(*args, **kwargs)
            self._count(func, args, kwargs, out)
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self._track(o)
            return out
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        known = all(self._value(t) is not None for t in tensors) and all(t.numel() <= SMALL for t in tensors)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            out = self._resolve(func, flat, spec, known)
            known = False  # _resolve recorded the values it could
        self._count(func, args, kwargs, out)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if known and all(o.numel() <= SMALL for o in outs):
            real_outs = [r for r in tree_flatten(self._run_real(func, flat, spec))[0] if isinstance(r, torch.Tensor)]
            for fake, real in zip(outs, real_outs, strict=False):
                self.real[fake] = real
        else:
            self._forget_written(func, flat, spec)
        for o in outs:
            self._track(o)
        return out

    def _forget_written(self, func, flat, spec) -> None:
        """An op that wrote into a small tensor with values not known here leaves it without real values."""
        args, kwargs = tree_unflatten(flat, spec)
        schema = func._schema.arguments
        for i, arg in enumerate(schema):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if isinstance(value, FakeTensor):
                    self.real.pop(value, None)

    def _resolve(self, func, flat, spec, known: bool):
        """An op whose output shape or value depends on data: computed from the real values when all its
        inputs have them; an index with a (known) boolean mask becomes an index with the mask's positions."""
        if known:
            real = self._run_real(func, flat, spec)
            fake = self._fake(real)
            for f, r in zip(tree_flatten(fake)[0], tree_flatten(real)[0], strict=False):
                if isinstance(f, torch.Tensor):
                    self.real[f] = r
            return fake
        if func._schema.name in INDEX_OPS:
            args, kwargs = tree_unflatten(flat, spec)
            indices = []
            for index in args[1]:
                mask = self._value(index) if isinstance(index, torch.Tensor) else None
                if mask is not None and mask.dtype == torch.bool:
                    with unset_fake_temporarily():
                        positions = list(mask.nonzero().unbind(1))
                    for real in positions:
                        indices.append(self._fake(real))
                        self.real[indices[-1]] = real
                else:
                    indices.append(index)
            return func(args[0], indices, *args[2:], **kwargs)
        raise FewstepError(
            f"memory estimate: {func} depends on the values of a tensor of more than {SMALL} elements, which an "
            "estimate does not compute; measure this variant on a device instead (drop estimate_memory=true)"
        )


def _swap_or_set(original):
    """``torch.utils.swap_tensors`` refuses fake parameters that carry a weak reference (FakeTensorMode keeps
    some), which ``Module.to`` swaps; in an estimate replacing the parameter's data is the same thing."""

    def swap(t1, t2):
        try:
            return original(t1, t2)
        except RuntimeError as err:
            if "weakref" not in str(err):
                raise
            with torch.no_grad():
                t1.data = t2.data

    return swap


def _deepcopy_fake(self, memo):
    """``copy.deepcopy`` of a fake tensor as a clone in the running fake mode. (torch's own copies the storage
    outside the mode, and the copy's views then get storages of their own: a reshaped deep-copied table would be
    counted twice.)"""
    if id(self) in memo:
        return memo[id(self)]
    with torch.no_grad():
        new = self.clone()
    new.requires_grad_(self.requires_grad)
    memo[id(self)] = new
    return new


@contextlib.contextmanager
def fake_execution(fake: bool = True):
    """The context an estimate runs in: FakeTensorMode with :class:`StepMemory` under it; distributions do
    not validate their arguments (validation reads values). ``fake=False``: the same accounting on real
    tensors (the step really runs)."""
    from torch.distributions import Distribution

    if not fake:
        with StepMemory(None) as memory:
            yield memory
        return
    validate = Distribution._validate_args
    swap = torch.utils.swap_tensors
    Distribution.set_default_validate_args(False)
    torch.utils.swap_tensors = _swap_or_set(swap)
    own_deepcopy = FakeTensor.__dict__.get("__deepcopy__")
    FakeTensor.__deepcopy__ = _deepcopy_fake
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, StepMemory(fake_mode) as memory:
            yield memory
    finally:
        if own_deepcopy is None:
            del FakeTensor.__deepcopy__
        else:
            FakeTensor.__deepcopy__ = own_deepcopy
        torch.utils.swap_tensors = swap
        Distribution.set_default_validate_args(validate)


def estimate_step_memory(overrides: list[str], mixed_precision: str, steps: int = 6, fake: bool = True) -> dict:
    """The peak memory of ``steps`` optimizer steps of one variant (:class:`fewstep.bench.runner.StepRunner`), with
    no data allocated: ``resident_mb`` (model, optimizer state after the first step, EMA, the objective's
    networks), ``peak_memory_mb`` (the largest live total during any step, resident included) and the
    per-step peaks. ``steps`` ≥ a DMD2 critic/generator cycle (6 with the default 5 critic steps). ``fake=False``
    runs the step for real (on the CPU) with the same accounting."""
    with fake_execution(fake) as memory:
        runner = StepRunner(overrides, torch.device("cpu"), mixed_precision)
        memory.rebase()
        built = memory.live
        per_step, flops = [], []
        for _ in range(steps):
            start, counted = memory.live, memory.flops
            memory.peak = start
            runner.step()
            per_step.append(memory.peak)
            flops.append(memory.flops - counted)
        params = list(runner.model.parameters())
        out = {
            "peak_memory_mb": max(per_step) / 2**20,
            "built_mb": built / 2**20,  # before the first step (no optimizer state yet)
            "resident_mb": memory.live / 2**20,  # after the last step (optimizer state included)
            "step_peaks_mb": [p / 2**20 for p in per_step],
            # matmul/convolution/attention FLOPs per optimizer step, the mean over the steps (a DMD2 cycle's
            # critic and generator steps differ; TwinFlow's groups draw their rows at random)
            "tflops_per_step": sum(flops) / len(flops) / 1e12,
            "step_tflops": [f / 1e12 for f in flops],
            "evals_per_step": sum(runner.evals) / len(runner.evals),
            "step_evals": list(runner.evals),
            "params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "estimated": bool(fake),
        }
        del runner, params
    return out


def _estimate_child(overrides_json: str, mixed_precision: str, steps: str) -> None:
    print(json.dumps(estimate_step_memory(json.loads(overrides_json), mixed_precision, int(steps))))
