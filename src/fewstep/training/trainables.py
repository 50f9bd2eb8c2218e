"""What a run trains, built once and shared by the training loop and the bench's step runner: the components of a
composed config (:func:`build_components`) and the trainable networks (:func:`build_trainables`): the student and
the objective's own networks (``Objective.networks``), each placed, wrapped, given its optimizer, LR schedule and
(optionally) weight average."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from fewstep.models import build_model
from fewstep.models.family import bind_guidance, weight_dtype_name

STUDENT = "student"  # the student's name among the trainables (``Objective.stepping`` names it so)


def build_components(cfg: DictConfig, device=None, bind_teacher: bool = True):
    """Data, objective, model, teacher and sampler from a composed config (validated first). ``bind_teacher=False``
    (training, which binds it once the model is placed) leaves the teacher unbound: an EMA teacher binding here
    copies every trainable weight, a second whole model in host memory while the networks are built."""
    data = instantiate(cfg.data)
    objective = instantiate(cfg.objective, _convert_="all")
    resolve_weight_dtype(cfg)
    model = build_model(cfg.model, data, objective)
    if device is not None:
        model.to(device)
    if cfg.trainer.compile:
        # In place: the module keeps its parameters and state-dict keys (checkpoints, EMA, export unchanged);
        # the teacher's call over swapped-in weights (Teacher._call_with) goes through the same compiled forward.
        model.compile()
    teacher = instantiate(cfg.teacher)
    if bind_teacher:
        teacher.bind(model)
    sampler = instantiate(cfg.sampler, _convert_="all")
    bind_guidance(sampler, model)
    return data, objective, model, teacher, sampler


def resolve_weight_dtype(cfg: DictConfig) -> None:
    """``model.dtype=auto`` (the ``model=*_lora`` default) becomes the dtype it stands for, in place
    (:func:`fewstep.models.family.weight_dtype_name`)."""
    if "dtype" not in cfg.model.keys() or str(cfg.model.dtype) != "auto":  # (no get() or `in`: a missing key raises
        return  # inside them, and the caught error's frames kept the built model alive until a garbage collection)
    lora = bool((cfg.model.get("lora") or {}).get("enabled", False))
    with open_dict(cfg):
        cfg.model.dtype = weight_dtype_name("auto", lora, str(cfg.trainer.mixed_precision))


def make_optimizer(params, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where the device and dtypes allow it (one kernel per step instead of a Python loop
    over parameters: 9% of a digits step on the CPU), else the default implementation."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def lr_factor(step: int, tr) -> float:
    """LR multiplier: linear warm-up, then constant, cosine or linear decay to ``min_lr_ratio`` at max_steps."""
    warm = 1.0 if tr.warmup_steps <= 0 else min(1.0, (step + 1) / tr.warmup_steps)
    if tr.lr_schedule == "constant":
        return warm
    span = max(tr.max_steps - tr.warmup_steps, 1)
    progress = min(max(step - tr.warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tr.lr_schedule == "cosine" else 1.0 - progress
    return warm * (tr.min_lr_ratio + (1 - tr.min_lr_ratio) * shape)


def trainer_optimizer(tr) -> Callable[[list, float | None], tuple[Any, Any]]:
    """``(params, lr) -> (AdamW, LR schedule)`` with the run's ``trainer.*`` settings (``lr`` None: ``trainer.lr``)."""

    def optimizer_for(params: list, lr: float | None):
        opt = make_optimizer(params, lr=lr or tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay, eps=tr.eps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tr))

    return optimizer_for


class Trainable(NamedTuple):
    """One trainable network of a run: the student, or a network an objective owns (``Objective.networks``)."""

    wrapped: Any  # what the objective calls (Accelerate-prepared)
    module: torch.nn.Module  # unwrapped: what is averaged and checkpointed
    optimizer: Any
    scheduler: Any  # its LR schedule (None where the caller keeps the LR fixed: the bench)
    params: list  # the parameters it trains
    average: Any  # its EMA (the student's: the teacher) or None

    def checkpointed(self) -> tuple:
        """``(module, optimizer, scheduler, average)``, as :func:`fewstep.training.checkpoint.save_checkpoint`
        takes an objective's network."""
        return self.module, self.optimizer, self.scheduler, self.average


def trainable_params(module: torch.nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def build_trainables(cfg: DictConfig, objective, student, teacher, strategy, optimizer_for) -> dict[str, Trainable]:
    """The student (first, as :data:`STUDENT`) and the objective's networks, laid out by ``strategy`` (sharded under
    FSDP) before their optimizers are built over their parameters (``optimizer_for(params, lr)``), then wrapped.
    The student's average is ``teacher``; a network with ``ema=True`` gets one of the configured teacher kind. The
    objective is bound to the wrapped networks and their averages. Call ``objective.setup`` first."""
    specs = dict(objective.networks)
    modules = [strategy.place(student), *(strategy.place(spec.module) for spec in specs.values())]
    params = [trainable_params(m) for m in modules]
    built = [
        optimizer_for(params[0], None),
        *(optimizer_for(p, spec.lr) for p, spec in zip(params[1:], specs.values())),
    ]
    wrapped, optimizers = strategy.prepare(modules, [opt for opt, _ in built])
    out = {}
    for i, name in enumerate([STUDENT, *specs]):
        module = strategy.unwrap(wrapped[i])
        if name == STUDENT:
            average = teacher
        else:
            average = instantiate(cfg.teacher) if specs[name].ema else None
        if average is not None:
            average.bind(module)
        out[name] = Trainable(wrapped[i], module, optimizers[i], built[i][1], params[i], average)
    networks = {n: t for n, t in out.items() if n != STUDENT}
    objective.bind(
        {n: t.wrapped for n, t in networks.items()}, {n: t.average for n, t in networks.items() if t.average}
    )
    return out
