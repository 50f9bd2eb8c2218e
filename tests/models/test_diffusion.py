"""diff2flow model bridge (SPEC §5): oracle epsilon / v models give the exact flow velocity z − x, the UNet
wrapper feeds the matching diffusion state and timestep, and its tt/sign embeddings are an identity at init."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.models.diff2flow import (
    alpha_bar_from_flow_time,
    bridged_velocity,
    flow_time_from_alpha_bar,
    flow_time_range,
    make_alphas_cumprod,
)

from helpers.tiny_sd3 import build_tiny_unet

TIMES = [0.01, 0.05, 0.25, 0.5, 0.75, 0.93]
ALPHAS = make_alphas_cumprod(1000, "scaled_linear", 0.00085, 0.012)


def data(n, seed=0, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)


def expand(v, ref):
    return v.reshape(-1, *([1] * (ref.ndim - 1))).to(ref.dtype)


def oracle_prediction(x, z, t, prediction_type):
    """The exact epsilon / v of the diffusion state ``√ᾱ x + √(1 − ᾱ) z`` at ᾱ = ᾱ(|t|)."""
    alpha_bar = alpha_bar_from_flow_time(t.abs().double())
    a, b = expand(alpha_bar.sqrt(), x), expand((1 - alpha_bar).sqrt(), x)
    return z if prediction_type == "epsilon" else a * z - b * x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_oracle_models_give_the_flow_velocity(prediction_type):
    x, z = data(len(TIMES))
    t = torch.tensor(TIMES)
    x_flow = expand(t, x) * z + (1 - expand(t, x)) * x
    seen = {}

    def predict(x_diff, timestep):
        seen["x_diff"], seen["timestep"] = x_diff, timestep
        return oracle_prediction(x, z, t, prediction_type)

    v = bridged_velocity(predict, x_flow, t, ALPHAS, prediction_type)
    assert v.dtype == x_flow.dtype
    assert (v - (z - x)).abs().max().item() < 1e-5
    # the model saw the diffusion state of (x, z) at ᾱ(t), and the timestep whose σ is t
    alpha_bar = alpha_bar_from_flow_time(t.double())
    expected_state = expand(alpha_bar.sqrt(), x) * x + expand((1 - alpha_bar).sqrt(), x) * z
    assert (seen["x_diff"] - expected_state).abs().max().item() < 1e-5
    k = seen["timestep"]
    lo = k.floor().long().clamp(max=998)
    table_alpha = ALPHAS[lo] + (ALPHAS[lo + 1] - ALPHAS[lo]) * (k - lo)
    sigma_min = flow_time_range(ALPHAS)[0]
    inside = t > sigma_min
    assert (flow_time_from_alpha_bar(table_alpha)[inside] - t[inside].double()).abs().max().item() < 2e-3
    assert k[~inside].eq(0).all()  # below the schedule's smallest σ the timestep clamps to 0


def test_negative_times_use_the_magnitude():
    x, z = data(3)
    t = torch.tensor([-0.2, -0.5, -0.9])
    x_flow = expand(t.abs(), x) * z + (1 - expand(t.abs(), x)) * x
    v = bridged_velocity(lambda xd, k: oracle_prediction(x, z, t, "epsilon"), x_flow, t, ALPHAS, "epsilon")
    assert (v - (z - x)).abs().max().item() < 1e-5


def test_times_beyond_the_schedule_are_clamped_and_finite():
    x, z = data(2)
    t = torch.tensor([1.0, 0.99])
    v = bridged_velocity(lambda xd, k: z, z.clone(), t, ALPHAS, "epsilon")
    assert torch.isfinite(v).all()
    t_max = flow_time_range(ALPHAS)[1]
    assert 0.93 < t_max < 0.94  # SD's scaled_linear schedule ends at σ ≈ 0.936


# --------------------------------------------------------------------------- the UNet wrapper


@pytest.fixture(scope="module")
def unet_dirs(tmp_path_factory):
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("sd15")
    torch.manual_seed(0)
    unet = build_tiny_unet(sample_size=8, cross_attention_dim=16)
    dirs = {}
    for prediction_type in ("epsilon", "v_prediction"):
        folder = root / prediction_type
        unet.save_pretrained(folder / "unet")
        DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
        ).save_pretrained(folder / "scheduler")
        dirs[prediction_type] = folder
    return dirs


def cond(n, seed=1):
    return {"prompt_embeds": torch.randn(n, 5, 16, generator=torch.Generator().manual_seed(seed))}


class OracleUNet(torch.nn.Module):
    def __init__(self, x, z, t, prediction_type):
        super().__init__()
        self.x, self.z, self.t, self.prediction_type = x, z, t, prediction_type
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        self.calls.append((sample, timestep))
        return (oracle_prediction(self.x, self.z, self.t, self.prediction_type),)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_wrapper_with_oracle_unet_gives_the_flow_velocity(unet_dirs, prediction_type):
    from fewstep.models.diffusion import DiffusionUNetModel

    model = DiffusionUNetModel(pretrained=str(unet_dirs[prediction_type]), prediction_type=prediction_type)
    x, z = data(len(TIMES))
    t = torch.tensor(TIMES) * torch.tensor([1, -1] * 3)  # signed: the fake trajectory too
    x_flow = expand(t.abs(), x) * z + (1 - expand(t.abs(), x)) * x
    model.unet = OracleUNet(x, z, t, prediction_type)
    v = model(x_flow, t, torch.zeros_like(t), cond(len(TIMES)))
    assert (v - (z - x)).abs().max().item() < 1e-5
    ((sample, timestep),) = model.unet.calls
    assert timestep.dtype == torch.float32 and (timestep >= 0).all() and (timestep <= 999).all()
    assert timestep[2] > timestep[1] > timestep[0]  # noisier flow time → later diffusion step


def test_wrapper_reads_the_schedule_and_checks_the_prediction_type(unet_dirs):
    from fewstep.models.diffusion import DiffusionUNetModel

    with pytest.raises(ValueError, match="set model.prediction_type=v_prediction"):
        DiffusionUNetModel(pretrained=str(unet_dirs["v_prediction"]), prediction_type="epsilon")
    with pytest.raises(ValueError, match="epsilon' or 'v_prediction"):
        DiffusionUNetModel(pretrained=str(unet_dirs["epsilon"]), prediction_type="flow")
    bare = DiffusionUNetModel(pretrained=str(unet_dirs["epsilon"] / "unet"), beta_schedule="linear")
    assert not torch.allclose(bare.alphas_cumprod, ALPHAS)  # no scheduler beside a bare UNet: the config's
    model = DiffusionUNetModel(pretrained=str(unet_dirs["epsilon"]), beta_schedule="linear")
    assert torch.allclose(model.alphas_cumprod, ALPHAS)  # the pipeline's scheduler config wins


@pytest.mark.parametrize("lora", [None, {"enabled": True, "rank": 2, "alpha": 2}], ids=["full", "lora"])
def test_unet_time_pair_embeddings_are_identity_at_init(unet_dirs, lora):
    from fewstep.models.diffusion import DiffusionUNetModel

    vanilla = DiffusionUNetModel(pretrained=str(unet_dirs["epsilon"]))
    model = DiffusionUNetModel(pretrained=str(unet_dirs["epsilon"]), time_pair=True, lora=lora)
    x, _ = data(4)
    t = torch.tensor([1.0, 0.6, -0.3, -0.8])
    tt = torch.tensor([0.0, 0.3, -0.3, -0.8])
    c = cond(4)
    with torch.no_grad():
        ref = vanilla(x, t, tt, c)
        out = model(x, t, tt, c)
        assert (out - ref).abs().max().item() < 1e-6
        model.sign_embedding.weight[1].normal_()
        changed = (model(x, t, tt, c) - ref).flatten(1).abs().amax(1) > 1e-6
    assert changed.tolist() == [False, False, True, True]
    if lora:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(
            ".lora_" in n or n.startswith(("target_embedding.", "sign_embedding.")) for n in trainable
        )


def test_sd15_config_is_refused_without_the_bridge_flags(tmp_path):
    from fewstep.config.validate import ConfigError, validate

    from helpers import compose

    with pytest.raises(ConfigError, match="diff2flow.enabled=true"):
        validate(compose(["model=sd15"]))
    (tmp_path / "unet").mkdir()  # the checks read the UNet's config.json and the cache's manifest, nothing more
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))
    manifest = {"pipeline_class": "StableDiffusionPipeline", "shards": [{"count": 2, "latent_shape": [4, 8, 8]}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    given = [f"model.pretrained={tmp_path}", "data=latents", f"data.path={tmp_path}"]
    cfg = validate(compose(["model=sd15", "diff2flow.enabled=true", "objective.allow_diff2flow=true", *given]))
    assert cfg.model.prediction_type == "epsilon"


def test_wrapper_reads_a_zero_terminal_snr_schedule(unet_dirs, tmp_path):
    """A scheduler config with rescale_betas_zero_snr (zero terminal SNR v-prediction models) has another ᾱ table:
    the bridge must use the scheduler's own, not the un-rescaled betas."""
    import shutil

    from diffusers import DDPMScheduler

    from fewstep.models.diffusion import DiffusionUNetModel

    folder = tmp_path / "zsnr"
    shutil.copytree(unet_dirs["v_prediction"] / "unet", folder / "unet")
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    )
    scheduler.save_pretrained(folder / "scheduler")
    model = DiffusionUNetModel(pretrained=str(folder), prediction_type="v_prediction")
    theirs = scheduler.alphas_cumprod.double()
    assert (model.alphas_cumprod - theirs).abs().max().item() < 1e-6
    t = torch.tensor(TIMES + [0.999])
    x, z = data(len(t))
    x_flow = expand(t, x) * z + (1 - expand(t, x)) * x
    model.unet = OracleUNet(x, z, t, "v_prediction")
    v = model(x_flow, t, torch.zeros_like(t), cond(len(t)))
    assert (v - (z - x)).abs().max().item() < 1e-4  # the schedule reaches t = 1: no clamping below it
    scheduler.register_to_config(prediction_type="epsilon")
    scheduler.save_pretrained(folder / "scheduler")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DiffusionUNetModel(pretrained=str(folder), prediction_type="epsilon")
