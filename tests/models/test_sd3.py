"""SD3 wrapper: target-time / sign embeddings are an exact identity at init, LoRA trains only adapters and
embeddings (and the EMA teacher holds only those), loading errors are one line, the export class round-trips."""

from __future__ import annotations

import pytest
import torch

from fewstep.models.sd3 import (
    PretrainedNotFound,
    SD3Model,
    SD3TwinFlowTransformer2DModel,
    TwinFlowTimeTextEmbedding,
    resolve_pretrained,
)
from fewstep.teachers import EMATeacher

LORA = {"enabled": True, "rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def inputs(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 12, generator=g)
    t = torch.tensor([1.0, 0.7, -0.4, -0.9])[:n]
    tt = torch.tensor([0.0, 0.2, -0.4, -0.9])[:n]
    cond = {
        "prompt_embeds": torch.randn(n, 9, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(n, 64, generator=g),
    }
    return x, t, tt, cond


def vanilla_velocity(pretrained, x, t, cond):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer")
    with torch.no_grad():
        return transformer(
            hidden_states=x,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=t.abs() * 1000,
            return_dict=False,
        )[0]


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_time_pair_embeddings_are_identity_at_init(pretrained, lora):
    x, t, tt, cond = inputs()
    reference = vanilla_velocity(pretrained, x, t, cond)
    model = SD3Model(pretrained=str(pretrained), time_pair=True, lora=lora, data_shape=[4, 16, 16])
    assert isinstance(model.transformer.time_text_embed, TwinFlowTimeTextEmbedding)
    with torch.no_grad():
        out = model(x, t, tt, cond)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out - reference).abs().max().item() < 1e-6
    assert reference.abs().max().item() > 1e-3  # the transformer is not trivially zero


def test_vanilla_model_has_no_extra_modules(pretrained):
    from diffusers import SD3Transformer2DModel

    model = SD3Model(pretrained=str(pretrained), time_pair=False)
    base = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer")
    assert type(model.transformer.time_text_embed).__name__ == "CombinedTimestepTextProjEmbeddings"
    assert set(model.transformer.state_dict()) == set(base.state_dict())
    x, t, tt, cond = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, tt, cond), model(x, t, torch.zeros_like(tt), cond))  # tt is ignored


def test_embeddings_act_once_trained(pretrained):
    """Sign row 1 changes only negative-time rows; the target term vanishes where t == tt."""
    x, t, tt, cond = inputs()
    model = SD3Model(pretrained=str(pretrained), time_pair=True)
    emb = model.transformer.time_text_embed
    with torch.no_grad():
        before = model(x, t, tt, cond)
        emb.sign_embedding.weight[1].normal_()
        after_sign = model(x, t, tt, cond)
        changed = (after_sign - before).flatten(1).abs().amax(1) > 1e-6
        assert changed.tolist() == [False, False, True, True]
        emb.sign_embedding.weight.zero_()
        torch.nn.init.normal_(emb.target_embedder.timestep_embedder.linear_2.weight)
        after_target = model(x, t, tt, cond)
        changed = (after_target - before).flatten(1).abs().amax(1) > 1e-6
        assert changed.tolist() == [True, True, False, False]  # rows 2, 3 have t == tt


