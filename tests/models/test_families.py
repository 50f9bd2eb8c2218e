"""SANA and Qwen-Image on tiny offline pipelines (tests/helpers/tiny_families.py): step-0 exactness of the time-pair
embeddings (full and LoRA), LoRA trainables / EMA, precompute with the family's VAE and encode_prompt, the
cache/family mismatch error, and (slow) TwinFlow training 3 steps → export → ``<Family>Pipeline.from_pretrained``
generating in 2 steps equal to the native sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import compose

LORA = {"enabled": True, "rank": 4, "alpha": 8}
FAMILIES = ["sana", "qwenimage"]
# per family: image side (px; SANA's pipeline wants multiples of 32), text length, latent channels
SIDE = {"sana": 32, "qwenimage": 16}
MAX_SEQ = {"sana": 8, "qwenimage": 200}  # the tiny Qwen tokenizer is byte-level: its chat template is ~180 tokens
CHANNELS = 4


def model_class(family):
    from fewstep.models.family import family_named

    return family_named(family).model_class


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pretrained(family, tmp_path_factory):
    from helpers.tiny_families import save_tiny_pipeline

    return save_tiny_pipeline(family, tmp_path_factory.mktemp(family) / "pipe")


@pytest.fixture(scope="module")
def pipe(family, pretrained):
    import diffusers

    from fewstep.models.family import family_named

    pipe = getattr(diffusers, family_named(family).pipeline_class).from_pretrained(pretrained)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(family, pipe, prompts):
    """The family's condition for ``prompts`` (as the cache stores it)."""
    from fewstep.models.family import family_named

    options = {"complex_human_instruction": "none"}
    with torch.no_grad():
        return family_named(family).encode_text(pipe, prompts, torch.device("cpu"), MAX_SEQ[family], options)


