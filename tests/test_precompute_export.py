"""The real-model path on a tiny offline SD3 pipeline: precompute (images + captions → latent cache, corrupt
files reported and skipped, resumable), ``data=latents`` (buckets, resumable order, errors), training
``model=sd35`` / ``sd35_lora`` with TwinFlow, ``fewstep.export`` and 2-step generation from the export."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from fewstep.data.latents import LatentCacheError, LatentData
from fewstep.precompute import main as precompute_main

from helpers import FAST, compose

MAX_SEQ = 8
SQUARE, WIDE = (16, 16), (20, 15)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    meta = []
    for i in range(6):
        w, h = SQUARE if i < 4 else WIDE
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if i % 2:
            (folder / f"img{i}.txt").write_text(f"a red cat number {i}")
        else:
            meta.append({"file_name": f"img{i}.png", "text": f"a blue dog number {i}"})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "broken.txt").write_text("a caption for a broken file")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "uncaptioned.png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    return folder


def run_precompute(pretrained, images, out, *extra):
    return precompute_main(
        [
            f"pretrained={pretrained}",
            f"images={images}",
            f"out={out}",
            "resolution=16",
            "batch_size=2",
            f"max_sequence_length={MAX_SEQ}",
            "embeds_dtype=float32",
            "progress=false",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def cache(pretrained, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    run_precompute(pretrained, images, out)
    return out


# --------------------------------------------------------------------------- precompute


def test_precompute_writes_latents_embeddings_and_reports_skipped(pretrained, cache, images, caplog):
    from diffusers import StableDiffusion3Pipeline

    manifest = json.loads((cache / "manifest.json").read_text())
    summary = manifest["summary"]
    assert summary["images_found"] == 8 and summary["encoded"] == 6 and summary["skipped"] == 2
    assert summary["skipped_unreadable"] == 1 and summary["skipped_no_caption"] == 1
    assert {s["file"] for s in manifest["skipped"]} == {"broken.png", "uncaptioned.png"}
    assert summary["latent_buckets"] == {"4x16x16": 4, "4x14x18": 2}  # 20x15 → the 4:3 bucket (18x14)

    pipe = StableDiffusion3Pipeline.from_pretrained(pretrained)
    vae = pipe.vae
    for entry in manifest["shards"]:
        tensors = load_file(str(cache / entry["file"]))
        assert tensors["latents"].shape[1:] == tuple(entry["latent_shape"])  # one shape per shard
        assert tensors["latents"].shape[0] == len(entry["files"]) == entry["count"]
    first = manifest["shards"][0]
    tensors = load_file(str(cache / first["file"]))
    from fewstep.precompute import load_image

    name = first["files"][0]
    h, w = first["latent_shape"][1:]
    pixels = load_image(images / name, (w, h))[None]
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mode()
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=[(images / "img1.txt").read_text() if name == "img1.png" else _caption(images, name)],
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            device=torch.device("cpu"),
            max_sequence_length=MAX_SEQ,
        )
        null_embeds, _, null_pooled, _ = pipe.encode_prompt(
            "", None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQ
        )
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    assert tensors["latents"].dtype == torch.bfloat16  # latents_dtype's default: half of float32's bytes
    assert torch.allclose(tensors["latents"][0].float(), expected[0], atol=1e-5, rtol=2**-8)  # bf16 rounding
    assert torch.allclose(tensors["prompt_embeds"][0], embeds[0], atol=1e-5)
    assert torch.allclose(tensors["pooled_prompt_embeds"][0], pooled[0], atol=1e-5)
    null = load_file(str(cache / "null.safetensors"))
    assert torch.allclose(null["prompt_embeds"], null_embeds, atol=1e-5)
    assert torch.allclose(null["pooled_prompt_embeds"], null_pooled, atol=1e-5)
    validation = load_file(str(cache / "validation.safetensors"))
    assert validation["prompt_embeds"].shape[0] == len(manifest["validation_prompts"]) == 4


def _caption(images, name):
    for line in (images / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["file_name"] == name:
            return row["text"]
    return (images / name).with_suffix(".txt").read_text()


def test_precompute_resumes_finished_shards(pretrained, images, tmp_path, caplog):
    out = tmp_path / "cache"
    first = run_precompute(pretrained, images, out, "shard_size=2")
    assert first["summary"]["shards"] == 3 and first["summary"]["shards_resumed"] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    shard = out / "shards" / "shard_00001.safetensors"
    encoded = load_file(str(shard))
    save_file({k: torch.zeros_like(v) for k, v in encoded.items()}, str(shard))  # stale tensors: must be redone
    stamps[shard.name] = shard.stat().st_mtime_ns
    (out / "shards" / "shard_00001.json").unlink()  # as if interrupted while writing shard 1
    (out / "manifest.json").unlink()
    again = run_precompute(pretrained, images, out, "shard_size=2")
    assert again["summary"]["shards_resumed"] == 2 and again["summary"]["encoded"] == 6
    now = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    assert [k for k in stamps if stamps[k] != now[k]] == ["shard_00001.safetensors"]
    redone = load_file(str(shard))  # encoded again, identical to the first encoding
    assert redone.keys() == encoded.keys() and all(torch.equal(redone[k], encoded[k]) for k in encoded)
    assert again["skipped"] == first["skipped"]


def test_precompute_arguments_fail_in_one_line(pretrained, images, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        precompute_main([f"pretrained={pretrained}", f"images={images}", f"out={tmp_path}", "resolutoin=16"])
    assert "resolutoin" in str(err.value) and "usage:" in str(err.value)
    with pytest.raises(SystemExit) as err:
        precompute_main([f"pretrained={pretrained}", f"images={tmp_path / 'none'}", f"out={tmp_path}"])
    assert str(err.value).startswith("error: images=") and "no such folder" in str(err.value)
    with pytest.raises(SystemExit) as err:
        precompute_main([f"pretrained={tmp_path / 'nope'}", f"images={images}", f"out={tmp_path / 'o'}"])
    assert "pretrained=" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as err:
        precompute_main([f"pretrained={pretrained / 'transformer'}", f"images={images}", f"out={tmp_path / 'o'}"])
    assert "model_index.json" in str(err.value)


# --------------------------------------------------------------------------- data=latents


def test_latent_data_buckets_resume_and_ranks(cache):
    data = LatentData(str(cache), batch_size=2)
    assert len(data) == 6 and data.shape == (4, 16, 16) and data.num_classes == 0
    assert sorted(data.bucket_shapes) == [(4, 14, 18), (4, 16, 16)]
    stream = data.batches(seed=7)
    first = [next(stream) for _ in range(9)]  # 3 batches per epoch (2 square + 1 wide)
    shapes = [tuple(b.x.shape[1:]) for b in first]
    assert set(shapes) == {(4, 16, 16), (4, 14, 18)}
    for b in first:
        assert b.cond["prompt_embeds"].shape == (2, 8 + 77, 32) and b.cond["pooled_prompt_embeds"].shape == (2, 64)
        assert torch.equal(b.null_cond["prompt_embeds"][0], data.null["prompt_embeds"][0])
    epoch0 = torch.cat([b.x.flatten(1)[:, :4] for b in first[:3] if b.x.shape[-1] == 16])
    assert torch.unique(epoch0, dim=0).shape[0] == 4  # each square item once per epoch
    resumed = data.batches(seed=7, position=5)
    for expected in first[5:]:
        got = next(resumed)
        assert torch.equal(got.x, expected.x) and torch.equal(got.cond["prompt_embeds"], expected.cond["prompt_embeds"])
    r0, r1 = next(data.batches(7, 0, rank=0, world=2)), next(data.batches(7, 0, rank=1, world=2))
    assert r0.x.shape[0] == r1.x.shape[0] == 2 and r0.x.shape == r1.x.shape and not torch.equal(r0.x, r1.x)
    with pytest.raises(LatentCacheError, match="lower data.batch_size"):  # a FewstepError: `error:` line, exit 2
        next(LatentData(str(cache), batch_size=5).batches(0))
    grid = data.grid_conds(6)
    assert torch.equal(grid["prompt_embeds"][4], data.validation["prompt_embeds"][0])  # 4 prompts, cycled
    images = data.decode(first[0].x)
    assert images.shape == (2, 3, *first[0].x.shape[2:]) and images.min() >= -1 and images.max() <= 1


def test_latent_data_errors_name_the_fix(cache, tmp_path):
    def message(read: bool = False, **kw):
        with pytest.raises(LatentCacheError) as err:
            data = LatentData(**kw)
            if read:  # a shard's header is checked when the shard is first read, not at startup
                data.read(torch.arange(len(data)))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "fewstep.precompute" in message(path="")
    assert "no such folder" in message(path=str(tmp_path / "missing"))
    assert "no manifest.json" in message(path=str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    entry = manifest["shards"][1]
    shard = broken / entry["file"]
    tensors = load_file(str(shard))
    tensors["prompt_embeds"] = torch.zeros(*tensors["prompt_embeds"].shape[:2], 48)
    save_file(tensors, str(shard))
    assert f"is {shard.stat().st_size} bytes where manifest.json records {entry['bytes']}" in message(path=str(broken))
    del entry["bytes"]  # as a version-1 manifest: no sizes, the header tells
    (broken / "manifest.json").write_text(json.dumps(manifest))
    LatentData(str(broken))  # startup opens no shard but the first
    assert "mixes precompute settings" in message(read=True, path=str(broken))
    tensors["prompt_embeds"] = tensors["prompt_embeds"][:1]
    save_file(tensors, str(shard))
    assert "does not match manifest.json" in message(read=True, path=str(broken))
    shard.write_bytes(b"not a safetensors file")
    assert "is unreadable" in message(read=True, path=str(broken))
    os.remove(shard)
    assert "is missing" in message(path=str(broken))
    manifest["shards"] = []
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert "holds no samples" in message(path=str(broken))


# --------------------------------------------------------------------------- prompt-only (image-free) cache

PROMPTS = ["a red cat number 1", "", "a blue dog number 0", "a red cat number 3", "   ", "a lighthouse", "a fox"]


@pytest.fixture(scope="module")
def prompt_cache(pretrained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt_cache")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    manifest = run_prompt_precompute(pretrained, folder / "prompts.txt", folder / "cache")
    return folder / "cache", manifest


def run_prompt_precompute(pretrained, prompts, out, *extra):
    return precompute_main(
        [f"pretrained={pretrained}", f"prompts={prompts}", f"out={out}", "resolution=16", "batch_size=2",
         "shard_size=3", f"max_sequence_length={MAX_SEQ}", "embeds_dtype=float32", "progress=false", *extra]
    )  # fmt: skip


def test_prompt_only_cache_holds_embeddings_null_and_latent_shape(pretrained, cache, prompt_cache, tmp_path):
    """``prompts=FILE``: the same embeddings an image cache holds for the same caption, the null prompt, and the
    latent shape of a resolution² image (4×16×16 for the tiny SD3), no latents; data=latents yields zero latents."""
    out, manifest = prompt_cache
    assert manifest["prompt_only"] and manifest["family"] == "sd3" and manifest["source"]["prompts"].endswith(".txt")
    assert [e["count"] for e in manifest["shards"]] == [3, 2]  # 5 non-blank prompts, shard_size=3
    assert all(e["latent_shape"] == [4, 16, 16] for e in manifest["shards"])
    assert manifest["shards"][0]["files"] == ["a red cat number 1", "a blue dog number 0", "a red cat number 3"]
    assert manifest["summary"]["encoded"] == 5 and manifest["summary"]["images_found"] == 5
    first = load_file(str(out / manifest["shards"][0]["file"]))
    assert sorted(first) == ["pooled_prompt_embeds", "prompt_embeds"]  # no latents stored
    images = json.loads((cache / "manifest.json").read_text())
    for entry in images["shards"]:  # img1.png is captioned "a red cat number 1" in the image cache
        if "img1.png" in entry["files"]:
            row = entry["files"].index("img1.png")
            ref = load_file(str(cache / entry["file"]))
            for key in ("prompt_embeds", "pooled_prompt_embeds"):
                assert torch.allclose(first[key][0], ref[key][row], atol=1e-6)
    assert torch.equal(load_file(str(out / "null.safetensors"))["prompt_embeds"],
                       load_file(str(cache / "null.safetensors"))["prompt_embeds"])  # fmt: skip

    data = LatentData(str(out), batch_size=2)
    assert len(data) == 5 and data.shape == (4, 16, 16) and data.prompt_only
    batch = next(data.batches(seed=0))
    assert batch.x.shape == (2, 4, 16, 16) and not batch.x.any()
    assert batch.cond["prompt_embeds"].shape == (2, 8 + 77, 32)

    again = run_prompt_precompute(pretrained, out.parent / "prompts.txt", out)  # finished shards are kept
    assert again["summary"]["shards_resumed"] == 2


def test_prompt_only_arguments_and_cache_use_fail_in_one_line(pretrained, prompt_cache, images, tmp_path):
    from fewstep.config.validate import ConfigError, validate

    def error(*argv):
        with pytest.raises(SystemExit) as err:
            precompute_main([f"pretrained={pretrained}", f"out={tmp_path / 'o'}", *argv])
        text = str(err.value)
        assert text.startswith("error: ")
        return text.splitlines()[0]

    assert "give one of images=DIR, dataset=HUB_ID_OR_DIR or prompts=FILE" in error(
        f"images={images}", f"prompts={tmp_path / 'p.txt'}"
    )
    assert "no such file" in error(f"prompts={tmp_path / 'p.txt'}")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "has no prompts" in error(f"prompts={tmp_path / 'blank.txt'}")
    out, _ = prompt_cache
    base = ["model=sd35", f"model.pretrained={pretrained}", "data=latents", f"data.path={out}"]
    with pytest.raises(ConfigError) as err:
        validate(compose(base))
    assert "is a prompt-only cache" in str(err.value) and "objective.image_free=true" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_image_free_training_from_a_prompt_only_cache(pretrained, prompt_cache, tmp_path):
    """SPEC §10 end to end: a tiny SD3 trains 3 image-free steps (frozen teacher, guided target) from prompts
    alone and writes its sample grid."""
    out, _ = prompt_cache
    run = tmp_path / "run"
    extra = ["objective.image_free=true", "teacher=frozen", "objective.enhanced_ratio=4.0", "trainer.grid_size=4"]
    summary = train_run(pretrained, out, run, "sd35", *extra)
    assert summary["steps"] == 3
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss/main"] for m in metrics if "loss/main" in m]
    assert losses and all(np.isfinite(losses))
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids, "no sample grid written"
    from PIL import Image

    with Image.open(run / "samples" / grids[0]) as im:
        assert im.size[0] >= 2 * 16 and im.size[1] >= 2 * 16  # a 2×2 grid of 16-pixel images


# --------------------------------------------------------------------------- train → export → generate


def train_run(pretrained, cache, run_dir, model, *extra):
    from fewstep.training.loop import train

    cfg = compose(
        [
            "objective=twinflow",
            "sampler=ucgm",  # the reference few-step sampler, as the SD3.5 docs and table6 rows use
            f"model={model}",
            f"model.pretrained={pretrained}",
            "model.lora.rank=4",
            "model.lora.alpha=8",
            "data=latents",
            f"data.path={cache}",
            "data.batch_size=2",
            "trainer.max_steps=3",
            "trainer.final_nfe=[1]",
            "trainer.grid_size=4",
            "trainer.lr=1e-2",
            *FAST,
            *extra,
        ]
    )
    summary = train(cfg, run_dir=run_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what @hydra.main writes for a CLI run
    return summary


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
@pytest.mark.parametrize(
    "model, extra",
    [("sd35", []), ("sd35_lora", []), ("sd35", ["teacher.sampling_decay=0.5"])],
    ids=["sd35", "sd35_lora", "sd35-sampling_decay"],
)
def test_train_export_and_generate(pretrained, cache, tmp_path, model, extra):
    """Export → the pipeline samples exactly like the native sampler on the weights fewstep.eval scores
    (``load_run(...).model_fn("ema")``): the teacher EMA, or the sampling EMA with teacher.sampling_decay."""
    from diffusers import StableDiffusion3Pipeline

    from fewstep.export.command import main as export_main
    from fewstep.export.pipeline import load_lora_pipeline, load_pipeline
    from fewstep.samplers.ucgm import UCGMSampler
    from fewstep.training.runs import load_run

    run = tmp_path / "run"
    summary = train_run(pretrained, cache, run, model, *extra)
    assert summary["steps"] == 3
    if model == "sd35_lora":
        assert summary["trainable_params"] < summary["params"]
        shadow = load_file(str(run / "checkpoints" / "step_0000003" / "teacher.safetensors"))
        assert all(".lora_" in k or ".target_embedder." in k or ".sign_embedding." in k for k in shadow)
    out = tmp_path / "export"
    info = export_main([f"run_dir={run}", f"out={out}"])
    assert info["weights"] == "ema" and info["time_pair"] and info["step"] == 3
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["fewstep_models_sd3", "SD3TwinFlowTransformer2DModel"]  # code in transformer/
    assert index["scheduler"] == ["fewstep_samplers_scheduler", "TwinFlowScheduler"]

    import fewstep  # noqa: F401 - all diffusers needs to find the exported classes (fewstep.export.code)

    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "SD3TwinFlowTransformer2DModel"
    prompt = "a red cat"
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))

    def two_step_latents(p):
        return p(
            prompt,
            height=16,
            width=16,
            num_inference_steps=2,
            guidance_scale=0.0,
            latents=latents.clone(),
            max_sequence_length=MAX_SEQ,
            output_type="latent",
        ).images

    generated = two_step_latents(pipe)
    assert torch.isfinite(generated).all() and (generated - latents).abs().max() > 1e-3

    # the exported pipeline samples exactly like the native sampler on the weights fewstep.eval scores
    scored = load_run(run, device="cpu", command="eval")
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQ
        )

    # the run's own sampler, as fewstep.sample builds it: its step noise is keyed on the initial latents, as the
    # exported scheduler's (the generator fewstep.sample passes plays no part)
    assert isinstance(scored.sampler, UCGMSampler) and scored.sampler.step_noise == "latents"

    def native(model_fn):
        return scored.sampler.sample(
            model_fn, latents.clone(), {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, 2,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    assert (generated - native(scored.model_fn("ema"))).abs().max().item() < 1e-4
    if extra:  # not the teacher EMA: the sampling EMA is what was scored and exported
        assert scored.teacher.sampling_key == "sampling_shadow"
        assert (generated - native(scored.teacher.model)).abs().max().item() > 1e-3

    images = load_pipeline(out)(
        [prompt, "a dog"],
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=0.0,
        max_sequence_length=MAX_SEQ,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()

    if model == "sd35_lora":
        lora_dir = out / "lora"
        assert {"pytorch_lora_weights.safetensors", "twinflow_embeddings.safetensors"} <= set(info["lora_files"])
        lora_pipe = load_lora_pipeline(pretrained, lora_dir)
        lora_pipe.set_progress_bar_config(disable=True)
        from_lora = two_step_latents(lora_pipe)
        assert (from_lora - generated).abs().max().item() < 1e-4


def test_export_arguments_fail_in_one_line(tmp_path):
    from fewstep.export.command import main as export_main

    with pytest.raises(SystemExit) as err:
        export_main([f"run_dir={tmp_path}", f"out={tmp_path / 'o'}", "weigths=ema"])
    assert "weigths" in str(err.value) and "usage:" in str(err.value)
    with pytest.raises(SystemExit) as err:
        export_main([f"run_dir={tmp_path}", f"out={tmp_path / 'o'}"])
    assert "no .hydra/config.yaml" in str(err.value)


def test_export_of_a_non_diffusers_run_names_every_exportable_family(tmp_path):
    from fewstep.export.command import main as export_main

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model:\n  _target_: fewstep.models.tiny.TinyMLP\n")
    with pytest.raises(SystemExit) as err:
        export_main([f"run_dir={tmp_path}", f"out={tmp_path / 'o'}"])
    assert str(err.value).startswith("error: ") and "fewstep.sample" in str(err.value)
    for family in ("sd35", "sana", "qwenimage", "openuni"):
        assert family in str(err.value), family


def save_tiny_sd15_pipeline(folder):
    """A tiny offline ``StableDiffusionPipeline`` (CLIP text encoder, epsilon UNet, one-level VAE), saved."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from helpers.tiny_sd3 import CLIP_MAX_LENGTH, _write_clip_tokenizer, build_tiny_unet

    tokenizer = CLIPTokenizer.from_pretrained(
        str(_write_clip_tokenizer(folder.parent / "sd15_tokenizer")), model_max_length=CLIP_MAX_LENGTH
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = build_tiny_unet(sample_size=16, cross_attention_dim=32)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        scaling_factor=0.18215,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sd15_precompute_and_training_through_the_diff2flow_bridge(images, tmp_path):
    """An epsilon SD1.5-style pipeline: precompute (one text encoder, no pooled embedding, no VAE shift) and
    TwinFlow training through the bridge."""
    from fewstep.training.loop import train

    pretrained = save_tiny_sd15_pipeline(tmp_path / "sd15")
    manifest = run_precompute(pretrained, images, tmp_path / "cache")
    assert manifest["pipeline_class"] == "StableDiffusionPipeline" and manifest["summary"]["encoded"] == 6
    assert manifest["vae"] == {"scaling_factor": 0.18215, "shift_factor": 0.0}
    data = LatentData(str(tmp_path / "cache"), batch_size=2)
    assert data.cond_keys == ["prompt_embeds"] and data.null["prompt_embeds"].shape == (1, 77, 32)
    assert data.decode(next(data.batches(0)).x).shape[1] == 3
    cfg = compose(
        [
            "objective=twinflow",
            "model=sd15",
            f"model.pretrained={pretrained}",
            "diff2flow.enabled=true",
            "objective.allow_diff2flow=true",
            "data=latents",
            f"data.path={tmp_path / 'cache'}",
            "data.batch_size=2",
            "trainer.max_steps=2",
            "trainer.final_nfe=[1]",
            "trainer.grid_size=4",
            *FAST,
        ]
    )
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 2 and np.isfinite(summary["loss"])


@pytest.mark.slow
def test_bench_runs_on_latent_data_with_prompt_conditions(pretrained, cache, tmp_path):
    """fewstep.bench on model=sd35_lora + data=latents in bf16 (the GPU check's configuration, tiny):
    dict (prompt-embedding) conditions through the sampling benchmark too."""
    from fewstep.bench.command import main as bench

    out = tmp_path / "bench"
    result = bench(
        [f"out={out}", "model=sd35_lora", "data=latents", "batch_size=2", "repeats=1", "warmup=0", "sample_batch=2"]
        + ["sample_repeats=1"]
        # one timing run; rcgm (twinflow without its adversarial branch) and twinflow_no_enhance are twinflow's path
        + ["runs=1", "variants=[flow_matching,twinflow]"]
        + ["mixed_precision=bf16", f"overrides=[model.pretrained={pretrained},data.path={cache}]"]
    )
    assert result["objectives"]["flow_matching"]["evals_per_step"] == 1.0
    assert result["objectives"]["twinflow"]["evals_per_step"] > 1.0
    assert result["sampling"]["nfe_1"]["images_per_s"] > 0
    assert "precision=bf16" in (out / "bench.md").read_text()


def test_precompute_with_bf16_text_encoders_encodes_latents_with_the_float32_vae(pretrained, images, tmp_path):
    """dtype=bfloat16 is for the text encoders: the VAE encodes in float32 with its stored (float32) weights, not
    weights rounded to bf16 on load and cast back."""
    from diffusers import AutoencoderKL

    from fewstep.precompute import load_image

    out = tmp_path / "cache"
    run_precompute(pretrained, images, out, "dtype=bfloat16", "device=cpu", "latents_dtype=float32")
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["latent_shape"][1] == e["latent_shape"][2])
    latents = load_file(str(out / entry["file"]))["latents"]
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae").eval()
    pixels = torch.stack([load_image(images / name, SQUARE) for name in entry["files"]])
    with torch.no_grad():
        expected = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert (latents - expected).abs().max().item() < 1e-5


