"""Teachers: the weights used for no-grad target passes (SPEC §1–§2).

A teacher never copies the student module. It keeps a shadow of the
student's *trainable* parameters only (so a LoRA run's EMA holds adapter and
embedding weights, not the frozen base) and calls the student module with
those parameters swapped in (as ``torch.func.functional_call`` does, see ``Teacher._call_with``). Under FSDP
(``trainer.distributed=fsdp``) the shadow holds this rank's shards and is copied in place for the call instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fewstep.teachers.rng import RngState
from fewstep.training.distributed import copy_full_, is_shard, is_sharded

__all__ = ["Teacher", "EMATeacher", "StudentTeacher", "FrozenTeacher", "RngState", "trainable_parameters"]


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class Teacher:
    """Interface: ``bind(student)``, ``update(student, step)``, ``model`` (a no-grad callable
    ``f(x_t, t, tt, cond)``), ``state_dict()`` / ``load_state_dict()``."""

    shadow: dict[str, torch.Tensor] | None = None

    def bind(self, student: nn.Module) -> None:
        self.student = student

    def update(self, student: nn.Module, step: int) -> None:  # noqa: B027 - optional hook
        pass

    @property
    def model(self) -> Callable[..., torch.Tensor]:
        if self.shadow is None:
            return self.student
        return self._call_with(self.shadow)

    def _call_with(self, shadow: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The student called with ``shadow`` in place of its trainable parameters (what
        ``torch.func.functional_call(student, shadow, ..., strict=False)`` does, tied aliases included),
        by swapping the entries of each owning module's ``_parameters`` and putting them back: the same
        forward, without functional_call's per-call bookkeeping."""
        student = self.student
        if is_sharded(student):
            return self._call_with_copied(shadow)
        by_id = {id(p): shadow[name] for name, p in student.named_parameters() if name in shadow}
        slots = [
            (module._parameters, key, by_id[id(p)])
            for module in student.modules()
            for key, p in module._parameters.items()
            if p is not None and id(p) in by_id
        ]

        def call(*args, **kwargs):
            saved = [(params, key, params[key]) for params, key, _ in slots]
            try:
                for params, key, value in slots:
                    params[key] = value
                return student(*args, **kwargs)
            finally:
                for params, key, old in saved:
                    params[key] = old

        return call

    def _call_with_copied(self, shadow: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The sharded (FSDP) form of :meth:`_call_with`: a sharded module all-gathers each parameter from its
        own shard storage, which a swapped ``_parameters`` entry would not reach, so the shadow's shards are copied
        into the parameters' local shards for the call and the student's are copied back after it (this rank's
        1/N of the trainable weights, each way). Between forward passes every parameter is a shard
        (``fewstep.training.distributed.Sharded.place``)."""
        student = self.student

        def call(*args, **kwargs):
            with torch.no_grad():
                pairs = [(p, shadow[name]) for name, p in student.named_parameters() if name in shadow]
                if not all(is_shard(p) for p, _ in pairs):
                    raise RuntimeError("the sharded student's parameters are gathered: call the teacher between passes")
                own = [p.to_local() for p, _ in pairs]
                saved = [t.clone() for t in own]
                torch._foreach_copy_(own, [s.to_local() for _, s in pairs])
            try:
                return student(*args, **kwargs)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(own, saved)

        return call

    @property
    def sampling_key(self) -> str | None:
        """The weights a run is judged by: the entry of ``state_dict()`` (and of the checkpoint's
        ``teacher*.safetensors``) that ``fewstep.sample``, ``fewstep.eval`` and ``fewstep.export`` use;
        None = the student's own weights."""
        return None

    @property
    def sampling_model(self) -> Callable[..., torch.Tensor]:
        """The model to sample with: the student called with the :attr:`sampling_key` weights."""
        key = self.sampling_key
        return self.student if key is None else self._call_with(getattr(self, key))

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow) if self.shadow is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("shadow") is not None:
            if self.shadow is None or set(self.shadow) != set(state["shadow"]):
                raise ValueError(
                    "teacher checkpoint does not match the model's trainable parameters; "
                    "resume with the same model/LoRA config or set trainer.resume=none"
                )
            for k, v in state["shadow"].items():
                copy_full_(self.shadow[k], v)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (its local shard under FSDP, in place), else ``t``."""
    return t.to_local() if is_shard(t) else t


def joined(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The float32 value whose bits are ``high``'s 16 bfloat16 bits followed by the signed 16-bit remainder
    ``low`` (see :func:`split_`): exactly the value :func:`split_` took apart. A new float32 tensor."""
    bits = high.view(torch.int16).to(torch.int32)
    return bits.bitwise_left_shift_(16).add_(low).view(torch.float32)