def test_lora_trains_only_adapters_and_embeddings_and_ema_holds_only_them(pretrained):
    model = SD3Model(pretrained=str(pretrained), time_pair=True, lora=LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name or ".target_embedder." in name or ".sign_embedding." in name
    assert any(".target_embedder." in n for n in trainable) and any(".sign_embedding." in n for n in trainable)
    assert any(".add_q_proj.lora_A." in n for n in trainable) and any(".to_out.0.lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("transformer_blocks.0.attn.to_q.base_layer.weight" in n for n in frozen)
    assert any("time_text_embed.timestep_embedder.linear_1.weight" in n for n in frozen)

    teacher = EMATeacher(decay=0.99)
    teacher.bind(model)
    assert set(teacher.shadow) == trainable
    x, t, tt, cond = inputs()
    with torch.no_grad():
        assert torch.equal(teacher.model(x, t, tt, cond), model(x, t, tt, cond))

    # one step moves the adapters and embeddings; the EMA (functional_call) tracks them
    loss = model(x, t, tt, cond).pow(2).mean()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= trainable
    assert any(".sign_embedding." in n for n in grads) and any(".target_embedder." in n for n in grads)


def test_gradient_checkpointing_gives_the_same_gradients(pretrained):
    x, t, tt, cond = inputs()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SD3Model(pretrained=str(pretrained), time_pair=True, lora=LORA, gradient_checkpointing=checkpointing)
        assert model.transformer.is_gradient_checkpointing == checkpointing
        model(x, t, tt, cond).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-5


def test_dtype_config_and_output_dtype(pretrained):
    x, t, tt, cond = inputs()
    model = SD3Model(pretrained=str(pretrained), time_pair=True, dtype="bfloat16")
    assert next(model.transformer.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert model(x, t, tt, cond).dtype == torch.float32
        assert model(x.bfloat16(), t, tt, cond).dtype == torch.bfloat16
    lora = SD3Model(pretrained=str(pretrained), time_pair=True, dtype="bf16", lora=LORA)
    assert all(p.dtype == torch.float32 for p in lora.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.isfinite(lora(x, t, tt, cond)).all()
    with pytest.raises(ValueError, match="model.dtype"):
        SD3Model(pretrained=str(pretrained), dtype="float8")


def test_bare_transformer_folder_and_errors(pretrained, tmp_path):
    assert resolve_pretrained(str(pretrained), "transformer") == (str(pretrained), "transformer")
    bare = pretrained / "transformer"
    assert resolve_pretrained(str(bare), "transformer") == (str(bare), None)
    SD3Model(pretrained=str(bare))  # loads

    cases = [
        (str(tmp_path / "nowhere"), "no such folder"),
        (str(tmp_path), "neither transformer/config.json nor config.json"),
        ("", "is empty"),
        ("not a hub id", "not a hub id"),
    ]
    for value, phrase in cases:
        with pytest.raises(PretrainedNotFound) as err:
            SD3Model(pretrained=value)
        message = str(err.value)
        assert "model.pretrained" in message and phrase in message and "\n" not in message


def test_uncached_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedNotFound) as err:
        SD3Model(pretrained="fewstep-test/does-not-exist")
    assert "model.pretrained=fewstep-test/does-not-exist" in str(err.value) and "\n" not in str(err.value)


def test_cond_must_be_prompt_embeddings(pretrained):
    model = SD3Model(pretrained=str(pretrained))
    x, t, tt, _ = inputs()
    with pytest.raises(TypeError, match="prompt_embeds"):
        model(x, t, tt, torch.zeros(4, dtype=torch.long))


def test_latent_channels_must_match(pretrained):
    with pytest.raises(ValueError, match="3-channel latents"):
        SD3Model(pretrained=str(pretrained), data_shape=[3, 16, 16])


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_export_class_round_trips(pretrained, tmp_path, lora):
    x, t, tt, cond = inputs()
    t, tt = t.abs(), tt.abs()  # a pipeline only sees positive times
    model = SD3Model(pretrained=str(pretrained), time_pair=True, lora=lora)
    with torch.no_grad():  # make the embeddings and adapters matter
        for name, p in model.named_parameters():
            if p.requires_grad and ("sign_embedding" in name or "linear_2" in name or "lora_B" in name):
                p.normal_(0, 0.1)
        expected = model(x, t, tt, cond)
    exported = model.export_transformer()
    exported.save_pretrained(tmp_path / "transformer")
    loaded = SD3TwinFlowTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert loaded.config.time_pair is True
    assert isinstance(loaded.time_text_embed, TwinFlowTimeTextEmbedding)

    def call(**kw):
        with torch.no_grad():
            return loaded(
                hidden_states=x,
                encoder_hidden_states=cond["prompt_embeds"],
                pooled_projections=cond["pooled_prompt_embeds"],
                timestep=t * 1000,
                return_dict=False,
                **kw,
            )[0]

    assert (call(target_timestep=tt * 1000) - expected).abs().max().item() < 1e-5

    class Source:  # a scheduler stand-in: the target time of the step about to run
        def current_target_time(self):
            return 0.0

    with torch.no_grad():
        at_zero = model(x, t, torch.zeros_like(tt), cond)
    assert (call() - at_zero).abs().max().item() < 1e-5  # default_target_time = 0
    loaded.use_scheduler_target_time(Source())
    assert (call() - at_zero).abs().max().item() < 1e-5


def test_reference_lora_targets_leave_the_new_embeddings_unwrapped(pretrained):
    """The reference targets include ``timestep_embedder.linear_1``; its TwinFlow copy is trained in full."""
    targets = ["timestep_embedder.linear_1", "timestep_embedder.linear_2", "attn.add_k_proj", "attn.to_q"]
    model = SD3Model(pretrained=str(pretrained), time_pair=True, lora={**LORA, "target_modules": targets})
    names = [n for n, _ in model.named_parameters()]
    assert any("time_text_embed.timestep_embedder.linear_1.lora_A" in n for n in names)
    assert not any("target_embedder" in n and "lora_" in n for n in names)
    x, t, tt, cond = inputs()
    with torch.no_grad():
        assert (model(x, t, tt, cond) - vanilla_velocity(pretrained, x, t, cond)).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="matched no Linear layer"):
        SD3Model(pretrained=str(pretrained), lora={**LORA, "target_modules": ["nothing_here"]})


def test_no_grad_chunk_gives_the_same_outputs(pretrained):
    x, t, tt, cond = inputs()
    whole = SD3Model(pretrained=str(pretrained), time_pair=True)
    chunked = SD3Model(pretrained=str(pretrained), time_pair=True, no_grad_chunk=3)
    with torch.no_grad():
        torch.nn.init.normal_(whole.transformer.time_text_embed.sign_embedding.weight)
        chunked.load_state_dict(whole.state_dict())
        assert (chunked(x, t, tt, cond) - whole(x, t, tt, cond)).abs().max().item() < 1e-6
    calls = []
    chunked.transformer.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        chunked(x, t, tt, cond)
    assert len(calls) == 2  # 4 rows in chunks of 3
    chunked(x, t, tt, cond).sum().backward()  # with grad: one call
    assert len(calls) == 3
