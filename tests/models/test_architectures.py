"""Shipped real-size architectures (no weights), their random-weight instances and the synthetic data source."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.synthetic import SyntheticData
from fewstep.models import architectures
from fewstep.models.architectures import ArchitectureError, load, materialize, random_transformer
from fewstep.models.family import families

PUBLISHED = {
    "sd35_medium": 2.24e9,
    "sd35_large": 8.06e9,
    "sana_1600m_1024px": 1.60e9,
    "openuni_l_512": 1.60e9,  # its SANA-1.6B-512 DiT (the frozen LM/connector are cached, never built)
    "qwen_image": 20.4e9,
    "sdxl_base": 2.567e9,  # the SDXL-base UNet (2,567,463,684)
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_shipped_architecture_has_its_published_parameter_count(name):
    import diffusers
    from accelerate import init_empty_weights

    arch = load(name)
    with init_empty_weights():
        model = getattr(diffusers, arch.class_name).from_config(arch.config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005, count
    assert arch.params == PUBLISHED[name]


def test_the_shipped_list_and_a_clear_error_for_an_unknown_name():
    assert architectures.names() == sorted(PUBLISHED)
    with pytest.raises(ArchitectureError, match="model.architecture='sd35' is not shipped; choose one of"):
        load("sd35")


def test_reduced_depth_keeps_width_and_drops_dual_attention_layers_past_it():
    arch = load("sd35_medium").with_layers(2)
    assert arch.config["num_layers"] == 2 and arch.config["dual_attention_layers"] == [0, 1]
    assert arch.config["num_attention_heads"] == 24
    with pytest.raises(ArchitectureError, match=r"model.num_layers=25 must be in 1..24"):
        load("sd35_medium").with_layers(25)


@pytest.mark.slow
def test_random_transformer_is_materialised_in_the_dtype_with_finite_generic_init():
    model = random_transformer("sd35_medium", torch.bfloat16, "cpu", num_layers=1)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    assert not any(p.is_meta for p in params.values())
    w = params["transformer_blocks.0.attn.to_q.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 1e-3
    assert torch.equal(params["transformer_blocks.0.attn.to_q.bias"].float(), torch.zeros(1536))
    assert torch.equal(params["transformer_blocks.0.attn.norm_q.weight"].float(), torch.ones(64))
    # buffers computed at construction (SD3's sin-cos position table) keep their values
    pos = model.pos_embed.pos_embed
    assert pos.shape == (1, 384 * 384, 1536) and pos.abs().max() > 0.5
    # same seed, same weights
    again = random_transformer("sd35_medium", torch.bfloat16, "cpu", num_layers=1)
    assert torch.equal(again.transformer_blocks[0].attn.to_q.weight, params["transformer_blocks.0.attn.to_q.weight"])


def test_materialize_refuses_a_meta_buffer():
    module = torch.nn.Module()
    module.register_buffer("table", torch.empty(3, device="meta"))
    with pytest.raises(ArchitectureError, match="buffer table"):
        materialize(module, "cpu", torch.float32)


@pytest.mark.parametrize(
    ("name", "latent", "cond"),
    [
        ("sd35_medium", (16, 128, 128), {"prompt_embeds": (333, 4096), "pooled_prompt_embeds": (2048,)}),
        ("sana_1600m_1024px", (32, 32, 32), {"prompt_embeds": (300, 2304), "prompt_attention_mask": (300,)}),
        ("qwen_image", (16, 128, 128), {"prompt_embeds": (512, 3584), "prompt_embeds_mask": (512,)}),
        ("openuni_l_512", (32, 32, 32), {"prompt_embeds": (256, 2304), "prompt_attention_mask": (256,)}),
    ],
)
def test_synthetic_data_has_the_architectures_real_shapes_at_1024(name, latent, cond):
    data = SyntheticData(name, resolution=1024, batch_size=2)
    assert data.shape == latent
    batch = next(data.batches(0))
    assert tuple(batch.x.shape) == (2, *latent)
    assert {k: tuple(v.shape[1:]) for k, v in batch.cond.items()} == cond
    # the text length is what precompute writes by default: the family's pipeline default (after SD3's 77 CLIP
    # tokens); OpenUni's is its fixed 256 queries
    family = families()[data.architecture.family]
    clip = 77 if family.name == "sd3" else 0
    assert cond["prompt_embeds"][0] == clip + (family.max_sequence_length or 256)
    for k, v in batch.cond.items():
        if k.endswith("mask"):
            assert torch.equal(v, torch.ones_like(v)) and torch.equal(batch.null_cond[k], v)
        else:
            assert torch.equal(batch.null_cond[k], torch.zeros_like(v)) and v.std() > 0.9


def test_synthetic_batches_are_seeded_by_position_and_slot():
    data = SyntheticData("sana_1600m_1024px", resolution=64, batch_size=1)
    a, b = data.batches(3, position=5), data.batches(3, position=5)
    assert torch.equal(next(a).x, next(b).x)
    assert not torch.equal(next(data.batches(3, 5, rank=0, world=2)).x, next(data.batches(3, 5, rank=1, world=2)).x)
    assert not torch.equal(next(data.batches(3, 5)).x, next(data.batches(3, 6)).x)


def test_synthetic_text_tokens_mask_the_padding_and_qwen_image_drops_it():
    """data.text_tokens=N: N valid prompt tokens, the rest zero padding masked out (as precompute writes short
    prompts); Qwen-Image's call keeps only the columns some row uses, so its text stream is N tokens long."""
    from fewstep.models.qwenimage import trim_text

    data = SyntheticData("qwen_image", resolution=64, batch_size=2, text_tokens=40)
    cond = next(data.batches(0)).cond
    mask, embeds = cond["prompt_embeds_mask"], cond["prompt_embeds"]
    assert mask.shape == (2, 512) and mask[:, :40].eq(1).all() and mask[:, 40:].eq(0).all()
    assert embeds[:, 40:].abs().sum() == 0 and embeds[:, :40].std() > 0.9
    kept, kept_mask = trim_text(embeds, mask)
    assert kept.shape == (2, 40, 3584) and kept_mask is None
    for name, tokens, message in [
        ("sd35_medium", 5, r"has a fixed length \(333 tokens, no padding mask\)"),
        ("openuni_l_512", 5, r"has a fixed length \(256 tokens"),
        ("sana_1600m_1024px", 301, r"must lie in \[1, 300\]"),
    ]:
        with pytest.raises(ArchitectureError, match=message):
            SyntheticData(name, resolution=64, text_tokens=tokens)


