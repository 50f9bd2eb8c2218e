"""OpenUni on tiny offline components (tests/helpers/tiny_families.py): the conditioner's reference layout, the prompt
template, ``fewstep.convert_openuni`` (every weight lands where it should; bad inputs fail in one line before
any model is built), step-0 exactness, the LoRA targets, precompute (images and prompts only), and (slow)
TwinFlow training → export → ``DiffusionPipeline.from_pretrained`` generating in 2 steps equal to the native
sampler, a resumed LoRA run, image-free training, and a fresh process that finds ``OpenUniPipeline`` after
``import fewstep``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import compose, read_shard

SIDE = 32  # image side (SANA's pipeline wants multiples of 32) → latents 4 × 16 × 16
CHANNELS = 4
QUERIES = 4  # tiny_families.OPENUNI_QUERIES
CAPTION = 8  # the tiny SANA's caption_channels
HEADS = 2  # the tiny connector's heads (not in the weights: connector_heads=2)
LORA = {"enabled": True, "rank": 4, "alpha": 8}
CONNECTOR_NAMES = [  # per layer, the reference connector's (wusize/OpenUni modeling_connector.py) names
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "layer_norm2.weight", "layer_norm2.bias",
]  # fmt: skip


def convert(sources, out, *extra):
    from fewstep.convert_openuni import main

    return main(
        [
            f"checkpoint={sources['checkpoint']}",
            f"internvl={sources['internvl']}",
            f"sana={sources['sana']}",
            f"vae={sources['vae']}",
            f"out={out}",
            f"connector_heads={HEADS}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """InternVL, SANA, DC-AE folders and a reference checkpoint with a fine-tuned DiT (``transformer.*``)."""
    from helpers.tiny_families import save_openuni_sources

    return save_openuni_sources(tmp_path_factory.mktemp("openuni_sources"), seed=0, transformer=True)


@pytest.fixture(scope="module")
def pretrained(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("openuni") / "pipe"
    convert(sources, out)
    return out


@pytest.fixture(scope="module")
def pipe(pretrained):
    from diffusers import DiffusionPipeline

    import fewstep  # noqa: F401 - lets diffusers resolve OpenUniPipeline

    pipe = DiffusionPipeline.from_pretrained(pretrained)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, prompts):
    from fewstep.models.openuni import FAMILY

    with torch.no_grad():
        return FAMILY.encode_text(pipe, prompts, torch.device("cpu"), 256, {})


# --------------------------------------------------------------------------- the conditioner and the prompt


def test_openuni_conditioner_has_the_reference_parameter_names_and_size():
    from accelerate import init_empty_weights

    from fewstep.models.openuni import OpenUniConditioner

    from helpers.tiny_families import tiny_conditioner

    tiny = tiny_conditioner()
    expected = {"meta_queries", "projector.weight", "projector.bias"}
    expected |= {f"connector.layers.0.{n}" for n in CONNECTOR_NAMES}
    assert set(tiny.state_dict()) == expected  # conversion is a prefix strip: no renaming
    with init_empty_weights():
        real = OpenUniConditioner()  # OpenUni-L: 256 queries, 6 layers 1536 wide, FFN 8960, 24 heads → 2304
    names = set(real.state_dict())
    assert len(names) == 3 + 6 * 16 and "connector.layers.5.mlp.fc2.weight" in names
    per_layer = 4 * (1536 * 1536 + 1536) + 2 * 2 * 1536 + (1536 * 8960 + 8960) + (8960 * 1536 + 1536)
    assert sum(p.numel() for p in real.parameters()) == 256 * 1536 + 6 * per_layer + 1536 * 2304 + 2304 == 225_844_992
    layer = real.connector.layers[0]
    assert layer.self_attn.num_heads == 24 and layer.layer_norm1.eps == 1e-6
    assert real.connector.config.hidden_act == "gelu_pytorch_tanh"


def test_openuni_prompts_use_the_reference_chat_template(pipe):
    ids, mask = pipe.tokenize([" a red cat ", ""])
    tok = pipe.tokenizer
    cond = tok.encode("<|im_start|>user\nGenerate an image: a red cat<|im_end|>\n<|im_start|>assistant\n<img>")
    uncond = tok.encode("<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n<img>")
    assert len(cond) == 48 and len(uncond) == 38  # 4 special tokens + one token per byte of the rest
    assert ids.shape == (2, 48) and ids[0].tolist() == cond and ids[1, :38].tolist() == uncond
    assert (ids[1, 38:] == tok.pad_token_id).all() and mask.sum(1).tolist() == [48, 38]
    assert mask[1, :38].all() and not mask[1, 38:].any()  # right padding


def reference_conditioning(state, llm, tokenizer, prompts, heads=HEADS):
    """wusize/OpenUni's text path written out with torch ops from the checkpoint tensors: per-prompt tokens padded
    with ``pad_sequence``, the LM on [tokens; meta-queries] with positions from the cumulative mask, then each
    connector layer (pre-norm attention and gelu-tanh MLP residuals), then the projector."""
    from torch.nn.utils.rnn import pad_sequence

    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<img>"
    texts = [template.format(f"Generate an image: {p}" if p else "Generate an image.") for p in prompts]
    ids = [torch.tensor(tokenizer.encode(t, add_special_tokens=True)) for t in texts]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, tokens in enumerate(ids):
        mask[row, : len(tokens)] = True
    queries = state["meta_queries"]
    b, n, width = len(prompts), queries.shape[0], queries.shape[1]
    mask = torch.cat([mask, torch.ones(b, n, dtype=torch.bool)], 1)
    positions = torch.cumsum(mask, 1) - 1
    positions[positions < 0] = 0
    embeds = torch.cat([llm.get_input_embeddings()(input_ids), queries[None].expand(b, -1, -1)], 1)
    with torch.no_grad():
        h = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state[:, -n:]
        layers = {int(k.split(".")[2]) for k in state if k.startswith("connector.layers.")}
        for i in sorted(layers):
            w = {k.split(".", 3)[3]: v for k, v in state.items() if k.startswith(f"connector.layers.{i}.")}
            x = F.layer_norm(h, (width,), w["layer_norm1.weight"], w["layer_norm1.bias"], 1e-6)

            def heads_of(name, x=x, w=w):
                y = F.linear(x, w[f"self_attn.{name}.weight"], w[f"self_attn.{name}.bias"])
                return y.view(b, n, heads, width // heads).transpose(1, 2)

            q, k, v = heads_of("q_proj"), heads_of("k_proj"), heads_of("v_proj")
            attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), -1) @ v
            attn = attn.transpose(1, 2).reshape(b, n, width)
            h = h + F.linear(attn, w["self_attn.out_proj.weight"], w["self_attn.out_proj.bias"])
            x = F.layer_norm(h, (width,), w["layer_norm2.weight"], w["layer_norm2.bias"], 1e-6)
            x = F.gelu(F.linear(x, w["mlp.fc1.weight"], w["mlp.fc1.bias"]), approximate="tanh")
            h = h + F.linear(x, w["mlp.fc2.weight"], w["mlp.fc2.bias"])
        return F.linear(h, state["projector.weight"], state["projector.bias"])


def load_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    return state


def assert_same_weights(module, reference: dict, prefix: str = ""):
    ours = module.state_dict()
    assert set(ours) == {k.removeprefix(prefix) for k in reference if k.startswith(prefix)}
    assert all(torch.equal(ours[k.removeprefix(prefix)], v) for k, v in reference.items() if k.startswith(prefix))


def check_conversion(sources, out, info):
    """Every weight where it belongs, and the converted pipeline's embeddings = the reference's text path."""
    from diffusers import DiffusionPipeline

    import fewstep  # noqa: F401

    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "OpenUniPipeline" and type(pipe.conditioner).__name__ == "OpenUniConditioner"
    state = load_checkpoint(sources["checkpoint"])
    conditioner = {k: v for k, v in state.items() if k == "meta_queries" or k.startswith(("connector.", "projector."))}
    assert len(conditioner) == 1 + 16 + 2
    assert_same_weights(pipe.conditioner, conditioner)
    assert_same_weights(pipe.transformer, sources["transformer"].state_dict())
    assert_same_weights(pipe.text_encoder, sources["llm"].state_dict())
    vae = load_file(str(sources["vae"] / "diffusion_pytorch_model.safetensors"))
    assert_same_weights(pipe.vae, vae)
    prompts = ["a red cat", "", "a blue bird sitting on a branch"]  # three lengths: padding in play
    reference = reference_conditioning(conditioner, sources["llm"], sources["tokenizer"], prompts)
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    assert embeds.shape == (3, QUERIES, CAPTION) and mask.shape == (3, QUERIES) and bool((mask == 1).all())
    assert (embeds - reference).abs().max().item() < 1e-5 and reference.abs().mean().item() > 0.05
    assert (embeds[0] - embeds[1]).abs().max().item() > 1e-3  # the prompt reaches the queries
    return pipe


def test_openuni_conversion_takes_the_dit_from_the_checkpoint(sources, pretrained, tmp_path):
    """A checkpoint with ``transformer.*`` (not the SANA folder's DiT) and no ``lmm.*`` (the LM from InternVL)."""
    info = json.loads((pretrained / "fewstep_convert.json").read_text())
    assert info["transformer"].startswith("checkpoint ") and "35 tensors" in info["transformer"]
    assert info["text_encoder"].startswith("internvl=") and "language_model.model.*, 26 tensors" in info["text_encoder"]
    assert info["conditioner_config"] == {
        "num_queries": 4, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_attention_heads": 2,
        "caption_channels": 8,
    }  # fmt: skip
    assert info["dtype"] == "float32"
    pipe = check_conversion(sources, pretrained, info)
    sana_dit = load_file(str(sources["sana"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    ours = pipe.transformer.state_dict()
    assert max((ours[k] - sana_dit[k]).abs().max().item() for k in sana_dit) > 0.1  # not the SANA folder's
    index = json.loads((pretrained / "model_index.json").read_text())
    assert index["_class_name"] == "OpenUniPipeline" and index["text_encoder"] == ["transformers", "Qwen2Model"]
    assert index["conditioner"] == ["fewstep.models.openuni", "OpenUniConditioner"]


@pytest.mark.slow
def test_openuni_conversion_takes_the_lm_from_a_wrapped_checkpoint_and_the_dit_from_sana(tmp_path):
    """``{"state_dict": {"module.<key>": ...}}`` with ``lmm.language_model.model.*`` and no DiT: the LM is the
    checkpoint's (not InternVL's), the DiT the SANA folder's; ``scheduler=twinflow``, ``dtype=bfloat16``."""
    from helpers.tiny_families import save_openuni_sources

    sources = save_openuni_sources(tmp_path / "src", seed=1, transformer=False, lmm=True, wrap=True)
    out = tmp_path / "pipe"
    info = convert(sources, out, "scheduler=twinflow")
    assert info["transformer"].startswith("sana=") and "no transformer.* weights" in info["transformer"]
    assert "lmm.language_model.model.*, 26 tensors" in info["text_encoder"]
    internvl = load_file(str(sources["internvl"] / "model.safetensors"))
    lm = sources["llm"].state_dict()
    assert max((lm[k] - internvl[f"language_model.model.{k}"]).abs().max().item() for k in lm) > 0.1
    pipe = check_conversion(sources, out, info)
    assert type(pipe.scheduler).__name__ == "TwinFlowScheduler" and pipe.scheduler.config.sampling_style == "mul"
    assert pipe.scheduler.config.default_num_inference_steps == 30
    info = convert(sources, tmp_path / "bf16", "dtype=bfloat16")
    assert info["dtype"] == "bfloat16"
    config = json.loads((tmp_path / "bf16" / "conditioner" / "config.json").read_text())
    assert config["num_queries"] == QUERIES and config["caption_channels"] == CAPTION
    header = load_file(str(tmp_path / "bf16" / "conditioner" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in header.values()} == {torch.bfloat16}


def bad_checkpoint(sources, path, edit):
    state = load_checkpoint(sources["checkpoint"])
    edit(state)
    torch.save(state, path)
    return path


BAD_INPUTS = {  # name: (how to break the good inputs, text the one error line must hold)
    "no_file": (lambda s, p: {"checkpoint": p / "missing.pth"}, ["checkpoint=", "no such file", "wusize/openuni"]),
    "not_a_checkpoint": (lambda s, p: {"checkpoint": _write(p / "x.pth", b"junk")}, ["not a torch.save'd state"]),
    "no_meta_queries": (
        lambda s, p: {"checkpoint": bad_checkpoint(s, p / "c.pth", lambda d: d.pop("meta_queries"))},
        ["has no meta_queries weights", "not an OpenUni checkpoint"],
    ),
    "no_connector": (
        lambda s, p: {"checkpoint": bad_checkpoint(s, p / "c.pth", _drop("connector."))},
        ["has no connector.* weights"],
    ),
    "no_projector": (
        lambda s, p: {"checkpoint": bad_checkpoint(s, p / "c.pth", _drop("projector."))},
        ["has no projector.* weights"],
    ),
    "projector_width": (
        lambda s, p: {"checkpoint": bad_checkpoint(s, p / "c.pth", _narrow_projector)},
        ["gives 6 caption channels", "takes 8", "give the SANA the checkpoint was trained with"],
    ),
    "llm_width": (lambda s, p: {"internvl": _internvl_with(s, p, hidden_size=12)}, ["hidden_size 12", "internvl="]),
    "no_llm_config": (lambda s, p: {"internvl": _internvl_with(s, p, drop=True)}, ["has no llm_config"]),
    "connector_heads": (lambda s, p: {"connector_heads": 3}, ["connector_heads=3 does not divide", "16"]),
    "dit_shape": (
        lambda s, p: {"checkpoint": bad_checkpoint(s, p / "c.pth", _widen_dit)},
        ["transformer.proj_out.weight is (4, 9) where sana=", "gives (4, 8)", "give the SANA"],
    ),
    "sana_missing": (lambda s, p: {"sana": p / "nowhere"}, ["sana=", "no such folder"]),
}


def _write(path, data):
    path.write_bytes(data)
    return path


def _drop(prefix):
    def edit(state):
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]

    return edit


def _narrow_projector(state):
    state["projector.weight"] = state["projector.weight"][:6]
    state["projector.bias"] = state["projector.bias"][:6]


def _widen_dit(state):
    state["transformer.proj_out.weight"] = torch.zeros(4, 9)


def _internvl_with(sources, root, hidden_size=None, drop=False):
    import shutil

    folder = root / "internvl"
    shutil.copytree(sources["internvl"], folder)
    config = json.loads((folder / "config.json").read_text())
    if drop:
        del config["llm_config"]
    else:
        config["llm_config"]["hidden_size"] = hidden_size
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_convert_openuni_bad_input_fails_in_one_line_before_building(sources, tmp_path, case):
    from fewstep.convert_openuni import main

    change, fragments = BAD_INPUTS[case]
    args = {
        "checkpoint": sources["checkpoint"],
        "internvl": sources["internvl"],
        "sana": sources["sana"],
        "vae": sources["vae"],
        "out": tmp_path / "out",
        "connector_heads": HEADS,
    }
    args.update(change(sources, tmp_path))
    with pytest.raises(SystemExit) as err:
        main([f"{k}={v}" for k, v in args.items()])
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message
    assert all(f in message for f in fragments), message
    assert not (tmp_path / "out").exists()  # nothing written


def test_convert_openuni_requires_checkpoint_and_out(tmp_path):
    from fewstep.convert_openuni import main

    for args in ([f"out={tmp_path}"], ["checkpoint=x.pth"]):
        with pytest.raises(SystemExit) as err:
            main(args)
        assert str(err.value).startswith(f"error: {'checkpoint' if 'out' in args[0] else 'out'}= is required")


def test_openuni_model_without_weights_names_the_conversion():
    from fewstep.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["model=openuni", "objective=twinflow", "data=latents", "data.path=/nonexistent"]))
    message = str(err.value)
    assert "\n" not in message and "model.pretrained is empty" in message
    assert "python -m fewstep.convert_openuni checkpoint=" in message and "model.pretrained=DIR" in message


# --------------------------------------------------------------------------- the model


def vanilla_velocity(pipe, x, t, cond):
    with torch.no_grad():
        return pipe.transformer(
            x, cond["prompt_embeds"], t.abs() * 1000, encoder_attention_mask=cond["prompt_attention_mask"]
        )[0]


def inputs(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, CHANNELS, 6, 4, generator=g)
    t = torch.tensor([1.0, 0.7, -0.4, -0.9])
    tt = torch.tensor([0.0, 0.2, -0.4, -0.9])
    return x, t, tt, encode(pipe, ["a red cat", "dog", "a blue bird on a branch", ""])


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_openuni_step0_output_equals_the_pretrained_transformer(pretrained, pipe, lora):
    from fewstep.models.openuni import OpenUniModel

    x, t, tt, cond = inputs(pipe)
    assert cond["prompt_embeds"].shape == (4, QUERIES, CAPTION) and bool((cond["prompt_attention_mask"] == 1).all())
    reference = vanilla_velocity(pipe, x, t, cond)
    model = OpenUniModel(pretrained=str(pretrained), time_pair=True, lora=lora, data_shape=[CHANNELS, 6, 4])
    assert model.has_time_pair() and model.family == "openuni"
    with torch.no_grad():
        out = model(x, t, tt, cond)
    assert out.shape == x.shape and torch.equal(out, reference)  # bit-exact: the extras start at zero
    assert reference.abs().max().item() > 1e-2
    with torch.no_grad():  # and they act once trained: the sign row changes negative-time rows only
        model.transformer.time_embed.sign_embedding.weight[1].normal_()
        changed = (model(x, t, tt, cond) - out).flatten(1).abs().amax(1) > 1e-6
    assert changed.tolist() == [False, False, True, True]


def test_openuni_lora_wraps_the_reference_targets_not_the_time_pair_copy(pretrained, pipe):
    from peft.tuners.lora import LoraLayer

    from fewstep.config.schema import OPENUNI_LORA_TARGETS
    from fewstep.models.openuni import DEFAULT_LORA_TARGETS, OpenUniModel
    from fewstep.teachers import EMATeacher

    cfg = compose(["model=openuni_lora"])
    assert list(cfg.model.lora.target_modules) == OPENUNI_LORA_TARGETS == list(DEFAULT_LORA_TARGETS)
    assert cfg.model.lora.rank == 64 and cfg.model.lora.alpha == 64 and len(OPENUNI_LORA_TARGETS) == 7
    model = OpenUniModel(pretrained=str(pretrained), time_pair=True, lora=LORA)
    wrapped = sorted(n for n, m in model.transformer.named_modules() if isinstance(m, LoraLayer))
    attention = [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")]
    attention += [f"transformer_blocks.0.{a}.to_out.0" for a in ("attn1", "attn2")]
    time = ["time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2"]
    assert wrapped == sorted(attention + time + ["time_embed.linear"])  # 11 layers; the copy is not among them
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = {n for n in trainable if ".lora_" not in n}
    assert full == {
        f"transformer.time_embed.target_embedder.{n}"
        for n in ("emb.timestep_embedder.linear_1.weight", "emb.timestep_embedder.linear_1.bias",
                  "emb.timestep_embedder.linear_2.weight", "emb.timestep_embedder.linear_2.bias",
                  "linear.weight", "linear.bias")
    } | {"transformer.time_embed.sign_embedding.weight"}  # fmt: skip
    teacher = EMATeacher(decay=0.99)
    teacher.bind(model)
    assert set(teacher.shadow) == trainable and len(trainable) == 7 + 2 * 11


def test_openuni_pipeline_reads_the_target_time_of_its_current_scheduler():
    """OpenUniPipeline points its TwinFlow transformer at its scheduler on every call: after a TwinFlowScheduler
    ("mul": tt = t) is swapped for another scheduler (no target time), the transformer uses the default tt = 0,
    as an Euler loop on the scheduler's sigmas with the target time fed explicitly, not the old scheduler's tt."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.samplers.scheduler import TwinFlowScheduler

    from helpers.tiny_families import build_tiny_openuni_pipeline, trained_twinflow_sana

    pipe = build_tiny_openuni_pipeline()
    pipe.transformer = transformer = trained_twinflow_sana(pipe.transformer)
    pipe.scheduler = TwinFlowScheduler(sampling_style="mul", stochast_ratio=0.0)
    embeds, _ = pipe.encode_prompt(["a red cat"])
    latents = torch.randn(1, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(3))
    call = {"prompt_embeds": embeds, "height": SIDE, "width": SIDE, "num_inference_steps": 2, "output_type": "latent"}
    pipe(latents=latents.clone(), **call)  # attaches the TwinFlowScheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    out = pipe(latents=latents.clone(), **call).images
    euler = FlowMatchEulerDiscreteScheduler()
    euler.set_timesteps(2)
    x, ones = latents.clone(), torch.ones(1, QUERIES)
    with torch.no_grad():
        for sigma, sigma_next in zip(euler.sigmas[:-1], euler.sigmas[1:]):
            v = transformer(x, embeds, sigma[None] * 1000, encoder_attention_mask=ones, target_timestep=0.0)[0]
            x = x + (sigma_next - sigma) * v
    assert (out - x).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- precompute


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from helpers.tiny_sd3 import save_captioned_images

    folder = tmp_path_factory.mktemp("openuni_images")
    return save_captioned_images(folder, n=4, side=SIDE, caption="a red cat number {i}")


def run_precompute(pretrained, out, *source):
    from fewstep.precompute import main

    return main(
        [f"pretrained={pretrained}", f"out={out}", f"resolution={SIDE}", "batch_size=3", "embeds_dtype=float32"]
        + ["progress=false", *source]
    )


@pytest.fixture(scope="module")
def cache(pretrained, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("openuni_cache")
    run_precompute(pretrained, out, f"images={images}")
    return out


@pytest.fixture(scope="module")
def prompt_cache(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("openuni_prompts")
    (root / "prompts.txt").write_text("a red cat\n\na blue bird on a branch\nsnowy mountains at dawn\n")
    run_precompute(pretrained, root / "cache", f"prompts={root / 'prompts.txt'}")
    return root / "cache"


def test_openuni_precompute_caches_the_conditioner_output_and_dc_ae_latents(pipe, cache, images):
    from fewstep.data.latents import LatentData
    from fewstep.precompute import load_image

    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["family"] == "openuni" and manifest["pipeline_class"] == "OpenUniPipeline"
    assert manifest["summary"]["encoded"] == 4 and manifest["summary"]["latent_buckets"] == {"4x16x16": 4}
    assert manifest["vae"] == {"scaling_factor": 0.41407, "shift_factor": 0.0} and manifest["null_prompt"] == ""
    assert manifest["max_sequence_length"] is None  # does not apply: always num_queries long
    entry = manifest["shards"][0]
    tensors = read_shard(cache / entry["file"], entry)
    assert set(tensors) == {"latents", "prompt_embeds", "prompt_attention_mask"}
    assert tensors["prompt_embeds"].shape == (4, QUERIES, CAPTION) and bool(
        (tensors["prompt_attention_mask"] == 1).all()
    )
    captions = [f"a red cat number {name[3]}" for name in entry["files"]]
    embeds, _ = pipe.encode_prompt(captions, device=torch.device("cpu"))
    assert (tensors["prompt_embeds"] - embeds).abs().max().item() < 1e-6
    pixels = load_image(images / entry["files"][0], (SIDE, SIDE))[None]
    with torch.no_grad():
        expected = pipe.vae.encode(pixels).latent * 0.41407
    assert (tensors["latents"][0] - expected[0]).abs().max().item() < 1e-5 + 2**-8 * expected[0].abs().max().item()
    null = load_file(str(cache / "null.safetensors"))["prompt_embeds"]
    unconditional, _ = pipe.encode_prompt([""])  # "" = the reference's "Generate an image."
    assert null.shape == (1, QUERIES, CAPTION) and (null - unconditional).abs().max().item() < 1e-6
    text = "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n<img>"
    ids = torch.tensor([pipe.tokenizer.encode(text)])
    by_hand = pipe.conditioner.encode(pipe.text_encoder, ids, torch.ones_like(ids))
    assert (null - by_hand).abs().max().item() < 1e-5
    assert (null - embeds[:1]).abs().max().item() > 1e-3
    data = LatentData(str(cache), batch_size=2)
    assert data.family.name == "openuni"
    decoded = data.decode(next(data.batches(0)).x)  # sample grids decode with the DC-AE
    assert decoded.shape == (2, 3, SIDE, SIDE) and decoded.abs().max() <= 1


def test_openuni_prompt_only_precompute_has_the_latent_shape_and_no_latents(pipe, prompt_cache):
    manifest = json.loads((prompt_cache / "manifest.json").read_text())
    assert manifest["prompt_only"] is True and manifest["family"] == "openuni"
    assert [e["latent_shape"] for e in manifest["shards"]] == [[CHANNELS, 16, 16]] and manifest["summary"][
        "encoded"
    ] == 3
    tensors = read_shard(prompt_cache / manifest["shards"][0]["file"], manifest["shards"][0], prompt_only=True)
    assert set(tensors) == {"prompt_embeds", "prompt_attention_mask"} and tensors["prompt_embeds"].shape == (3, 4, 8)
    embeds, _ = pipe.encode_prompt(["a red cat", "a blue bird on a branch", "snowy mountains at dawn"])
    assert (tensors["prompt_embeds"] - embeds).abs().max().item() < 1e-6


# --------------------------------------------------------------------------- train → export → generate


def pipeline_latents(pipe, latents, prompt):
    return pipe(
        prompt, height=SIDE, width=SIDE, num_inference_steps=2, latents=latents.clone(), output_type="latent"
    ).images


FRESH_PROCESS = """
import sys
import fewstep
import diffusers
from diffusers import DiffusionPipeline
lazy = "fewstep.models.openuni" not in sys.modules
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
print(lazy, type(pipe).__module__, type(pipe).__name__, type(pipe.transformer).__name__)
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_openuni_train_export_and_generate_in_two_steps(pretrained, cache, tmp_path, lora):
    from diffusers import DiffusionPipeline

    from fewstep.export.command import main as export_main
    from fewstep.export.pipeline import load_lora_pipeline
    from fewstep.models.openuni import OpenUniPipeline
    from fewstep.models.sana import SanaTwinFlowTransformer2DModel
    from fewstep.samplers.ucgm import UCGMSampler
    from fewstep.training.runs import load_run
    from test_precompute_export import train_run

    run = tmp_path / "run"
    summary = train_run(pretrained, cache, run, "openuni_lora" if lora else "openuni")
    assert summary["steps"] == 3 and np.isfinite(summary["loss"])
    assert sorted(p.name for p in (run / "samples").glob("*.png"))  # grids decoded with the DC-AE
    if lora:
        assert summary["trainable_params"] < summary["params"]
    out = tmp_path / "export"
    info = export_main([f"run_dir={run}", f"out={out}"])
    assert info["family"] == "openuni" and info["time_pair"] and info["step"] == 3
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "OpenUniPipeline"
    assert index["transformer"] == ["fewstep_models_sana", "SanaTwinFlowTransformer2DModel"]
    assert index["conditioner"] == ["fewstep_models_openuni", "OpenUniConditioner"]
    assert index["scheduler"] == ["fewstep_samplers_scheduler", "TwinFlowScheduler"]
    card = (out / "README.md").read_text()
    assert "from diffusers import OpenUniPipeline" in card and "trust_remote_code" not in card

    exported = DiffusionPipeline.from_pretrained(out)  # fewstep is imported: diffusers finds OpenUniPipeline
    exported.set_progress_bar_config(disable=True)
    assert type(exported) is OpenUniPipeline and type(exported.transformer) is SanaTwinFlowTransformer2DModel
    latents = torch.randn(1, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(3))
    generated = pipeline_latents(exported, latents, "a red cat")
    assert torch.isfinite(generated).all() and (generated - latents).abs().max() > 1e-3

    # the native sampler on the weights fewstep.eval / fewstep.sample load (the run's teacher, built and restored
    # by the training code), not on fewstep.export's own loader, which would agree with the export by construction
    scored = load_run(run, device="cpu", command="eval")
    cond = encode(exported, ["a red cat"])
    assert isinstance(scored.sampler, UCGMSampler) and scored.sampler.step_noise == "latents"  # as fewstep.sample
    native = scored.sampler.sample(scored.model_fn("ema"), latents.clone(), cond, 2, generator=torch.Generator())
    assert (generated - native).abs().max().item() < 1e-4
    images = exported("a red cat", height=SIDE, width=SIDE, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 1 and images[0].size == (SIDE, SIDE)  # default: the scheduler's 2 steps, decoded

    if lora:
        assert {"pytorch_lora_weights.safetensors", "twinflow_embeddings.safetensors"} <= set(info["lora_files"])
        lora_pipe = load_lora_pipeline(pretrained, out / "lora")
        lora_pipe.set_progress_bar_config(disable=True)
        assert (pipeline_latents(lora_pipe, latents, "a red cat") - generated).abs().max().item() < 1e-4
    else:  # a fresh process: `import fewstep` is all DiffusionPipeline.from_pretrained needs, and stays lazy
        proc = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS, str(out)], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == [
            "True", "fewstep.models.openuni", "OpenUniPipeline", "SanaTwinFlowTransformer2DModel"
        ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_openuni_resumed_lora_run_equals_an_uninterrupted_one(pretrained, cache, tmp_path):
    """2 steps + resume to 4 gives the same adapter, embeddings, EMA and optimizer state as 4 steps straight."""
    from test_precompute_export import train_run

    every = ["trainer.checkpoint_every=2", "trainer.lr_schedule=constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_run(pretrained, cache, straight, "openuni_lora", "trainer.max_steps=4", *every)
    train_run(pretrained, cache, split, "openuni_lora", "trainer.max_steps=2", *every)
    resumed = train_run(pretrained, cache, split, "openuni_lora", "trainer.max_steps=4", "trainer.resume=auto", *every)
    assert (resumed["start_step"], resumed["steps"]) == (2, 4)  # went on from step 2: a fresh run would end alike
    a, b = (run / "checkpoints" / "step_0000004" for run in (straight, split))
    for name in ("model.safetensors", "teacher.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    teacher = load_file(str(a / "teacher.safetensors"))
    assert len(teacher) == 7 + 2 * 11 and any(".sign_embedding." in k for k in teacher)
    first = load_file(str(a.parent / "step_0000002" / "model.safetensors"))
    model = load_file(str(a / "model.safetensors"))
    assert max((model[k] - first[k]).abs().max().item() for k in model) > 1e-4  # steps 3-4 moved the weights
    oa = torch.load(a / "optim.pt", weights_only=True)["optimizer"]["state"]
    ob = torch.load(b / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]) for k in oa)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data.batch_size=2 is smaller")
def test_openuni_image_free_training_from_prompts_only(pretrained, prompt_cache, tmp_path):
    """``openuni_full_imgfree``'s setting (SPEC §10) on the tiny OpenUni: a frozen teacher, enhanced ratio 4, the
    prompt-only cache; 3 steps with finite losses that move the DiT."""
    from test_precompute_export import train_run

    run = tmp_path / "run"
    extra = ["objective.image_free=true", "teacher=frozen", "objective.enhanced_ratio=4.0", "trainer.log_every=1"]
    summary = train_run(pretrained, prompt_cache, run, "openuni", *extra)
    assert summary["steps"] == 3
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    weights = load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors"))
    start = load_file(str(pretrained / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert max((weights[f"transformer.{k}"] - v).abs().max().item() for k, v in start.items()) > 1e-3
