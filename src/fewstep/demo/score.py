"""Generate digits through a ``StableDiffusion3Pipeline`` and score them with the project's digits evaluator.

Each sample's prompt names a digit (:func:`fewstep.demo.images.prompts_for` of the protocol labels
:func:`~fewstep.eval.digits.eval_labels`, so every class in every phrasing); its initial latents are the protocol
noise (:func:`~fewstep.eval.digits.eval_noise`, seed 1234), the same for every pipeline scored. The decoded
RGB images go back to 8×8 grey digits (:func:`fewstep.demo.images.to_digits`) and
:class:`~fewstep.eval.digits.DigitsEvaluator` gives the class accuracy against the digit the prompt names
(``acc``), digits-FD, pixel-FD, precision and recall, against all 1,797 real digits.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fewstep.demo.images import prompts_for, to_digits
from fewstep.eval.digits import DigitsEvaluator, eval_labels, eval_noise


def load_sd3(folder, scheduler: str = "own"):
    """``StableDiffusion3Pipeline.from_pretrained(folder)`` (after ``import fewstep``, so an export's TwinFlow
    classes load), float32 on the CPU, progress bar off; ``scheduler="euler"`` swaps in diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (shift 1, the demo teacher's training times)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    import fewstep  # noqa: F401 - diffusers finds the exported classes through it

    kwargs = {"scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0)} if scheduler == "euler" else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], latents: torch.Tensor, steps: int, max_sequence_length: int,
             batch_size: int = 250) -> np.ndarray:  # fmt: skip
    """Images (N, H, W, 3) in [0, 1] for ``prompts`` from ``latents`` (N, C, h, w), ``steps`` steps, guidance 0."""
    side = latents.shape[-1] * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch_size):
        images = pipe(
            prompts[i : i + batch_size],
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=0.0,
            latents=latents[i : i + batch_size].clone(),
            max_sequence_length=max_sequence_length,
            output_type="np",
        ).images
        out.append(np.asarray(images))
    return np.concatenate(out)


def protocol_inputs(n: int, latent_shape: tuple[int, ...]) -> tuple[np.ndarray, list[str], torch.Tensor]:
    """The labels, prompts and initial latents of ``n`` scored samples."""
    labels = eval_labels(n).numpy()
    return labels, prompts_for(labels), eval_noise(latent_shape, n)


def score(pipe, n: int, steps: int, max_sequence_length: int, evaluator: DigitsEvaluator | None = None) -> dict:
    """Generate the ``n`` protocol samples with ``pipe`` at ``steps`` steps and score them (the evaluator's metrics,
    plus ``n``, ``steps`` and the generation time ``seconds``)."""
    evaluator = evaluator or DigitsEvaluator()
    latent_side = pipe.transformer.config.sample_size
    labels, prompts, latents = protocol_inputs(n, (pipe.transformer.config.in_channels, latent_side, latent_side))
    t0 = time.perf_counter()
    images = generate(pipe, prompts, latents, steps, max_sequence_length)
    seconds = time.perf_counter() - t0
    metrics = evaluator.evaluate(to_digits(images), labels)
    return {**{k: float(v) for k, v in metrics.items()}, "n": n, "steps": steps, "seconds": seconds}
