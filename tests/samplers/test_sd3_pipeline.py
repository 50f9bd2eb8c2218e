"""TwinFlowScheduler inside a real (tiny, offline) StableDiffusion3Pipeline equals the native UCGM sampler."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from fewstep import TwinFlowScheduler  # noqa: E402
from fewstep.samplers.ucgm import UCGMSampler  # noqa: E402

from helpers.tiny_sd3 import build_tiny_sd3_pipeline  # noqa: E402

PROMPT = "a red cat on a mat"
MAX_SEQ = 32
SIZE = 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def prompt_cond(pipe):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=PROMPT,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            device=torch.device("cpu"),
            max_sequence_length=MAX_SEQ,
        )
    return {"prompt_embeds": embeds, "pooled_projections": pooled}


def transformer_velocity(transformer):
    """The native model interface over a vanilla SD3 transformer (timestep = t·1000; tt unused by it)."""

    def model(x, t, tt, cond):
        return transformer(
            hidden_states=x,
            timestep=t * 1000,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    return model


def latents_for(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("step_noise", ["latents", "generator"])
@pytest.mark.parametrize("style", ["few", "any"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_pipeline_with_twinflow_scheduler_equals_native(pipe, prompt_cond, steps, style, step_noise):
    stochast = 1.0 if style == "few" else 0.0
    pipe.scheduler = TwinFlowScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_matching",
        shift=1.0,
        sampling_style=style,
        stochast_ratio=stochast,
        step_noise=step_noise,
    )
    latents = latents_for(steps)
    torch.manual_seed(1234)  # step_noise="generator": step() draws from the global RNG inside a pipeline
    out = pipe(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=0.0,
        latents=latents.clone(),
        max_sequence_length=MAX_SEQ,
        output_type="latent",
    ).images
    assert pipe.scheduler.step_index == steps  # every grid step ran once
    torch.manual_seed(1234 if step_noise == "generator" else 99)  # "latents": the global RNG plays no part
    native = UCGMSampler(style=style, stochast_ratio=stochast, step_noise=step_noise).sample(
        transformer_velocity(pipe.transformer), latents.clone(), prompt_cond, steps
    )
    diff = (out - native).abs().max().item()
    print(
        f"SD3 pipeline vs native, {style} {steps} steps, {step_noise}: max |diff| = {diff:.3e} "
        f"(|x| max {native.abs().max():.2f})"
    )
    assert out.shape == (1, 4, SIZE, SIZE) and torch.isfinite(out).all()
    assert (out - latents).abs().max().item() > 1e-2  # the transformer did something
    assert diff < 1e-5


def test_pipeline_decodes_images(pipe):
    pipe.scheduler = TwinFlowScheduler()
    images = pipe(
        [PROMPT, "a blue dog"],
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=MAX_SEQ,
        output_type="np",
    ).images
    assert images.shape == (2, SIZE, SIZE, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0


def test_pipeline_save_load_keeps_twinflow_scheduler(pipe, tmp_path):
    pipe.scheduler = TwinFlowScheduler(sampling_style="any", stochast_ratio=0.0)
    pipe.save_pretrained(tmp_path / "pipe")
    from diffusers import StableDiffusion3Pipeline

    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.scheduler, TwinFlowScheduler)
    assert loaded.scheduler.config.sampling_style == "any"


def test_custom_sigmas_and_timesteps_are_followed_and_a_bad_grid_is_refused(pipe, prompt_cond):
    """pipe(..., sigmas=[1.0, 0.5]) samples at t = 1 and 0.5 (not the UCGM grid [0.999, 0.6]): the native sampler
    driven on that grid gives the same latents (SD3's pipeline takes no timesteps=; SANA's does, and the scheduler
    tests pin them); an increasing grid is one error."""
    pipe.scheduler = TwinFlowScheduler(sampling_style="any", stochast_ratio=0.0)
    latents = latents_for(0)
    common = dict(height=SIZE, width=SIZE, guidance_scale=0.0, max_sequence_length=MAX_SEQ, output_type="latent")
    model = transformer_velocity(pipe.transformer)
    for grid, kwargs in (([1.0, 0.5], {"sigmas": [1.0, 0.5]}), ([0.9, 0.45, 0.2], {"sigmas": [0.9, 0.45, 0.2]})):
        out = pipe(PROMPT, latents=latents.clone(), **common, **kwargs).images
        assert pipe.scheduler.sigmas.tolist() == pytest.approx([*grid, 0.0], abs=1e-12)
        x = latents.double()
        with torch.no_grad():
            for t, t_next in zip([*grid], [*grid[1:], 0.0]):
                v = model(x.float(), torch.full((1,), t), torch.full((1,), t_next), prompt_cond).double()
                x = x + (t_next - t) * v  # the any-style, noiseless UCGM step is an Euler step
        assert (out - x.float()).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match=r"cannot follow sigmas=\[0\.5, 1\]: its values must decrease"):
        pipe(PROMPT, latents=latents.clone(), sigmas=[0.5, 1.0], **common)