def test_synthetic_resolution_must_be_a_multiple_of_the_vae_factor():
    with pytest.raises(ArchitectureError, match=r"data.resolution=1000 must be a positive multiple of 32"):
        SyntheticData("sana_1600m_1024px", resolution=1000)
    preview = SyntheticData("sd35_medium", resolution=64).decode(torch.randn(2, 16, 8, 8))
    assert preview.shape == (2, 3, 8, 8) and preview.abs().max() <= 1


REAL_SIZE_DRY_RUN = [
    "model=sd35_lora", "data=synthetic", "model.random_init=true", "model.num_layers=1", "data.resolution=64",
    "data.batch_size=4", "trainer.max_steps=2", "trainer.checkpoint_every=2", "trainer.sample_every=1000",
    "trainer.log_every=1", "trainer.final_nfe=[1]", "trainer.baseline_steps=0", "trainer.grid_size=2", "logger=none",
]  # fmt: skip


@pytest.mark.slow
def test_random_init_trains_at_reduced_depth_and_export_eval_sample_refuse_it(tmp_path):
    from fewstep.export.command import main as export_main
    from fewstep.training.loop import train
    from fewstep.training.runs import RunDirError, load_run

    from helpers import compose

    cfg = compose(REAL_SIZE_DRY_RUN)
    assert cfg.data.architecture == cfg.model.architecture == "sd35_medium"  # the data follows the model
    # the default final grids and Euler baseline of a random model are turned off (noise, minutes at real size);
    # values given stay (trainer.final_nfe=[1] above: the latent preview asserted below)
    from fewstep.config.validate import validate

    bare = [o for o in REAL_SIZE_DRY_RUN if not o.startswith(("trainer.final_nfe", "trainer.baseline_steps"))]
    with pytest.warns(UserWarning, match=r"random_init=true: trainer.final_nfe=\[\] trainer.baseline_steps=0"):
        quiet = validate(compose(bare))
    assert list(quiet.trainer.final_nfe) == [] and quiet.trainer.baseline_steps == 0
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    assert (tmp_path / "run/samples/nfe_1.png").exists()  # a latent preview: no VAE ships with an architecture
    (tmp_path / "run/.hydra").mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, tmp_path / "run/.hydra/config.yaml")
    for command, call in (
        ("sample", lambda: load_run(tmp_path / "run")),
        ("eval", lambda: load_run(tmp_path / "run", command="eval")),
        ("export", lambda: export_main([f"run_dir={tmp_path / 'run'}", f"out={tmp_path / 'out'}"])),
    ):
        # fewstep.export's main turns it into its one error line (SystemExit), as every run dir problem
        with pytest.raises((RunDirError, SystemExit), match=f"model.random_init=true.*fewstep.{command} refuses it"):
            call()
    assert not (tmp_path / "out").exists()


def test_random_init_refuses_an_architecture_of_another_family():
    from fewstep.models.sd3 import SD3Model

    with pytest.raises(ArchitectureError, match="is a SanaTransformer2DModel, not the sd3 family's"):
        SD3Model(random_init=True, architecture="sana_1600m_1024px", num_layers=1)
    with pytest.raises(ArchitectureError, match="needs model.architecture"):
        SD3Model(random_init=True, architecture="", num_layers=1)


def test_a_random_init_model_on_image_data_is_told_to_use_synthetic_latents():
    from fewstep.config.validate import ConfigError, validate

    from helpers import compose

    with pytest.raises(ConfigError, match=r"model.random_init=true trains on latents .*: give data=synthetic"):
        validate(compose(["model=sd35_lora", "model.random_init=true"]))
    validate(compose(["model=sd35_lora", "model.random_init=true", "data=synthetic"]))  # no weights needed


def test_validate_names_an_architecture_of_another_family_and_a_misspelt_one_once():
    from fewstep.config.validate import ConfigError, validate

    from helpers import compose

    base = ["model.random_init=true", "data=synthetic"]
    with pytest.raises(ConfigError, match=r"^model.architecture=qwen_image is a QwenImageTransformer2DModel, not the"):
        validate(compose(["model=sana", "model.architecture=qwen_image", *base]))
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=sd35_lora", "model.architecture=sd35_mediun", *base]))
    assert str(err.value).count("is not shipped") == 1
    assert "(did you mean sd35_medium?)" in str(err.value)
