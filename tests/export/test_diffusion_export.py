"""Export of the diffusion families (diff2flow): an SD 1.x-style run → a ``StableDiffusionPipeline`` folder whose
``TwinFlowScheduler`` drives the epsilon / v UNet in flow space and samples as ``fewstep.sample`` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tests.test_precompute_export import run_precompute, save_tiny_sd15_pipeline

from helpers import FAST, compose


@pytest.fixture(scope="module")
def sd15_images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("sd15_images")
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red cat number {i}")
    return folder


def _pipeline(tmp_path, prediction_type):
    folder = save_tiny_sd15_pipeline(tmp_path / "sd15")
    if prediction_type != "epsilon":  # the same tiny UNet, declared a v-prediction model by its scheduler
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": prediction_type}))
    return folder


def _train(pretrained, cache, run_dir, prediction_type, lora):
    from fewstep.training.loop import train

    cfg = compose(
        [
            "objective=twinflow",
            "sampler=ucgm",
            "model=sd15",
            f"model.pretrained={pretrained}",
            f"model.prediction_type={prediction_type}",
            *(["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8"] if lora else []),
            "diff2flow.enabled=true",
            "objective.allow_diff2flow=true",
            "data=latents",
            f"data.path={cache}",
            "data.batch_size=2",
            "trainer.max_steps=3",
            "trainer.final_nfe=[1]",
            "trainer.grid_size=4",
            "trainer.lr=1e-2",
            *FAST,
        ]
    )
    summary = train(cfg, run_dir=run_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return summary


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("prediction_type, lora", [("epsilon", False), ("v_prediction", True)], ids=["eps", "v-lora"])
def test_sd15_run_exports_a_pipeline_that_samples_as_the_native_sampler(sd15_images, tmp_path, prediction_type, lora):
    from diffusers import StableDiffusionPipeline

    from fewstep.export.command import main as export_main
    from fewstep.export.pipeline import load_lora_pipeline
    from fewstep.training.runs import load_run

    pretrained = _pipeline(tmp_path, prediction_type)
    run_precompute(pretrained, sd15_images, tmp_path / "cache")
    run = tmp_path / "run"
    assert _train(pretrained, tmp_path / "cache", run, prediction_type, lora)["steps"] == 3
    out = tmp_path / "export"
    info = export_main([f"run_dir={run}", f"out={out}"])
    assert info["family"] == "sd15" and info["time_pair"] and info["lora"] == lora and info["step"] == 3
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["fewstep_models_diffusion", "TwinFlowUNet2DConditionModel"]
    assert index["scheduler"] == ["fewstep_samplers_scheduler", "TwinFlowScheduler"]
    scheduler_config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == prediction_type
    assert scheduler_config["beta_schedule"] == "scaled_linear" and scheduler_config["beta_end"] == 0.012

    import fewstep  # noqa: F401 - registers the exported classes' library names

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "TwinFlowUNet2DConditionModel"
    # the trained target-time embedding is no longer zero: the pipeline path must feed it the step's flow times
    assert pipe.unet.target_embedding.linear_2.weight.abs().max().item() > 1e-4
    prompt = "a red cat"
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))

    def two_step_latents(p):
        return p(
            prompt, height=16, width=16, num_inference_steps=2, guidance_scale=0.0, latents=latents.clone(),
            output_type="latent",
        ).images  # fmt: skip

    generated = two_step_latents(pipe)
    assert torch.isfinite(generated).all() and (generated - latents).abs().max() > 1e-2

    scored = load_run(run, device="cpu", command="eval")
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        native = scored.sampler.sample(
            scored.model_fn("ema"), latents.clone(), {"prompt_embeds": embeds}, 2,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    difference = (generated - native).abs().max().item()
    assert difference < 1e-4, difference
    for steps in (1, 4):  # the other step counts of the issue, on the same grid as the native sampler's
        mine = pipe(
            prompt, height=16, width=16, num_inference_steps=steps, guidance_scale=0.0, latents=latents.clone(),
            output_type="latent",
        ).images  # fmt: skip
        with torch.no_grad():
            theirs = scored.sampler.sample(
                scored.model_fn("ema"), latents.clone(), {"prompt_embeds": embeds}, steps,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
        assert (mine - theirs).abs().max().item() < 1e-4, steps
    card = (out / "README.md").read_text()
    assert "StableDiffusionPipeline" in card and "num_inference_steps=2" in card and "guidance_scale=0.0" in card
    print(f"{prediction_type} lora={lora}: pipeline vs native max |diff| {difference:.3g}")
    # the step's flow times matter: unmarked by the scheduler, the first step's input gets t from its diffusion
    # timestep, clamped to the schedule's noisiest σ (0.936 < 0.999), and the trained embedding answers differently
    pipe.scheduler.set_timesteps(2)
    marked = pipe.scheduler.scale_model_input(latents, pipe.scheduler.timesteps[0])
    assert marked.fewstep_flow_times == (pytest.approx(0.999), 0.0)
    with torch.no_grad():
        call = [pipe.scheduler.timesteps[0], embeds]
        assert (pipe.unet(marked, *call).sample - pipe.unet(marked.clone(), *call).sample).abs().max() > 1e-5
    if lora:
        assert {"pytorch_lora_weights.safetensors", "twinflow_embeddings.safetensors"} <= set(info["lora_files"])
        lora_pipe = load_lora_pipeline(pretrained, out / "lora")
        lora_pipe.set_progress_bar_config(disable=True)
        assert type(lora_pipe.unet).__name__ == "TwinFlowUNet2DConditionModel"
        from_lora = two_step_latents(lora_pipe)
        assert (from_lora - native).abs().max().item() < 1e-4