def vanilla_velocity(family, pipe, x, t, cond):
    """The pretrained transformer called as its pipeline calls it."""
    from fewstep.models.qwenimage import pack_latents, trim_text, unpack_latents

    with torch.no_grad():
        if family == "sana":
            return pipe.transformer(
                x,
                cond["prompt_embeds"],
                t.abs() * 1000,
                encoder_attention_mask=cond["prompt_attention_mask"],
                return_dict=False,
            )[0]
        embeds, mask = trim_text(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        b, _, h, w = x.shape
        out = pipe.transformer(
            hidden_states=pack_latents(x),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            timestep=t.abs(),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


def inputs(family, pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, CHANNELS, 6, 4, generator=g)
    t = torch.tensor([1.0, 0.7, -0.4, -0.9])
    tt = torch.tensor([0.0, 0.2, -0.4, -0.9])
    return x, t, tt, encode(family, pipe, ["a red cat", "dog", "a blue bird on a branch", ""])


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_step0_output_equals_the_pretrained_transformer(family, pretrained, pipe, lora):
    x, t, tt, cond = inputs(family, pipe)
    reference = vanilla_velocity(family, pipe, x, t, cond)
    model = model_class(family)(pretrained=str(pretrained), time_pair=True, lora=lora, data_shape=[CHANNELS, 6, 4])
    assert model.has_time_pair()
    with torch.no_grad():
        out = model(x, t, tt, cond)
    assert out.shape == x.shape and torch.equal(out, reference)  # bit-exact: the extras start at zero
    assert reference.abs().max().item() > 1e-2
    with torch.no_grad():  # and they act once trained: the sign row changes negative-time rows only
        model.transformer.get_submodule(model.time_embed_attr).sign_embedding.weight[1].normal_()
        changed = (model(x, t, tt, cond) - out).flatten(1).abs().amax(1) > 1e-6
    assert changed.tolist() == [False, False, True, True]


def test_lora_trains_adapters_and_embeddings_and_the_ema_holds_only_them(family, pretrained, pipe):
    from fewstep.teachers import EMATeacher

    model = model_class(family)(pretrained=str(pretrained), time_pair=True, lora=LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = model.time_pair_prefixes()
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name or name.removeprefix("transformer.").startswith(prefixes)
    assert any(".target_embedder." in n for n in trainable) and any(".sign_embedding." in n for n in trainable)
    assert not any("target_embedder" in n and "lora_" in n for n, _ in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    teacher = EMATeacher(decay=0.99)
    teacher.bind(model)
    assert set(teacher.shadow) == trainable
    x, t, tt, cond = inputs(family, pipe)
    model(x, t, tt, cond).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads <= trainable and any(".lora_" in n for n in grads)
    assert any(".sign_embedding." in n for n in grads) and any(".target_embedder." in n for n in grads)


def test_the_pipeline_on_the_exported_transformer_equals_the_native_sampler_for_a_ragged_non_square_batch(
    family, pretrained, pipe
):
    """Two prompts of different lengths (a mask with padding), a non-square latent (Qwen-Image: 4 × 8, packed 2 × 4;
    SANA: 16 × 32) and the ``any`` style (tt = t_next, read from the scheduler) with non-zero time-pair embeddings:
    the family's pipeline on the exported transformer gives the native UCGM sampler's latents on the fewstep model
    (cond from the cache encoder, padded to ``max_sequence_length``) for the same noise."""
    from fewstep.models.qwenimage import pack_latents, unpack_latents
    from fewstep.samplers.scheduler import TwinFlowScheduler
    from fewstep.samplers.ucgm import UCGMSampler

    model = model_class(family)(pretrained=str(pretrained), time_pair=True)
    emb = model.transformer.get_submodule(model.time_embed_attr)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in [*emb.target_embedder.parameters(), emb.sign_embedding.weight]:
            p.normal_(0, 0.3)
    scheduler = TwinFlowScheduler(sampling_style="any", stochast_ratio=0.0)
    exported = type(pipe)(**{**pipe.components, "transformer": model.export_transformer(), "scheduler": scheduler})
    exported.set_progress_bar_config(disable=True)
    exported.transformer.use_scheduler_target_time(scheduler)
    prompts = ["cat", "a blue bird on a branch by the sea"]
    cond = encode(family, exported, prompts)
    mask = cond["prompt_attention_mask" if family == "sana" else "prompt_embeds_mask"]
    assert len(set(mask.sum(1).tolist())) == 2 and mask.shape[1] == MAX_SEQ[family]  # ragged, padded
    scale = 2 if family == "sana" else 4
    h, w = SIDE[family] // scale, 2 * SIDE[family] // scale
    latents = torch.randn(2, CHANNELS, h, w, generator=torch.Generator().manual_seed(3))
    size = {"height": SIDE[family], "width": 2 * SIDE[family], "num_inference_steps": 2, "output_type": "latent"}
    with torch.no_grad():
        if family == "sana":
            out = exported(prompts, latents=latents.clone(), guidance_scale=0.0, max_sequence_length=MAX_SEQ[family],
                           complex_human_instruction=None, use_resolution_binning=False, **size).images  # fmt: skip
            native = UCGMSampler(style="any", stochast_ratio=0.0).sample(model, latents.clone(), cond, 2)
        else:
            packed = exported(prompts, latents=pack_latents(latents), max_sequence_length=MAX_SEQ[family], **size)
            out = unpack_latents(packed.images, h, w)
            native = UCGMSampler(style="any", stochast_ratio=0.0).sample(model, latents.clone(), cond, 2)
    assert (native - latents).abs().max().item() > 1.0
    assert (out - native).abs().max().item() < 1e-5


def test_qwenimage_default_lora_targets_are_the_reference_list(tmp_path):
    from fewstep.config.schema import QWENIMAGE_LORA_TARGETS
    from fewstep.models.qwenimage import QwenImageModel

    cfg = compose(["model=qwenimage_lora"])
    assert list(cfg.model.lora.target_modules) == QWENIMAGE_LORA_TARGETS == list(QwenImageModel.default_lora_targets)
    assert len(QWENIMAGE_LORA_TARGETS) == 14 and cfg.model.lora.rank == 64 and cfg.model.lora.alpha == 64


# --------------------------------------------------------------------------- precompute


@pytest.fixture(scope="module")
def images(family, tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp(f"images_{family}")
    rng = np.random.default_rng(0)
    side = SIDE[family]
    meta = []
    for i in range(5):
        w, h = (side, side) if i < 4 else (side * 5 // 4, side)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        meta.append({"file_name": f"img{i}.png", "text": f"a red cat number {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    return folder


def run_precompute(family, pretrained, images, out, *extra):
    from fewstep.precompute import main

    return main(
        [
            f"pretrained={pretrained}",
            f"images={images}",
            f"out={out}",
            f"resolution={SIDE[family]}",
            "batch_size=2",
            f"max_sequence_length={MAX_SEQ[family]}",
            "embeds_dtype=float32",
            "complex_human_instruction=none",
            "progress=false",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def cache(family, pretrained, images, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cache_{family}")
    run_precompute(family, pretrained, images, out)
    return out


def test_precompute_uses_the_family_vae_and_encode_prompt(family, pipe, cache, images):
    from fewstep.data.latents import LatentData
    from fewstep.data.shards import LatentCacheError, ShardReader
    from fewstep.models.family import family_named
    from fewstep.precompute import load_image

    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["family"] == family and manifest["summary"]["encoded"] == 5
    side = SIDE[family]
    assert (
        f"{CHANNELS}x{side // (2 if family == 'sana' else 4)}x{side // (2 if family == 'sana' else 4)}"
        in (manifest["summary"]["latent_buckets"])
    )
    square = next(e for e in manifest["shards"] if e["latent_shape"][1] == e["latent_shape"][2])
    tensors = load_file(str(cache / square["file"]))
    name = square["files"][0]
    h, w = square["latent_shape"][1:]
    pixels = load_image(images / name, (side, side))[None]
    with torch.no_grad():
        if family == "sana":
            expected = pipe.vae.encode(pixels).latent * pipe.vae.config.scaling_factor
            embeds, mask, _, _ = pipe.encode_prompt(
                "a red cat number " + name[3],
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQ[family],
                complex_human_instruction=None,
            )
            key = "prompt_attention_mask"
            assert manifest["vae"] == {"scaling_factor": 0.41407, "shift_factor": 0.0}
        else:
            raw = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
            mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1)
            expected = (raw - mean) / std
            embeds, mask = pipe.encode_prompt("a red cat number " + name[3], max_sequence_length=MAX_SEQ[family])
            mask = torch.ones(embeds.shape[:2]) if mask is None else mask
            key = "prompt_embeds_mask"
            assert manifest["vae"]["latents_std"] == [1.5, 0.8, 1.2, 1.0]
    # stored: bf16 latents, the masked embedding's valid tokens only (ragged), the mask as bool
    assert tensors["latents"].dtype == torch.bfloat16 and "prompt_embeds" not in tensors
    assert tensors[key].dtype == torch.bool and tensors["prompt_embeds.tokens"].shape[0] == int(tensors[key].sum())
    reader = ShardReader(cache / square["file"], square, False, None, LatentCacheError)
    latents, row = reader.latents(0), reader.cond(0)  # read back: float32, padded to the fixed length
    assert torch.allclose(latents[0], expected[0], atol=1e-5, rtol=2**-8)
    n = embeds.shape[1]
    assert row["prompt_embeds"].shape[1] == MAX_SEQ[family]  # padded to a fixed length, with the mask
    valid = mask[0].bool()
    assert torch.allclose(row["prompt_embeds"][0, :n][valid], embeds[0][valid], atol=1e-5)
    assert row["prompt_embeds"][0, :n][~valid].abs().sum() == 0 and row["prompt_embeds"][0, n:].abs().sum() == 0
    assert torch.equal(row[key][0, :n], mask[0].float()) and row[key][0, n:].sum() == 0
    null_prompt = family_named(family).null_prompt(None)
    assert manifest["null_prompt"] == null_prompt == ("Generate an image." if family == "qwenimage" else "")
    data = LatentData(str(cache), batch_size=2)
    assert data.family.name == family
    decoded = data.decode(next(data.batches(0)).x)  # sample grids decode with the family's VAE
    assert decoded.shape[1] == 3 and decoded.shape[-1] == side and decoded.abs().max() <= 1


def test_precompute_refuses_a_missing_instruction_file_before_loading(family, pretrained, images, tmp_path):
    with pytest.raises(SystemExit) as err:
        run_precompute(family, pretrained, images, tmp_path / "c", f"complex_human_instruction={tmp_path / 'no.txt'}")
    assert str(err.value).startswith("error: complex_human_instruction=") and "\n" not in str(err.value)


def test_a_cache_of_one_family_fails_with_another_model_in_one_line(family, cache):
    from fewstep.config.validate import ConfigError, validate

    other = "qwenimage" if family == "sana" else "sd35"
    cfg = compose([f"model={other}", "objective=twinflow", "data=latents", f"data.path={cache}"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message and f"for the {family} family" in message
    assert f"is the {'qwenimage' if other == 'qwenimage' else 'sd3'} family" in message


# --------------------------------------------------------------------------- train → export → generate


def pipeline_latents(family, pipe, latents, prompt):
    """2-step generation from ``latents`` (B, C, h, w) at guidance 0, as (B, C, h, w) latents."""
    from fewstep.models.qwenimage import pack_latents, unpack_latents

    side = SIDE[family]
    if family == "sana":
        return pipe(
            prompt,
            height=side,
            width=side,
            num_inference_steps=2,
            guidance_scale=0.0,
            latents=latents.clone(),
            max_sequence_length=MAX_SEQ[family],
            complex_human_instruction=None,
            use_resolution_binning=False,
            output_type="latent",
        ).images
    out = pipe(
        prompt,
        height=side,
        width=side,
        num_inference_steps=2,
        latents=pack_latents(latents.clone()),
        max_sequence_length=MAX_SEQ[family],
        output_type="latent",
    ).images
    return unpack_latents(out, *latents.shape[2:])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_export_and_generate_in_two_steps(family, pretrained, cache, tmp_path, lora):
    import diffusers

    from fewstep.export.command import main as export_main
    from fewstep.export.pipeline import load_lora_pipeline
    from fewstep.models.family import family_named
    from fewstep.samplers.ucgm import UCGMSampler
    from fewstep.training.runs import load_run
    from test_precompute_export import train_run  # the same 3-step TwinFlow run as the SD3 test

    model_name = f"{family}_lora" if lora else family
    run = tmp_path / "run"
    summary = train_run(pretrained, cache, run, model_name)
    assert summary["steps"] == 3 and np.isfinite(summary["loss"])
    if lora:
        assert summary["trainable_params"] < summary["params"]
        shadow = load_file(str(run / "checkpoints" / "step_0000003" / "teacher.safetensors"))
        assert all(".lora_" in k or ".target_embedder." in k or ".sign_embedding." in k for k in shadow)
    out = tmp_path / "export"
    info = export_main([f"run_dir={run}", f"out={out}"])
    assert info["family"] == family and info["time_pair"] and info["step"] == 3
    index = json.loads((out / "model_index.json").read_text())
    export_class = family_named(family).model_class.export_class
    assert index["transformer"] == [export_class.__module__.replace(".", "_"), export_class.__name__]
    assert index["scheduler"] == ["fewstep_samplers_scheduler", "TwinFlowScheduler"]
    assert (out / "transformer" / f"{index['transformer'][0]}.py").exists()  # the class's code, in the folder

    import fewstep  # noqa: F401 - all diffusers needs to find the exported classes (fewstep.export.code)

    pipeline_cls = getattr(diffusers, family_named(family).pipeline_class)
    exported = pipeline_cls.from_pretrained(out)
    exported.set_progress_bar_config(disable=True)
    assert type(exported.transformer) is export_class
    side = SIDE[family] // (2 if family == "sana" else 4)
    latents = torch.randn(1, CHANNELS, side, side, generator=torch.Generator().manual_seed(3))
    generated = pipeline_latents(family, exported, latents, "a red cat")
    assert torch.isfinite(generated).all() and (generated - latents).abs().max() > 1e-3

    # the native sampler on the weights fewstep.eval / fewstep.sample load (the run's teacher, built and restored
    # by the training code), not on fewstep.export's own loader, which would agree with the export by construction
    scored = load_run(run, device="cpu", command="eval")
    cond = encode(family, exported, ["a red cat"])
    # the run's sampler as fewstep.sample builds it (the reference few-step preset, step noise keyed on the initial
    # latents): the same images as the pipeline, Qwen-Image's packed tokens included, no layout of its own needed
    assert isinstance(scored.sampler, UCGMSampler) and scored.sampler.step_noise == "latents"
    native = scored.sampler.sample(scored.model_fn("ema"), latents.clone(), cond, 2, generator=torch.Generator())
    assert (generated - native).abs().max().item() < 1e-4

    if lora:
        assert {"pytorch_lora_weights.safetensors", "twinflow_embeddings.safetensors"} <= set(info["lora_files"])
        lora_pipe = load_lora_pipeline(pretrained, out / "lora")
        lora_pipe.set_progress_bar_config(disable=True)
        assert (pipeline_latents(family, lora_pipe, latents, "a red cat") - generated).abs().max().item() < 1e-4


def test_the_qwenimage_launch_config_is_a_plain_multi_process_one_and_the_shard_units_are_the_blocks():
    """scripts/accelerate/fsdp_qwenimage.yaml is a plain 8-process bf16 Accelerate config (fewstep shards the model
    itself, trainer.distributed=fsdp); the shard units of every family are its transformer blocks, found by one rule
    (``_no_split_modules``), and a model without that attribute falls back to its ``*blocks`` lists."""
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig
    from diffusers import QwenImageTransformer2DModel, SD3Transformer2DModel

    from fewstep.models.tiny import TinyMLP
    from fewstep.training.distributed import shard_units

    path = Path(__file__).resolve().parents[2] / "scripts" / "accelerate" / "fsdp_qwenimage.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert str(config.distributed_type).endswith("MULTI_GPU") and config.mixed_precision == "bf16"
    assert config.num_processes == 8
    qwen = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    assert shard_units(torch.nn.ModuleDict({"transformer": qwen})) == list(qwen.transformer_blocks)
    sd3 = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    )  # fmt: skip
    assert shard_units(sd3) == list(sd3.transformer_blocks)
    tiny = TinyMLP(data_shape=[2], width=8, depth=3, emb_dim=4)
    assert shard_units(tiny) == list(tiny.blocks) and len(tiny.blocks) == 3


def test_an_accelerate_fsdp_config_is_refused_with_the_fewstep_option_to_use():
    """No Accelerate FSDP config: no problem (DDP, single-process and trainer.distributed=fsdp runs). An Accelerate
    FSDP config (never sharding on CPU, a second wrapping on GPU): one line naming trainer.distributed=fsdp."""
    from fewstep.training.loop import sharding_problem

    assert sharding_problem(False) is None
    assert "trainer.distributed=fsdp" in sharding_problem(True) and "--multi_gpu" in sharding_problem(True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_an_fsdp_launch_on_cpu_stops_with_one_error_line_per_process(family, pretrained, cache, tmp_path):
    """`accelerate launch --use_fsdp --num_processes 2` of a full Qwen-Image TwinFlow run on this CPU-only machine
    (Accelerate 1.15 cannot shard here: its FSDP plugin raises "no available devices", or runs DDP replicas): fewstep
    stops before building anything, with one `error:` line per process naming trainer.distributed=fsdp."""
    import subprocess
    import sys

    if family != "qwenimage" or torch.cuda.is_available():
        pytest.skip("one family is enough; on GPUs Accelerate's own FSDP would start")
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
        "--fsdp_sync_module_states", "true", "--num_processes", "2", "--mixed_precision", "no", "-m", "fewstep",
        "objective=twinflow", "sampler=ucgm", "model=qwenimage", f"model.pretrained={pretrained}", "data=latents",
        f"data.path={cache}", "data.batch_size=2", "trainer.max_steps=3", "logger=none", f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert all("asks for Accelerate's FSDP" in e and "trainer.distributed=fsdp" in e for e in errors)
    assert "no available devices" not in proc.stderr  # stopped before Accelerate's own RuntimeError
    assert not (run / "checkpoints").exists()


def launch_qwen(pretrained, cache, run, *extra):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of a full Qwen-Image TwinFlow run into ``run``
    (lr 1e-2 constant, a checkpoint every 2 steps, a loss row every step)."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fewstep",
        "objective=twinflow", "sampler=ucgm", "model=qwenimage", f"model.pretrained={pretrained}", "data=latents",
        f"data.path={cache}", "data.batch_size=2", "trainer.lr=1e-2", "trainer.lr_schedule=constant",
        "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.final_nfe=[1]", "trainer.grid_size=4",
        "trainer.sample_every=1000", "trainer.evaluate=false", "trainer.baseline_steps=0", "logger=none",
        f"hydra.run.dir={run}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=run.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def resumed_at_step_2(run, split):
    """A run folder ``split`` that holds only ``run``'s step-2 checkpoint (written mid-run by checkpoint_every=2,
    as a 2-step run would leave it): ``trainer.resume=auto`` there goes on from step 2 without a 2-step launch."""
    import shutil

    shutil.copytree(run / "checkpoints" / "step_0000002", split / "checkpoints" / "step_0000002")
    return split


@pytest.fixture(scope="module")
def qwen_ddp_run(family, pretrained, cache, tmp_path_factory):
    """3 steps of the full Qwen-Image TwinFlow run under 2-process DDP: the DDP test's uninterrupted run and the
    FSDP test's reference."""
    return launch_qwen(pretrained, cache, tmp_path_factory.mktemp("qwen_ddp") / "straight", "trainer.max_steps=3")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_full_qwenimage_under_two_process_ddp_resumes_to_the_same_weights(family, pretrained, cache, tmp_path, request):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of a full Qwen-Image TwinFlow run: the last
    block's text stream gets no gradient, which stopped DDP at step 2 ("Expected to have finished reduction") until
    the model asked for DDP's unused-parameter search. 3 steps straight equal a resume=auto from their step-2
    checkpoint to 3, bit for bit; the EMA holds every trainable tensor at its full shape."""
    if family != "qwenimage":
        pytest.skip("the unused text stream is Qwen-Image's")
    straight = request.getfixturevalue("qwen_ddp_run")
    split = resumed_at_step_2(straight, tmp_path / "split")
    launch_qwen(pretrained, cache, split, "trainer.max_steps=3", "trainer.resume=auto")
    resumed = json.loads((split / "summary.json").read_text())
    assert (resumed["start_step"], resumed["steps"], resumed["num_processes"]) == (2, 3, 2)  # 1 step from step 2
    assert [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()] == [3]
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert (
        len(losses) == 3
        and all(np.isfinite(losses))
        and json.loads((straight / "summary.json").read_text())["num_processes"] == 2
    )
    a, b = (run / "checkpoints" / "step_0000003" for run in (straight, split))
    model = load_file(str(a / "model.safetensors"))
    for name in ("model.safetensors", "teacher.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ema = load_file(str(a / "teacher.safetensors"))
    assert ema.keys() <= model.keys() and len(ema) == 82  # every parameter of the tiny transformer
    assert all(ema[k].shape == model[k].shape for k in ema)
    assert "transformer.transformer_blocks.1.txt_mlp.net.2.weight" in ema  # still trained (and averaged), no grad
    first = load_file(str(a.parent / "step_0000002" / "model.safetensors"))
    assert max((model[k] - first[k]).abs().max().item() for k in model) > 1e-3  # step 3 moved the weights


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_full_qwenimage_under_two_process_fsdp_is_sharded_matches_ddp_resumes_and_loads_unsharded(
    family, pretrained, cache, tmp_path, request
):
    """`accelerate launch --multi_gpu --num_processes 2 ... trainer.distributed=fsdp` (gloo on CPU; torch FSDP2, one
    shard unit per QwenImageTransformerBlock, gradient checkpointing, EMA 0.99) of a full Qwen-Image TwinFlow run:
    (a) each process holds half of the 205,504 parameter elements; (b) losses and weights match the same run under
    2-process DDP (the DDP test's run, shared; it has no gradient checkpointing, which recomputes the same forward;
    measured: losses 2.4e-7, weights 5.3e-6, AdamW moments 2.2e-8 apart after 3 steps at lr 1e-2, as against the
    checkpointed DDP run; the math is the same, only the reduction order differs); (c) a resume=auto from its step-2
    checkpoint to 3 under FSDP equals 3 steps straight bit for bit; (d) the checkpoint has the unsharded format:
    fewstep.export's loader reads it, and a single process (grad_accum 2, the same global batch) resumes it to step 3
    within 1.5e-8 of the FSDP run (EMA equal); (e) the sharded EMA equals DDP's (measured 2.0e-6). Also: with
    trainer.mixed_precision=bf16 (bf16 gathered weights, fp32 reduction) the run stays finite, keeps fp32 weights,
    and every rank takes part in the validation grid's sampling while rank 0 writes it."""
    from fewstep.export.pipeline import load_run_model
    from test_precompute_export import train_run

    from helpers.moments import assert_moments_close

    if family != "qwenimage":
        pytest.skip("one family: Qwen-Image full is the run that needs sharding")
    common = ["trainer.lr=1e-2", "trainer.lr_schedule=constant", "trainer.checkpoint_every=2"]

    def launch(run, *extra):
        return launch_qwen(pretrained, cache, run, "model.gradient_checkpointing=true", *extra)

    fsdp = ["trainer.distributed=fsdp", "trainer.checkpoint_format=full"]  # whole tensors (the sharded format:
    sharded = launch(tmp_path / "fsdp", "trainer.max_steps=3", *fsdp)  # tests/training/test_sharded_checkpoint.py)
    replicated = request.getfixturevalue("qwen_ddp_run")  # the DDP test's run (checkpointing recomputes alike)
    split = resumed_at_step_2(sharded, tmp_path / "split")
    launch(split, "trainer.max_steps=3", "trainer.resume=auto", *fsdp)
    resumed = json.loads((split / "summary.json").read_text())
    assert (resumed["start_step"], resumed["steps"], resumed["distributed"]) == (2, 3, "fsdp")  # 1 step from step 2

    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["distributed"] == "fsdp" and summary["params"] == 205_504
    assert summary["params_per_process"] == [102_752, 102_752]  # (a)
    assert json.loads((replicated / "summary.json").read_text())["params_per_process"] == [205_504, 205_504]

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    def worst(a, b):
        assert a.keys() == b.keys()
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    def files(run, name, step=3):
        return load_file(str(run / "checkpoints" / f"step_{step:07d}" / name))

    assert len(losses(sharded)) == 3 and max(abs(a - b) for a, b in zip(losses(sharded), losses(replicated))) < 1e-5
    assert worst(files(sharded, "model.safetensors"), files(replicated, "model.safetensors")) < 5e-5  # (b)
    assert worst(files(sharded, "teacher.safetensors"), files(replicated, "teacher.safetensors")) < 5e-5  # (e)
    assert worst(files(sharded, "model.safetensors"), files(sharded, "model.safetensors", 2)) > 1e-3  # not vacuous
    optim = [torch.load(run / "checkpoints" / "step_0000003" / "optim.pt", weights_only=True)["optimizer"]["state"]
             for run in (sharded, replicated, split)]  # fmt: skip
    assert optim[0].keys() == optim[1].keys() and len(optim[0]) == 76  # 82 tensors, 6 never get a gradient
    assert_moments_close(optim[0], optim[1])  # relative to their size: median and largest gap
    for name in ("model.safetensors", "teacher.safetensors"):  # (c)
        a, b = files(sharded, name), files(split, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(optim[0][i]["exp_avg_sq"], optim[2][i]["exp_avg_sq"]) for i in optim[0])

    bf16 = launch(tmp_path / "bf16", "trainer.max_steps=2", "trainer.mixed_precision=bf16", "trainer.sample_every=1",
                  *fsdp)  # fmt: skip
    assert len(losses(bf16)) == 2 and all(np.isfinite(losses(bf16)))
    assert {v.dtype for v in files(bf16, "model.safetensors", 2).values()} == {torch.float32}
    assert (bf16 / "samples" / "step_0000001.png").exists() and (bf16 / "samples" / "nfe_1.png").exists()

    _, model, *_ = load_run_model(sharded, None, "ema")  # (d) what fewstep.export / sample load
    state, ema = model.state_dict(), files(sharded, "teacher.safetensors")
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    single = tmp_path / "single"
    resume = sharded / "checkpoints" / "step_0000002"
    alone = train_run(pretrained, cache, single, "qwenimage", "trainer.grad_accum=2", f"trainer.resume={resume}",
                      *common)  # fmt: skip
    assert (alone["start_step"], alone["steps"], alone["num_processes"]) == (2, 3, 1)
    assert worst(files(single, "model.safetensors"), files(sharded, "model.safetensors")) < 1e-6
    assert worst(files(single, "teacher.safetensors"), files(sharded, "teacher.safetensors")) < 1e-6


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_a_resumed_lora_run_equals_an_uninterrupted_one(family, pretrained, cache, tmp_path):
    """2 steps + resume to 4 gives the same adapter, embeddings, EMA and optimizer state as 4 steps straight."""
    from test_precompute_export import train_run

    every = ["trainer.checkpoint_every=2", "trainer.lr_schedule=constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_run(pretrained, cache, straight, f"{family}_lora", "trainer.max_steps=4", *every)
    train_run(pretrained, cache, split, f"{family}_lora", "trainer.max_steps=2", *every)
    resumed = train_run(pretrained, cache, split, f"{family}_lora", "trainer.max_steps=4", "trainer.resume=auto",
                        *every)  # fmt: skip
    assert (resumed["start_step"], resumed["steps"]) == (2, 4)  # went on from step 2: a fresh run would end alike
    a, b = (run / "checkpoints" / "step_0000004" for run in (straight, split))
    for name in ("model.safetensors", "teacher.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(".sign_embedding." in k for k in load_file(str(a / "teacher.safetensors")))
    oa = torch.load(a / "optim.pt", weights_only=True)["optimizer"]["state"]
    ob = torch.load(b / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]) for k in oa)


def test_sana_null_prompt_is_the_pipelines_negative_prompt_without_the_instruction(tmp_path):
    """SanaPipeline encodes its negative prompt ("") without complex_human_instruction (the prompts get it): the
    cached null condition must be that embedding, or the CFG teacher's unconditional branch is another input."""
    import diffusers

    from fewstep.precompute import main

    from helpers.tiny_families import save_tiny_pipeline

    pretrained = save_tiny_pipeline("sana", tmp_path / "pipe")
    instruction = tmp_path / "chi.txt"
    instruction.write_text("Describe it:\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "cache"
    main(
        [
            f"pretrained={pretrained}",
            f"prompts={prompts}",
            f"out={out}",
            "resolution=32",
            "max_sequence_length=8",
            "embeds_dtype=float32",
            f"complex_human_instruction={instruction}",
            "progress=false",
        ]
    )
    null = load_file(str(out / "null.safetensors"))
    pipe = diffusers.SanaPipeline.from_pretrained(pretrained)
    with torch.no_grad():
        _, _, negative, negative_mask = pipe.encode_prompt(
            "a red cat",
            do_classifier_free_guidance=True,
            negative_prompt="",
            max_sequence_length=8,
            complex_human_instruction=["Describe it:"],
        )
    assert torch.equal(null["prompt_attention_mask"], negative_mask.float())
    assert torch.allclose(null["prompt_embeds"], negative, atol=1e-6), (null["prompt_embeds"] - negative).abs().max()