def split_(value: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> None:
    """Write the float32 ``value`` into ``high`` (bfloat16: ``value`` rounded to nearest, ties away from zero)
    and ``low`` (int16: the signed difference of the bit patterns, ``value``'s bits − ``high``'s bits << 16),
    so that :func:`joined` gives ``value`` back bit for bit. Consumes ``value``."""
    bits = value.view(torch.int32)
    top = bits.add(0x8000).bitwise_right_shift_(16)  # the rounded top half, sign-extended
    high.view(torch.int16).copy_(top)
    low.copy_(bits.sub_(top.bitwise_left_shift_(16)))


class EMATeacher(Teacher):
    """Exponential moving average of the trainable weights with the reference warm-up:
    ``d_0 = 0``, ``d_{k+1} = d_k + (1 − d_k)(decay − d_k)/2`` (decay 0 = the student,
    decay 1 = the frozen initial weights). Updated at most once per optimizer step.

    ``sampling_decay`` optionally keeps a second, slower average used only to sample and evaluate
    (same warm-up rule); the teacher passes always use ``decay``.

    **bfloat16 weights** (a full fine-tune with ``model.dtype=bfloat16``): an average kept in bf16 (8-bit
    mantissa) loses most updates ``(1 − d)(p − ema)`` to rounding at d = 0.99–0.9999, so it barely moves or
    drifts (measured on a 64×64 bf16 weight drifting 20 % over 2,000 steps: 38 % / 81 % / 82 % relative error
    at d = 0.99 / 0.999 / 0.9999 against the exact average, where rounding the exact average to bf16 costs
    0.9–1.2 %; ``tests/teachers/test_ema_precision.py``). Each bf16 entry of a moving average therefore keeps,
    beside its bf16 shadow, an int16 buffer (``shadow_low``, ``sampling_shadow_low``) with the low 16 bits of a
    float32 average: the pair is a float32 master split in two (:func:`split_` / :func:`joined`), the bf16 half
    being the float32 average rounded to nearest, so the teacher still runs on bf16 weights in the model's own
    dtype and the average is the float32 EMA bit for bit, within bf16 rounding of its value (0.88 / 1.10 /
    1.22 % in the measurement above, the floor). Cost: 2 more bytes per trainable parameter and average (4 in
    all, as much as a float32 copy, but with no third copy for the forward); the update works on one tensor at
    a time in float32. Chosen over a bf16 Kahan compensation buffer (also 2 bytes, measured worse: 12.6 %
    against the 11.8 % floor at d = 0.9999 on a slowly moving weight), an 8-bit remainder (1 byte, 23 % there)
    and stochastic rounding (0 bytes, 6–10 % where the floor is ~1 %). float32/float64 weights keep the plain
    average, bit-identical to before; float16 trainable weights are refused at launch
    (:func:`fewstep.config.validate.check_weight_dtype`), so a float16 average never arises.
    """

    def __init__(self, decay: float = 0.99, sampling_decay: float | None = None):
        for name, d in (("decay", decay), ("sampling_decay", sampling_decay)):
            if d is not None and not 0.0 <= d <= 1.0:
                raise ValueError(f"teacher.{name}={d} must lie in [0, 1] (0 = student, 1 = frozen initial weights)")
        self.decay = float(decay)
        self.sampling_decay = None if sampling_decay is None else float(sampling_decay)
        self.current_decay = 0.0
        self.current_sampling_decay = 0.0
        self.sampling_shadow: dict[str, torch.Tensor] | None = None
        # the low 16 bits of the float32 average of each bfloat16 entry (see the class docstring); empty otherwise
        self.shadow_low: dict[str, torch.Tensor] = {}
        self.sampling_shadow_low: dict[str, torch.Tensor] = {}
        self.last_step = -1

    def bind(self, student: nn.Module) -> None:
        super().bind(student)
        params = trainable_parameters(student)
        # decay 0 is the student itself: no shadow, no copy.
        self.shadow = None if self.decay == 0.0 else {k: p.detach().clone() for k, p in params.items()}
        if self.sampling_decay is not None:
            self.sampling_shadow = {k: p.detach().clone() for k, p in params.items()}
        self.shadow_low = self._low_bits(self.shadow, self.decay)
        self.sampling_shadow_low = self._low_bits(self.sampling_shadow, self.sampling_decay)

    @staticmethod
    def _low_bits(shadow: dict[str, torch.Tensor] | None, decay: float | None) -> dict[str, torch.Tensor]:
        """Zero int16 remainders (the float32 average starts at the bf16 weights) for the bfloat16 entries of an
        average that moves; shards like its entry under FSDP."""
        if shadow is None or decay is None or decay >= 1.0:
            return {}
        return {k: torch.zeros_like(v, dtype=torch.int16) for k, v in shadow.items() if v.dtype == torch.bfloat16}

    @property
    def sampling_key(self) -> str | None:
        """The sampling EMA when ``sampling_decay`` is set, else the teacher EMA (decay 0 is the student itself,
        decay 1 the frozen initial weights: both sample with the student)."""
        if self.sampling_decay is not None:
            return "sampling_shadow"
        return "shadow" if 0.0 < self.decay < 1.0 else None

    @staticmethod
    def _lerp(shadow: dict[str, torch.Tensor], params: dict, decay: float, low: dict[str, torch.Tensor]) -> None:
        plain = {k: v for k, v in shadow.items() if k not in low}
        if plain:
            ema = list(plain.values())
            # (called under no_grad: no detach needed; .to only where the dtypes differ, one op per tensor less)
            cur = [params[k] if params[k].dtype == v.dtype else params[k].to(v.dtype) for k, v in plain.items()]
            torch._foreach_lerp_(ema, cur, 1.0 - decay)  # ema <- d·ema + (1−d)·student
        for k, rest in low.items():  # bfloat16: the same update on the float32 average, one tensor at a time
            high, rest = _local(shadow[k]), _local(rest)
            split_(joined(high, rest).lerp_(_local(params[k]).float(), 1.0 - decay), high, rest)

    @staticmethod
    def _warm(d: float, target: float) -> float:
        return d + (1.0 - d) * (target - d) * 0.5

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        if step == self.last_step:
            return
        self.last_step = step
        params = trainable_parameters(student)
        if self.shadow is not None and self.decay < 1.0:
            self._lerp(self.shadow, params, self.current_decay, self.shadow_low)
        self.current_decay = self._warm(self.current_decay, self.decay)
        if self.sampling_shadow is not None:
            self._lerp(self.sampling_shadow, params, self.current_sampling_decay, self.sampling_shadow_low)
            self.current_sampling_decay = self._warm(self.current_sampling_decay, self.sampling_decay)

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "current_decay": self.current_decay, "last_step": self.last_step}
        if self.sampling_shadow is not None:
            state["sampling_shadow"] = dict(self.sampling_shadow)
            state["current_sampling_decay"] = self.current_sampling_decay
        for key in ("shadow_low", "sampling_shadow_low"):
            if getattr(self, key):
                state[key] = dict(getattr(self, key))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.current_decay = float(state["current_decay"])
        self.last_step = int(state["last_step"])
        if self.sampling_shadow is not None:
            if state.get("sampling_shadow") is None:
                raise ValueError("checkpoint has no sampling EMA; resume with teacher.sampling_decay=null")
            for k, v in state["sampling_shadow"].items():
                copy_full_(self.sampling_shadow[k], v)
            self.current_sampling_decay = float(state["current_sampling_decay"])
        for key in ("shadow_low", "sampling_shadow_low"):
            # a checkpoint without the remainders (written before they existed): the average restarts from its
            # bf16 value
            saved = state.get(key) or {}
            for k, rest in getattr(self, key).items():
                if k in saved:
                    copy_full_(rest, saved[k])
                else:
                    _local(rest).zero_()


class FrozenTeacher(EMATeacher):
    """The initial weights, never updated (EMA with decay 1)."""

    def __init__(self):
        super().__init__(decay=1.0)


class StudentTeacher(Teacher):
    """The student's own current weights (no EMA). Needs ``allow_student_teacher=true``:
    the seed's ``twinflow_require_ema`` guard, checked in ``fewstep.config.validate``."""

    def __init__(self, allow_student_teacher: bool = False):
        self.allow_student_teacher = bool(allow_student_teacher)
