"""Capture and restore every random generator a network pass can draw from.

Always used around teacher passes (SPEC §1: no opt-out): the state is taken
right before the student pass and put back before each teacher pass, so a
model with stochastic layers (dropout) draws the same masks in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RngState:
    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]

    @classmethod
    def capture(cls) -> RngState:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else ()
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(list(self.cuda))
