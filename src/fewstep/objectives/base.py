"""The Objective interface and the pieces every objective shares.

``Objective.loss(student, teacher, batch, step) -> (loss, logs)`` is all the
training loop knows. ``logs`` holds floats, plus ``"times"``: the (t, tt)
pairs the step trained on, for the trajectory record (SPEC §1, W&B scatter).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fewstep.data.base import Batch, cond_cat, cond_select
from fewstep.objectives.jvp import unwrap
from fewstep.training import distributed


def wide_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype losses and targets are formed in: at least float32 (bf16/fp16 data is widened), float64 kept."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`wide_dtype` (the RCGM residual divides by delta_t, which amplifies rounding)."""
    return x.to(wide_dtype(x.dtype))


def l2_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, (B,), in the wider of the inputs' dtypes (at least float32)."""
    dtype = wide_dtype(pred.dtype, target.dtype)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)


def barron_distance(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """Barron-reweighted L2 (SPEC §2): ``mse·sg((mse/c²)/|α−2| + 1)^((α−2)/2) / c``, (B,)."""
    mse = l2_distance(pred, target)
    if abs(alpha - 2.0) < 1e-8:
        return mse / c
    weight = ((mse.detach() / c**2) / abs(alpha - 2.0) + 1.0).pow((alpha - 2.0) / 2.0)
    return mse * weight / c


@dataclass
class LossConfig:
    type: str = "barron"  # l2 | barron
    alpha: float = 1.0
    c: float = 1e-3


def make_distance(cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    kind = cfg["type"] if isinstance(cfg, dict) else cfg.type
    if kind == "l2":
        return l2_distance
    if kind == "barron":
        alpha, c = (cfg["alpha"], cfg["c"]) if isinstance(cfg, dict) else (cfg.alpha, cfg.c)
        return lambda p, t: barron_distance(p, t, alpha=alpha, c=c)
    raise ValueError(f"objective.loss.type={kind!r} is unknown; use 'l2' or 'barron'")


def time_weight(t: torch.Tensor, tt: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample weight ``tan((1 − (|t| − |tt|))·π/2.5) + 1`` ("tan") or 1 ("none")."""
    if kind == "none":
        return torch.ones_like(t, dtype=wide_dtype(t.dtype))
    if kind == "tan":
        return torch.tan(wide(1 - (t.abs() - tt.abs())) * math.pi / 2.5) + 1
    raise ValueError(f"objective.time_weighting={kind!r} is unknown; use 'tan' or 'none'")


def sample_time(n: int, time_dist: list[float] | tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``t ~ Beta(a, b)·c`` on ``like``'s device (drawn on the CPU generator, then moved), float32 or, for
    float64 data, float64."""
    a, b, c = (float(v) for v in time_dist)
    t = torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample((n,)).clamp_(0, 1) * c
    return t.to(device=like.device, dtype=wide_dtype(like.dtype))


def call_rows(rows: torch.Tensor) -> torch.Tensor | None:
    """The rows to run a model call on a subset ``rows`` (bool mask) with, or None to skip the call: ``rows``, None
    when it is empty. Under FSDP every model call is a collective all processes make together
    (:func:`fewstep.training.distributed.lockstep`): the call is skipped only when no process has a row, and a
    process without
    one runs it on a stand-in row (row 0) and drops the output: callers keep ``out[: int(rows.sum())]``."""

    local = bool(rows.any())
    if not distributed.lockstep():
        return rows if local else None
    if not distributed.any_process(local):
        return None
    if local:
        return rows
    stand_in = torch.zeros_like(rows)
    stand_in[0] = True
    return stand_in


def has_active_dropout(model) -> bool:
    """Whether ``model`` (the student; a teacher calls the same module) has a dropout layer that draws masks now
    (training mode, ``p > 0``)."""
    return any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in unwrap(model).modules()
    )


@torch.no_grad()
def guidance_passes(model, counter: EvalCounter, name: str, x_t, t, tt, cond, uncond, rows, rng, paired: bool):
    """No-grad outputs ``(f(x_t, t, tt, cond), f(x_t, t, tt, uncond))`` on the rows ``rows`` (bool mask), for a
    guided target (TwinFlow's enhanced target, MeanFlow's CFG-in-training), or None when no process has a row
    (:func:`call_rows`). Both passes start from the captured ``rng`` state. Unpaired: one batched forward of the
    rows under both conditions. ``paired`` (the model has active dropout, :func:`has_active_dropout`): two
    forwards over the whole batch, each from ``rng``, so both see the dropout masks the pass drawn from ``rng``
    on the whole batch draws, row for row (one batched forward, or a subset of the rows, draws other masks) and
    the guided target is the difference of one function."""
    run = call_rows(rows)
    if run is None:
        return None
    if paired:
        run = torch.ones_like(rows)
    n, kept = int(run.sum()), rows[run]  # ``kept`` drops a stand-in row under FSDP (call_rows)
    x, tr, ttr = x_t[run], t[run], tt[run]
    if paired:
        outs = []
        for c in (cond, uncond):
            rng.restore()
            counter.add(name, n, grad=False)
            outs.append(model(x, tr, ttr, cond_select(c, run)))
        out = torch.cat(outs)
    else:
        if rng is not None:
            rng.restore()
        counter.add(name, 2 * n, grad=False)
        both = cond_cat(cond_select(cond, run), cond_select(uncond, run))
        out = model(torch.cat([x, x]), torch.cat([tr, tr]), torch.cat([ttr, ttr]), both)
    return out[:n][kept], out[n:][kept]


@dataclass
class EvalCounter:
    """Network evaluations of one step: forward calls and rows, with and without grad, and the rows of each named
    pass (``by_pass``, logged as ``nfe/rows/<pass>``)."""

    calls_grad: int = 0
    calls_nograd: int = 0
    rows_grad: int = 0
    rows_nograd: int = 0
    batch: int = 0
    by_pass: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, rows: int, grad: bool) -> None:
        if grad:
            self.calls_grad += 1
            self.rows_grad += rows
        else:
            self.calls_nograd += 1
            self.rows_nograd += rows
        self.by_pass[name] = self.by_pass.get(name, 0) + rows

    def logs(self) -> dict[str, float]:
        b = max(self.batch, 1)
        return {
            "nfe/calls_grad": self.calls_grad,
            "nfe/calls_nograd": self.calls_nograd,
            "nfe/rows_grad": self.rows_grad,
            "nfe/rows_nograd": self.rows_nograd,
            # network evaluations in units of one full-batch forward
            "nfe/per_step": (self.rows_grad + self.rows_nograd) / b,
            # the rows of each pass that ran (a pass that did not run this step has no key)
            **{f"nfe/rows/{name}": rows for name, rows in self.by_pass.items()},
        }


@dataclass
class Network:
    """A trainable module an objective owns besides the student (DMD2's fake score, its GAN head).

    The loop gives it an AdamW optimizer (``lr``: None = ``trainer.lr``) and an LR schedule like the
    student's, wraps it with Accelerate, checkpoints and resumes it under its name, and with ``ema=True``
    keeps an average of it of the configured teacher kind (``Objective.average(name)``)."""

    module: torch.nn.Module
    lr: float | None = None
    ema: bool = False


_REGISTERED: dict[str, type] = {}  # name -> Objective subclass with a config_schema (registered())


class Objective:
    """Base class: subclasses implement ``loss``. ``needs_time_pair`` says whether the
    model must take a target time and a time sign (TwinFlow/RCGM) or stays vanilla.

    Objectives that train more than the student override ``setup`` (build ``self.networks``: name →
    :class:`Network`, from the student after its initial weights are loaded) and ``stepping`` (the names
    whose optimizers step at a training step; ``"student"`` is the student). The loop binds the prepared
    (wrapped) modules with ``bind`` and averages by name. The defaults keep a single-network objective as
    it was: no networks, the student steps every step."""

    needs_time_pair: bool = False
    #: "flow" objectives need a flow-matching model (or the diff2flow bridge).
    needs_flow_model: bool = True
    networks: dict[str, Network] = {}  # noqa: RUF012 - replaced per instance by setup()

    # -- what the config layer knows of an objective (its schema and its checks live here, with it) ------------
    #: The name of its typed schema, ``schema/objective/<name>`` (``conf/objective/<name>.yaml`` starts from it),
    #: and of its bench variant (``python -m fewstep.bench variants=[flow_matching,<name>]``).
    name: ClassVar[str] = ""
    #: The typed schema of its YAML: a dataclass with ``_target_`` and every option (a misspelt or mistyped key
    #: fails at compose time). None: not registered (a subclass that shares its parent's YAML group, e.g. RCGM).
    config_schema: ClassVar[type | None] = None
    #: Whether its runs sample with ``sampler.guidance_scale`` (CFG at sampling: flow matching); a few-step
    #: objective bakes guidance into its target, and sampling forces the scale to 0 with a warning.
    samples_with_guidance: ClassVar[bool] = False
    #: Why it cannot train under ``trainer.distributed=fsdp`` (None: it can).
    fsdp_problem: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if vars(cls).get("config_schema") is not None:  # its own schema (RCGM shares TwinFlow's: not registered)
            if not cls.name:
                raise TypeError(f"{cls.__qualname__} declares config_schema without a name")
            _REGISTERED[cls.name] = cls

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse a bad value of this objective's options, or a bad combination with the rest of the run (``cfg``
        is the whole composed config), with :class:`fewstep.config.checks.ConfigError`: one line naming the
        fix. Runs in :func:`fewstep.config.validate.validate`, before any weight loads. Warn (``warnings.warn``)
        where a run can go on."""

    def setup(self, student: torch.nn.Module, data=None) -> None:  # noqa: B027 - optional hook
        """Build ``self.networks`` (called once with the student and the data source, before wrapping and
        before a checkpoint is loaded)."""

    def stepping(self, step: int) -> tuple[str, ...]:
        """The networks whose optimizers step at ``step``; the others' gradients are discarded."""
        return ("student",)

    def bind(self, modules: dict[str, torch.nn.Module], averages: dict | None = None) -> None:
        """The loop's prepared modules (name → wrapped module) and averages (name → teacher) of ``networks``."""
        self.bound = dict(modules)
        self.averages = dict(averages or {})

    def network(self, name: str) -> torch.nn.Module:
        """The module to call for ``name``: the prepared one once bound, else the one built by ``setup``."""
        bound = getattr(self, "bound", {})
        return bound[name] if name in bound else self.networks[name].module

    def loss(self, student, teacher, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


def registered() -> dict[str, type[Objective]]:
    """Every objective class with a schema, by name: those of the modules of ``fewstep.objectives`` (imported here)
    and any other subclass defined so far (a research project's own, imported before the config is composed)."""
    import importlib
    import pkgutil

    import fewstep.objectives as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(sorted(_REGISTERED.items()))
