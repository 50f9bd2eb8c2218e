"""``data=synthetic``: random latents and prompt embeddings of a shipped architecture's real shapes.

For measuring step time and memory at real size with no download and no cache (``model.random_init=true``,
``python -m fewstep.bench``): the shapes are what the family's precompute writes for one sample at
``resolution`` (:mod:`fewstep.models.architectures`), the values are seeded Gaussian noise (masks all ones).
It has no evaluator; grids show the first three latent channels, not images (there is no VAE).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fewstep.data.base import Batch
from fewstep.models import architectures
from fewstep.models.family import families


class SyntheticData:
    num_classes = 0

    def __init__(
        self,
        architecture: str = "sd35_medium",
        resolution: int = 1024,
        batch_size: int = 1,
        text_tokens: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        arch = architectures.load(architecture)
        if resolution < arch.vae_scale_factor or resolution % arch.vae_scale_factor:
            raise architectures.ArchitectureError(
                f"data.resolution={resolution} must be a positive multiple of {arch.vae_scale_factor} "
                f"(the VAE factor of {architecture})"
            )
        self.architecture = arch
        self.shape = arch.latent_shape(resolution)
        self.batch_size = int(batch_size)
        self.text_tokens = self._text_tokens(architecture, text_tokens)

    def _text_tokens(self, architecture: str, text_tokens: int | None) -> int | None:
        """``text_tokens``: the valid prompt tokens of every sample (the rest is masked padding, which Qwen-Image
        drops before its transformer): for families whose prompts are padded to a length and masked."""
        if text_tokens is None:
            return None

        masked = [n for n in self.architecture.condition if n.endswith("mask")]
        length = families()[self.architecture.family].max_sequence_length
        if not masked or length is None:
            raise architectures.ArchitectureError(
                f"data.text_tokens={text_tokens}: {architecture}'s text condition has a fixed length "
                f"({self.architecture.condition['prompt_embeds'][0]} tokens, no padding mask); drop data.text_tokens"
            )
        width = self.architecture.condition[masked[0]][0]
        if not 1 <= text_tokens <= width:
            raise architectures.ArchitectureError(
                f"data.text_tokens={text_tokens} must lie in [1, {width}] ({architecture}'s padded prompt length)"
            )
        return int(text_tokens)

    def _cond(self, n: int, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
        cond = {}
        for name, shape in self.architecture.condition.items():
            if name.endswith("mask"):
                cond[name] = torch.ones(n, *shape)
            elif gen is None:  # the null condition: zeros, as an empty prompt's place holder
                cond[name] = torch.zeros(n, *shape)
            else:
                cond[name] = torch.randn(n, *shape, generator=gen)
            if gen is not None and self.text_tokens is not None and len(shape) >= 1:
                cond[name][:, self.text_tokens :] = 0  # padding past the prompt, as precompute writes it
        return cond

    def null_cond(self, n: int) -> dict[str, torch.Tensor]:
        return self._cond(n, None)

    def grid_conds(self, n: int) -> dict[str, torch.Tensor]:
        return self._cond(n, torch.Generator().manual_seed(1))

    def batches(self, seed: int, position: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        while True:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + position * world + rank) % (2**63))
            x = torch.randn(self.batch_size, *self.shape, generator=gen)
            yield Batch(x, self._cond(self.batch_size, gen), self.null_cond(self.batch_size))
            position += 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """A latent preview in [-1, 1] (channels 0–2, scaled by their spread): no VAE ships with an architecture."""
        rgb = x[:, :3].float()
        return (rgb / (3 * rgb.std().clamp_min(1e-6))).clamp(-1, 1)
