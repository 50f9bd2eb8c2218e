"""Plain multi-step Euler ODE sampler: the flow-matching baseline (optionally with CFG).

Uniform grid ``t_i = 1 − i/n`` (optionally SD3-shifted, ``t' = s·t / (1 + (s − 1)·t)``),
the model called at ``(x, t, t, cond)`` (target time = current time: an
instantaneous velocity), ``x ← x + (t_next − t)·F``. With ``guidance_scale = g > 0``
the conditional and unconditional passes are one batched forward
(``torch.cat``) and ``F = F_u + g·(F_c − F_u)``, or the model family's own combination
(``guidance``, set by :func:`fewstep.models.family.bind_guidance`: Qwen-Image rescales it as its
pipeline does). The state is float64 (cast to the noise dtype for each model call), as in the
UCGM sampler.
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep.data.base import cond_cat
from fewstep.models.family import DEFAULT_FAMILY
from fewstep.path import full_time
from fewstep.samplers.ucgm import VelocityModel, shift_time, state_dtype


def euler_time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` float64 times from 1 to 0, uniform before the optional shift."""
    if int(steps) < 1:
        raise ValueError(f"The number of sampling steps must be >= 1, got {steps}.")
    return shift_time(torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64), float(shift))


class EulerSampler:
    """Multi-step Euler sampler; ``guidance_scale > 0`` enables classifier-free guidance (needs ``null_cond``)."""

    def __init__(self, guidance_scale: float = 0.0, shift: float = 1.0):
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}.")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}.")
        self.guidance_scale = float(guidance_scale)
        self.shift = float(shift)
        self.guidance = DEFAULT_FAMILY.guided_velocity  # (v_cond, v_uncond, g) -> F; the model family's once bound

    def time_grid(self, steps: int) -> torch.Tensor:
        return euler_time_grid(steps, self.shift)

    def nfe(self, steps: int) -> int:
        """Forward calls per sample: ``steps`` (with CFG each call runs a 2B batch)."""
        return int(steps)

    @torch.no_grad()
    def sample(
        self,
        model: VelocityModel,
        noise: torch.Tensor,
        cond: Any,
        steps: int,
        generator: torch.Generator | None = None,
        null_cond: Any = None,
    ) -> torch.Tensor:
        """Integrate from ``noise`` (t = 1) to t = 0. ``generator`` is unused (the ODE is deterministic)."""
        guided = self.guidance_scale > 0.0
        if guided and null_cond is None:
            raise ValueError(
                f"EulerSampler with guidance_scale={self.guidance_scale} needs null_cond (the unconditional "
                "condition); pass it or set guidance_scale=0."
            )
        grid = self.time_grid(steps).tolist()
        in_dtype, batch = noise.dtype, noise.shape[0]
        x = noise.to(state_dtype(noise.device))
        model_cond = cond_cat(cond, null_cond) if guided else cond
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            x_in = x.to(in_dtype)
            if guided:
                x_in = torch.cat([x_in, x_in])
            t = full_time(t_cur, x_in.shape[0], x_in)
            velocity = model(x_in, t, t, model_cond).to(x)
            if guided:
                v_cond, v_uncond = velocity[:batch], velocity[batch:]
                velocity = self.guidance(v_cond, v_uncond, self.guidance_scale)
            x = x + (t_next - t_cur) * velocity
        return x.to(in_dtype)
