"""SDXL through the diff2flow bridge on a tiny offline ``StableDiffusionXLPipeline``: step-0 exactness, precompute
(pooled embeddings), a TwinFlow run, export and the pipeline sampling as the native sampler."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers import FAST, compose, read_shard


def save_tiny_sdxl_pipeline(folder):
    """Tiny SDXL (diffusers' fast-test sizes): two CLIP encoders (the second with a projection), a text_time UNet."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from helpers.tiny_sd3 import CLIP_MAX_LENGTH, _write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        str(_write_clip_tokenizer(folder.parent / "sdxl_tokenizer")), model_max_length=CLIP_MAX_LENGTH
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def test_sdxl_model_at_step_0_is_the_pretrained_unet_through_the_bridge(sdxl):
    """Zero-initialised time-pair embeddings: the model equals the pretrained UNet (epsilon → velocity by hand) with
    the pooled embedding and the bucket's (H, W, 0, 0, H, W) ids."""
    from diffusers import UNet2DConditionModel

    from fewstep.models.diff2flow import alpha_bar_from_flow_time, diffusion_timestep_from_flow_time
    from fewstep.models.sdxl import SDXLUNetModel

    model = SDXLUNetModel(pretrained=str(sdxl), time_pair=True)
    assert model.vae_scale_factor == 2
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 6, generator=g)
    embeds, pooled = torch.randn(2, 5, 64, generator=g), torch.randn(2, 32, generator=g)
    cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    t, tt = torch.tensor([0.3, 0.8]), torch.tensor([0.1, 0.0])
    with torch.no_grad():
        v = model(x, t, tt, cond)
        ab = alpha_bar_from_flow_time(t.double()).float()[:, None, None, None]
        a, b = ab.sqrt(), (1 - ab).sqrt()
        x_diff = (a + b) * x
        ids = torch.tensor([[16.0, 12, 0, 0, 16, 12]] * 2)
        eps = unet(
            x_diff, diffusion_timestep_from_flow_time(t, model.alphas_cumprod).float(), cond["prompt_embeds"],
            added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": ids},
        ).sample  # fmt: skip
        expected = eps - (x_diff - b * eps) / a
    assert (v - expected).abs().max().item() < 1e-5
    with pytest.raises(TypeError, match="pooled_prompt_embeds"):
        model(x, t, tt, {"prompt_embeds": cond["prompt_embeds"]})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sdxl_precompute_train_export_and_pipeline_equal_the_native_sampler(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from fewstep.data.latents import LatentData
    from fewstep.export.command import main as export_main
    from fewstep.models.sdxl import SDXLUNetModel
    from fewstep.precompute import main as precompute_main
    from fewstep.training.loop import train
    from fewstep.training.runs import load_run

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a red cat number {i}")
    cache = tmp_path / "cache"
    manifest = precompute_main(
        [f"pretrained={sdxl}", f"images={images}", f"out={cache}", "resolution=16", "batch_size=2",
         "embeds_dtype=float32", "progress=false"]
    )  # fmt: skip
    assert manifest["pipeline_class"] == "StableDiffusionXLPipeline"
    data = LatentData(str(cache), batch_size=2)
    assert sorted(data.cond_keys) == ["pooled_prompt_embeds", "prompt_embeds"]
    batch = next(data.batches(0))
    assert manifest["vae"]["scaling_factor"] == 0.13025
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    entry = manifest["shards"][0]
    rows = read_shard(cache / entry["file"], entry)
    with torch.no_grad():
        for i, name in enumerate(entry["files"]):  # both encoders' hidden states and the pooled projection, cached
            caption = (images / name).with_suffix(".txt").read_text()
            embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
            assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
            assert (rows["prompt_embeds"][i] - embeds[0]).abs().max().item() < 1e-5
            assert (rows["pooled_prompt_embeds"][i] - pooled[0]).abs().max().item() < 1e-5
    # the size / crop ids the model feeds a batch of this bucket: its pixel size (VAE scale 2), uncropped
    ids = SDXLUNetModel(pretrained=str(sdxl)).time_ids(batch.x)
    assert ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2

    cfg = compose(
        [
            "objective=twinflow", "sampler=ucgm", "model=sdxl", f"model.pretrained={sdxl}", "diff2flow.enabled=true",
            "objective.allow_diff2flow=true", "data=latents", f"data.path={cache}", "data.batch_size=2",
            "trainer.max_steps=3", "trainer.final_nfe=[1]", "trainer.grid_size=4", "trainer.lr=1e-2", *FAST,
        ]
    )  # fmt: skip
    run = tmp_path / "run"
    assert train(cfg, run_dir=run)["steps"] == 3
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    out = tmp_path / "export"
    info = export_main([f"run_dir={run}", f"out={out}"])
    assert info["family"] == "sdxl" and info["time_pair"]
    assert json.loads((out / "model_index.json").read_text())["unet"][1] == "TwinFlowUNet2DConditionModel"

    import fewstep  # noqa: F401

    exported = StableDiffusionXLPipeline.from_pretrained(out)
    exported.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    generated = exported(
        "a red cat", height=16, width=16, num_inference_steps=2, guidance_scale=0.0, latents=latents.clone(),
        output_type="latent",
    ).images  # fmt: skip
    scored = load_run(run, device="cpu", command="eval")
    with torch.no_grad():
        embeds, _, pooled, _ = exported.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=False)
        native = scored.sampler.sample(
            scored.model_fn("ema"), latents.clone(), {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, 2,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    difference = (generated - native).abs().max().item()
    print(f"sdxl: pipeline vs native max |diff| {difference:.3g}")
    assert difference < 1e-4 and (generated - latents).abs().max() > 1e-2
    assert batch.x.shape[1:] == (4, 8, 8)


@pytest.fixture(scope="module")
def sdxl_cache(sdxl, tmp_path_factory):
    from PIL import Image

    from fewstep.precompute import main as precompute_main

    root = tmp_path_factory.mktemp("sdxl_cache")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(4)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a blue dog number {i}")
    precompute_main(
        [f"pretrained={sdxl}", f"images={images}", f"out={root / 'cache'}", "resolution=16", "batch_size=2",
         "embeds_dtype=float32", "progress=false"]
    )  # fmt: skip
    return root / "cache"


def _lora_run(sdxl, cache, run, *extra):
    from fewstep.training.loop import train

    cfg = compose(
        [
            "objective=twinflow", "sampler=ucgm", "model=sdxl_lora", f"model.pretrained={sdxl}", "model.dtype=float32",
            "model.gradient_checkpointing=false", "model.lora.rank=4", "model.lora.alpha=8", "diff2flow.enabled=true",
            "objective.allow_diff2flow=true", "data=latents", f"data.path={cache}", "data.batch_size=2",
            "trainer.final_nfe=[1]", "trainer.lr=1e-2", *FAST, "trainer.grid_size=4", *extra,
        ]
    )  # fmt: skip
    summary = train(cfg, run_dir=run)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return summary


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sdxl_lora_run_resumes_exactly_and_its_lora_export_samples_as_the_native_sampler(sdxl, sdxl_cache, tmp_path):
    """A LoRA run trains only the adapter and the time-pair embeddings; resumed from its step-2 checkpoint it starts
    at step 2 and ends with the weights of the uninterrupted run; its lora/ export on the base pipeline samples as
    fewstep does."""
    from safetensors.torch import load_file

    from fewstep.export.command import main as export_main
    from fewstep.export.pipeline import load_lora_pipeline
    from fewstep.training.runs import load_run

    whole, split = tmp_path / "whole", tmp_path / "split"
    summary = _lora_run(sdxl, sdxl_cache, whole, "trainer.max_steps=4", "trainer.checkpoint_every=2")
    assert summary["steps"] == 4 and summary["trainable_params"] < summary["params"]
    # the run as if stopped after its step-2 checkpoint, then resumed
    shutil.copytree(whole, split)
    shutil.rmtree(split / "checkpoints" / "step_0000004")
    (split / "summary.json").unlink()
    resumed = _lora_run(
        sdxl, sdxl_cache, split, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.resume=auto"
    )
    assert resumed["start_step"] == 2 and resumed["steps"] == 4
    for name in ("model.safetensors", "teacher.safetensors"):
        a = load_file(str(whole / "checkpoints" / "step_0000004" / name))
        b = load_file(str(split / "checkpoints" / "step_0000004" / name))
        assert a.keys() == b.keys() and all(".lora_" in k or "_embedding." in k for k in a), name
        assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0, name
    shadow = load_file(str(whole / "checkpoints" / "step_0000004" / "teacher.safetensors"))
    assert shadow["target_embedding.linear_2.weight"].abs().max().item() > 1e-4  # the embeddings trained

    out = tmp_path / "export"
    info = export_main([f"run_dir={whole}", f"out={out}"])
    assert info["lora"] and {"pytorch_lora_weights.safetensors", "twinflow_embeddings.safetensors"} <= set(
        info["lora_files"]
    )
    pipe = load_lora_pipeline(sdxl, out / "lora")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "TwinFlowUNet2DConditionModel"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    generated = pipe(
        "a blue dog", height=16, width=16, num_inference_steps=2, guidance_scale=0.0, latents=latents.clone(),
        output_type="latent",
    ).images  # fmt: skip
    scored = load_run(whole, device="cpu", command="eval")
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a blue dog", device="cpu", do_classifier_free_guidance=False)
        native = scored.sampler.sample(
            scored.model_fn("ema"), latents.clone(), {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, 2,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    difference = (generated - native).abs().max().item()
    print(f"sdxl lora: lora pipeline vs native max |diff| {difference:.3g}")
    assert difference < 1e-4 and (generated - latents).abs().max() > 1e-2


def test_the_sdxl_lora_preset_has_the_quick_config_values():
    cfg = compose(["experiment=presets/sdxl_lora_2step", "data.path=CACHE"])
    o = cfg.objective
    assert (o.target_step_count, o.estimate_order, o.enhanced_ratio, o.delta_t, o.target_clamp) == (
        2,
        2,
        0.5,
        0.01,
        1.0,
    )
    assert cfg.trainer.lr == 1e-4 and cfg.teacher._target_.endswith("EMATeacher") and cfg.teacher.decay == 0.99
    assert o.allow_diff2flow and cfg.diff2flow.enabled and cfg.model._target_ == "fewstep.models.sdxl.SDXLUNetModel"
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_the_sdxl_lora_preset_trains_on_the_tiny_pipeline(sdxl, sdxl_cache, tmp_path, fresh_accelerator_state):
    from fewstep.training.loop import train

    cfg = compose(
        ["experiment=presets/sdxl_lora_2step", f"model.pretrained={sdxl}", f"data.path={sdxl_cache}",
         "data.batch_size=2", "model.lora.rank=4", "trainer.max_steps=2", "trainer.final_nfe=[2]", *FAST,
         "trainer.grid_size=4"]
    )  # fmt: skip
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 2 and np.isfinite(summary["loss"]) and summary["trainable_params"] < summary["params"]


def test_sdxl_random_init_builds_the_published_unet_and_synthetic_data_has_its_shapes():
    from fewstep.data.synthetic import SyntheticData
    from fewstep.models.architectures import ArchitectureError, load

    arch = load("sdxl_base")
    assert arch.family == "sdxl" and arch.class_name == "UNet2DConditionModel" and arch.vae_scale_factor == 8
    data = SyntheticData("sdxl_base", resolution=1024, batch_size=2)
    batch = next(data.batches(0))
    assert tuple(batch.x.shape) == (2, 4, 128, 128)
    assert {k: tuple(v.shape[1:]) for k, v in batch.cond.items()} == {
        "prompt_embeds": (77, 2048),
        "pooled_prompt_embeds": (1280,),
    }
    from fewstep.models.sdxl import SDXLUNetModel

    with pytest.raises(ArchitectureError, match="model.architecture=sd35_medium is a sd3 SD3Transformer2DModel"):
        SDXLUNetModel.random_unet("sd35_medium", None, torch.float32)
    with pytest.raises(ArchitectureError, match="a UNet is built whole"):
        SDXLUNetModel.random_unet("sdxl_base", 2, torch.float32)
