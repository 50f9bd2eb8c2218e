"""2-D toy distributions, sampled in torch and deterministic under a ``torch.Generator``.

* ``"moons"``: two interleaving half circles (the parametric form behind
  scikit-learn's ``make_moons``) plus N(0, 0.05^2) noise, centred on the
  origin: x in about [-1.6, 1.6], y in about [-0.9, 0.9].
* ``"checkerboard"``: uniform on the 8 "black" unit cells of a 4x4 board on
  [-2, 2]^2.
* ``"8gaussians"``: equal mixture of 8 isotropic Gaussians (std 0.15) centred
  on a circle of radius 1.5 at angles k·pi/4.

Every draw goes through ``generator`` on the CPU (then moved to ``device``), so
a seeded generator gives the same samples on every machine.
"""

from __future__ import annotations

import math

import torch

TOY2D_NAMES = ("moons", "checkerboard", "8gaussians")

MOONS_NOISE = 0.05
MOONS_SCALE = 1.0
GAUSS8_RADIUS = 1.5
GAUSS8_STD = 0.15


def _moons(n: int, g: torch.Generator | None) -> torch.Tensor:
    t = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    # upper moon: (cos t, sin t); lower moon: (1 - cos t, 0.5 - sin t)
    x = torch.where(upper, torch.cos(t), 1.0 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x, y], dim=1) + MOONS_NOISE * torch.randn(n, 2, generator=g, dtype=torch.float64)
    centre = torch.tensor([0.5, 0.25], dtype=torch.float64)
    return (pts - centre) * MOONS_SCALE


def _checkerboard(n: int, g: torch.Generator | None) -> torch.Tensor:
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4.0 - 2.0
    # x2 in [-2, -1) or [0, 1), then shifted up by one cell in odd columns
    x2 = torch.rand(n, generator=g, dtype=torch.float64) - 2.0 * torch.randint(0, 2, (n,), generator=g).double()
    x2 = x2 + torch.remainder(torch.floor(x1), 2.0)
    return torch.stack([x1, x2], dim=1)


def _eight_gaussians(n: int, g: torch.Generator | None) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=g).double()
    angle = k * (math.pi / 4.0)
    centres = GAUSS8_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + GAUSS8_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)


_SAMPLERS = {"moons": _moons, "checkerboard": _checkerboard, "8gaussians": _eight_gaussians}


def sample_toy2d(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` i.i.d. samples (n, 2) of toy distribution ``name`` (one of :data:`TOY2D_NAMES`).

    ``generator`` must be a CPU generator (``None`` uses torch's global RNG).
    """
    try:
        fn = _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"data.name={name!r} is unknown; use one of {', '.join(TOY2D_NAMES)}") from None
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("sample_toy2d needs a CPU torch.Generator (samples are drawn on the CPU, then moved)")
    return fn(int(n), generator).to(device=device, dtype=dtype)
