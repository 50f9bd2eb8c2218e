"""A pipeline exported by an earlier fewstep still loads and generates what it generated then: the fixture
tests/fixtures/export_v0 is a LoRA TwinFlow run of the tiny SD3 pipeline exported by fewstep at commit f7b3340 (the
flat package layout, before ``fewstep.export`` became a package; tests/fixtures/make_export_v0.py wrote it), with
the 2-step latents that export generated then (``expected_latents.safetensors``), its step noise drawn from the global
RNG (``step_noise="generator"`` today)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "export_v0"


def two_step(pipe, latents, seed=1234):
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)  # step_noise="generator": the stochastic few-step grid draws from the global RNG
    return pipe(
        "a red cat", height=16, width=16, num_inference_steps=2, guidance_scale=0.0, latents=latents.clone(),
        max_sequence_length=8, output_type="latent",
    ).images  # fmt: skip


@pytest.mark.slow
def test_an_export_of_the_earlier_layout_loads_and_generates_what_it_did(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    import fewstep  # noqa: F401 - all diffusers needs to find the exported classes
    from fewstep.export import load_lora_pipeline, load_pipeline
    from fewstep.samplers.scheduler import TwinFlowScheduler

    expected = load_file(str(FIXTURE / "expected_latents.safetensors"))
    index = json.loads((FIXTURE / "model_index.json").read_text())
    assert index["transformer"] == ["fewstep_models_sd3", "SD3TwinFlowTransformer2DModel"]
    assert index["scheduler"] == ["fewstep_samplers_scheduler", "TwinFlowScheduler"]
    # its scheduler config predates step_noise: it loads with the keyed default (the same latents whatever the
    # global seed), and with step_noise="generator" it generates what it generated then
    old_noise = TwinFlowScheduler.from_pretrained(FIXTURE, subfolder="scheduler", step_noise="generator")
    for load in (load_pipeline, StableDiffusion3Pipeline.from_pretrained):
        keyed = load(FIXTURE)
        assert keyed.scheduler.config.step_noise == "latents"
        first, second = two_step(keyed, expected["latents"], 1), two_step(keyed, expected["latents"], 2)
        assert torch.equal(first, second) and (first - expected["generated"]).abs().max().item() > 1e-2
        generated = two_step(load(FIXTURE, scheduler=old_noise), expected["latents"])
        assert (generated - expected["generated"]).abs().max().item() < 1e-5
    # the exported LoRA on the run's base pipeline (the tiny SD3 make_export_v0.py trained from, built again) equals
    # the merged export
    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    pipe = load_lora_pipeline(save_tiny_sd3_pipeline(tmp_path / "pipe"), FIXTURE / "lora")
    pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, step_noise="generator")
    assert (two_step(pipe, expected["latents"]) - expected["generated"]).abs().max().item() < 1e-4