def test_the_exported_scheduler_keeps_the_run_samplers_shift():
    """sampler.shift (the SD3 resolution shift of the UCGM grid) is part of how the run samples: the exported
    TwinFlowScheduler must visit the same times as the native sampler."""
    from omegaconf import OmegaConf

    from fewstep.export.pipeline import scheduler_for_run
    from fewstep.samplers.ucgm import UCGMSampler

    cfg = OmegaConf.create(
        {"sampler": {"_target_": "fewstep.samplers.ucgm.UCGMSampler", "shift": 3.0}, "objective": {}}
    )
    scheduler = scheduler_for_run(cfg)
    native = UCGMSampler(shift=3.0).time_grid(2)
    assert (scheduler.sigmas - native).abs().max().item() < 1e-9, (scheduler.sigmas.tolist(), native.tolist())


def test_the_exported_scheduler_of_an_euler_run_samples_as_its_euler_sampler(caplog):
    """A flow-matching baseline samples with sampler=euler: target_step_count Euler steps on its shifted uniform grid,
    the model at tt = t. Its exported TwinFlowScheduler (the "mul" style without noise on that grid) must give the
    Euler sampler's samples in a diffusers-style loop, not a stochastic few-step jump of at most 8 steps."""
    from omegaconf import OmegaConf

    from fewstep.export.pipeline import scheduler_for_run
    from fewstep.samplers.euler import EulerSampler

    sampler = {"_target_": "fewstep.samplers.euler.EulerSampler", "shift": 3.0, "guidance_scale": 4.5}
    cfg = OmegaConf.create({"sampler": sampler, "objective": {"target_step_count": 12}})
    with caplog.at_level("WARNING", logger="fewstep.export"):
        scheduler = scheduler_for_run(cfg)
    assert "guidance_scale=4.5" in caplog.text  # the pipeline's own guidance_scale argument does the CFG
    steps = scheduler.config.default_num_inference_steps

    def model(x, t, tt, cond):  # a velocity that also depends on the target time
        t, tt = t.view(-1, 1, 1, 1), tt.view(-1, 1, 1, 1)
        return torch.sin(3 * x) * (1 + t) - 0.5 * x + 2 * (t - tt)

    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler.set_timesteps(steps)
    x = noise
    for timestep in scheduler.timesteps:
        t = torch.full((2,), float(timestep) / 1000, dtype=noise.dtype)
        tt = torch.full((2,), scheduler.current_target_time(), dtype=noise.dtype)
        x = scheduler.step(model(x, t, tt, None), timestep, x).prev_sample
    native = EulerSampler(shift=3.0).sample(model, noise, None, 12)
    assert steps == 12 and (x - native).abs().max().item() < 1e-5, (x - native).abs().max().item()


def test_exporting_a_heun_run_warns_that_the_scheduler_is_first_order(caplog):
    from omegaconf import OmegaConf

    from fewstep.export.pipeline import scheduler_for_run

    cfg = OmegaConf.create(
        {"sampler": {"_target_": "fewstep.samplers.ucgm.UCGMSampler", "sampling_order": 2}, "objective": {}}
    )
    with caplog.at_level("WARNING", logger="fewstep.export"):
        scheduler_for_run(cfg)
    assert "sampling_order=2" in caplog.text and "first-order" in caplog.text
