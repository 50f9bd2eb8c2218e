"""Forward-mode AD through the model, once, for the objectives that differentiate it along the flow
(MeanFlow, sCM; SPEC §11).

``time_derivative`` is the total derivative of ``(x, t, tt) ↦ f(x, t, tt, c)`` along ``(dx, 1, 0)``:
``df/dt = ∂f/∂x·dx + ∂f/∂t`` (one ``torch.func.jvp``), without gradients. It

* runs on the unwrapped module (under DDP the grad pass goes through the wrapper, whose reducer must not
  see a second forward);
* forces the math backend of ``scaled_dot_product_attention``: the flash and memory-efficient kernels
  (CPU flash included) have no forward-AD formula;
* replays the RNG state the caller captured before its grad pass, so dropout masks match, and leaves the
  generators where they were;
* turns a model that cannot run under forward AD into one :class:`ForwardADError` line naming the fix.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.errors import FewstepError
from fewstep.teachers.rng import RngState

_FORWARD_AD_HINTS = ("forward ad", "forward-mode", "jvp", "setup_context", "functorch", "dual")


class ForwardADError(FewstepError, RuntimeError):
    """The model's forward cannot run under ``torch.func.jvp``; the message is one line."""


def unwrap(model):
    """The module under DDP / DataParallel wrappers (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:240] + ("…" if len(text) > 240 else "")


@torch.no_grad()
def time_derivative(
    model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    tt: torch.Tensor,
    cond,
    dx: torch.Tensor,
    rng: RngState | None = None,
    objective: str = "this objective",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, df/dt)`` at ``(x_t, t, tt)`` along ``(dx, 1, 0)``, both detached (SPEC §11)."""
    module = unwrap(model)
    ones, zeros = torch.ones_like(t), torch.zeros_like(tt)

    def f(x, t_, tt_):
        return module(x, t_, tt_, cond)

    after = RngState.capture() if rng is not None else None
    if rng is not None:
        rng.restore()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            out, tangent = torch.func.jvp(f, (x_t, t, tt), (dx.to(x_t.dtype), ones, zeros))
    except (RuntimeError, NotImplementedError) as err:
        if not any(h in str(err).lower() for h in _FORWARD_AD_HINTS):
            raise
        raise ForwardADError(
            f"{type(module).__name__} cannot run under forward-mode AD (torch.func.jvp), which {objective} needs: "
            f"{_one_line(err)} -- give the failing op a forward-AD formula (an autograd.Function needs "
            "setup_context and jvp), or train with objective=twinflow, rcgm or flow_matching (no JVP)"
        ) from err
    finally:
        if after is not None:
            after.restore()
    return out, tangent
