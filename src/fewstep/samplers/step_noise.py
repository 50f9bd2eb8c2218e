"""Step noise keyed on a trajectory's initial latents: the same images for the same starting noise, whatever the
batch, the chunking, the process or the tensor layout.

A stochastic UCGM step (``stochast_ratio > 0``) mixes fresh noise into the state. Diffusers pipelines call
``scheduler.step`` without their ``generator``, so noise drawn from a generator there can only come from the global
RNG. :class:`LatentKeyedNoise` draws it from the trajectory's own starting point instead:

* each row (sample) of the initial state gets a key: a hash (BLAKE2b) of its float32 values *sorted*;
* the noise of grid step ``i`` for that row is ``v[rank(x₀)]``: ``v`` is a standard normal vector drawn in float32
  from a CPU ``torch.Generator`` seeded with the hash of (key, ``i``), and ``rank(x₀)`` the position of each element's
  initial value among the row's distinct sorted values.

So the noise of a row depends only on that row's initial values (a batch built from a generator list equals the
single calls; any chunking or sharding of the rows gives the same samples), and it follows the row's elements
through any reordering: Qwen-Image's pipeline steps packed 2×2 tokens ``(B, L, 4C)`` while the native sampler steps
``(B, C, H, W)`` latents, and both draw the same noise for the same element. Elements are i.i.d. standard normal
(``v`` is, and the ranks only permute it), except that elements whose initial values are bit-identical within a row
share their noise: only values, not positions, are common to every layout. The initial values are read as float32
(with -0.0 as 0.0), so a float32 and a float64 copy of the same float32 noise give the same keys.
"""

from __future__ import annotations

import hashlib

import torch

_PERSON = b"fewstep-noise"  # BLAKE2b personalisation: these seeds are ours


def _seed(*parts: bytes) -> int:
    digest = hashlib.blake2b(b"".join(parts), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class LatentKeyedNoise:
    """Step noise keyed on ``initial`` (B, ...): ``draw(i, like)`` is step ``i``'s noise, shaped and laid out like
    ``initial`` (see the module docstring), in ``like``'s dtype and on its device."""

    def __init__(self, initial: torch.Tensor):
        if initial.dim() < 1 or initial.shape[0] < 1:
            raise ValueError(f"LatentKeyedNoise needs a batch of initial states, got shape {tuple(initial.shape)}.")
        self.shape = tuple(initial.shape)
        self._initial: torch.Tensor | None = initial.detach()
        self._ranks: torch.Tensor | None = None
        self._keys: list[int] = []

    def _prepare(self) -> None:
        """The rows' keys and ranks, computed at the first draw (a noiseless trajectory never needs them)."""
        rows = self._initial.to(device="cpu", dtype=torch.float32).reshape(self.shape[0], -1) + 0.0
        values, order = rows.sort(dim=1, stable=True)
        new = torch.ones_like(values, dtype=torch.bool)
        new[:, 1:] = values[:, 1:] != values[:, :-1]
        group = new.long().cumsum(1) - 1  # the rank of each sorted value among the row's distinct values
        self._ranks = torch.empty_like(group).scatter_(1, order, group)
        self._keys = [_seed(row.numpy().tobytes()) for row in values]
        self._initial = None

    @property
    def keys(self) -> list[int]:
        """Each row's key (a 63-bit integer)."""
        if self._ranks is None:
            self._prepare()
        return self._keys

    def row_noise(self, row: int, index: int) -> torch.Tensor:
        """Row ``row``'s step-``index`` noise, flat, float32 on the CPU."""
        key = self.keys[row]
        generator = torch.Generator().manual_seed(_seed(key.to_bytes(8, "little"), int(index).to_bytes(8, "little")))
        v = torch.randn(self._ranks.shape[1], generator=generator, dtype=torch.float32)
        return v[self._ranks[row]]

    def draw(self, index: int, like: torch.Tensor) -> torch.Tensor:
        if tuple(like.shape) != self.shape:
            raise ValueError(
                f"step noise keyed on initial latents of shape {self.shape} asked for shape {tuple(like.shape)}"
            )
        noise = torch.stack([self.row_noise(r, index) for r in range(self.shape[0])]).reshape(self.shape)
        return noise.to(device=like.device, dtype=like.dtype)
