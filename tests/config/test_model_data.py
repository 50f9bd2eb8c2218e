"""Model/data combinations are checked before any weight loads (validate.check_model_data), and a user error
raised while Hydra instantiates a component is the same one ``error:`` line (exit 2) as every other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from fewstep.config.validate import ConfigError, check_overrides, validate
from fewstep.data.latents import LatentCacheError
from fewstep.errors import FewstepError, user_error

from helpers import FAST, compose

PRECOMPUTE = "python -m fewstep.precompute pretrained="


def config_only_pretrained(root: Path, component: str = "transformer", **config) -> Path:
    """A pipeline folder holding only ``<component>/config.json``: enough for the checks, no weights."""
    (root / component).mkdir(parents=True)
    base = {"_class_name": "SD3Transformer2DModel", "in_channels": 4, "patch_size": 1, "pos_embed_max_size": 96}
    (root / component / "config.json").write_text(json.dumps({**base, **config}))
    return root


def manifest_only_cache(
    root: Path, shapes: list[list[int]], resolution: int = 16, pipeline: str = "StableDiffusion3Pipeline"
) -> Path:
    """A cache folder holding only ``manifest.json`` (shards listed, files absent)."""
    root.mkdir(parents=True)
    shards = [
        {"file": f"shards/shard_{i:05d}.safetensors", "count": 3, "latent_shape": s} for i, s in enumerate(shapes)
    ]
    manifest = {"resolution": resolution, "pipeline_class": pipeline, "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def one_line_error(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def offline_env(tmp_path: Path) -> dict:
    """No weights reachable: an empty hub cache, offline, and nothing of the checkout on the path."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_flagship_command_without_weights_is_one_error_line_from_any_directory(tmp_path):
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "fewstep", "objective=twinflow", "model=sd35"],
        cwd=cwd, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model=sd35 needs its weights and a latent cache: ")
    line = lines[0]
    assert "model.pretrained=stabilityai/stable-diffusion-3.5-medium: could not load it" in line  # the weights
    assert "not data=digits: give data=latents data.path=CACHE" in line  # the data
    assert f"`{PRECOMPUTE}stabilityai/stable-diffusion-3.5-medium images=DIR out=CACHE`" in line
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert list(cwd.iterdir()) == []  # checked before Hydra made a run dir


def test_diffusers_family_on_pixel_data_names_the_latent_cache(tmp_path):
    pretrained = config_only_pretrained(tmp_path / "pipe")
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=sd35", f"model.pretrained={pretrained}", "data=toy2d"]))
    message = one_line_error(err)
    assert message == (
        "model._target_=fewstep.models.sd3.SD3Model trains on VAE latents, not "
        "data._target_=fewstep.data.toy2d.Toy2DData: give data=latents data.path=CACHE, a cache written by "
        f"`{PRECOMPUTE}{pretrained} images=DIR out=CACHE`"
    )
    # the CLI check names the choices as the user wrote them
    problem = check_overrides(["model=sd35_lora", f"model.pretrained={pretrained}"])
    assert problem.startswith("model=sd35_lora trains on VAE latents, not data=digits: give data=latents")


def test_latent_data_on_a_pixel_model_names_a_diffusers_family(tmp_path):
    cache = manifest_only_cache(tmp_path / "cache", [[4, 16, 16]])
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=tiny", "data=latents", f"data.path={cache}"]))
    message = one_line_error(err)
    assert "data._target_=fewstep.data.latents.LatentData holds VAE latents of a diffusers model" in message
    assert "model=sd35 model.pretrained=WEIGHTS" in message and "data=digits / data=toy2d" in message
    assert f"`{PRECOMPUTE}WEIGHTS images=DIR out=CACHE`" in message


def test_a_relative_path_that_does_not_exist_is_named_as_neither_folder_nor_cached_hub_id(monkeypatch):
    """`model.pretrained=tiny/nope` (a typo of a local folder, or a hub id): without network the message says it is
    neither a local folder nor in the hub cache, not only that the hub is unreachable."""
    from huggingface_hub import constants

    import fewstep.models.pretrained_config as pc

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(pc, "_hub_reachable", lambda endpoint: False)
    with pytest.raises(OSError, match="tiny-nobody/nope is neither a local folder nor cached"):
        pc._read_hub_config("tiny-nobody/nope", "transformer", None)


def test_missing_cache_and_missing_weights_are_named_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=sd35", f"model.pretrained={tmp_path}/nope", "data=latents"]))
    message = one_line_error(err)
    assert message.startswith("model._target_=fewstep.models.sd3.SD3Model needs its weights and a latent cache: ")
    assert f"model.pretrained={tmp_path}/nope: no such folder" in message
    assert "; and data.path is not set: write a cache with `python -m fewstep.precompute" in message


def test_cache_channels_and_size_are_checked_against_the_transformer_config(tmp_path):
    pretrained = config_only_pretrained(tmp_path / "pipe", pos_embed_max_size=8, patch_size=2)
    ok = manifest_only_cache(tmp_path / "ok", [[4, 16, 16], [4, 12, 16]], resolution=16)
    validate(compose(["model=sd35", f"model.pretrained={pretrained}", "data=latents", f"data.path={ok}"]))
    big = manifest_only_cache(tmp_path / "big", [[4, 16, 16], [4, 24, 18]], resolution=512)
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=sd35", f"model.pretrained={pretrained}", "data=latents", f"data.path={big}"]))
    assert one_line_error(err) == (
        f"data.path={big} holds latents up to 24 wide/high (1 of 2 latent sizes) but model.pretrained={pretrained} "
        "takes at most 16 (pos_embed_max_size 8 x patch_size 2): re-run precompute with resolution=341 or lower "
        "into a new out dir"
    )
    wrong = manifest_only_cache(tmp_path / "wrong", [[16, 8, 8]])
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=sd35", f"model.pretrained={pretrained}", "data=latents", f"data.path={wrong}"]))
    assert f"data.path={wrong} holds 16-channel latents but model.pretrained={pretrained} takes 4" in str(err.value)
    # a UNet family (no pos_embed_max_size) has no size limit, only the channel count
    unet = config_only_pretrained(
        tmp_path / "sd15", "unet", _class_name="UNet2DConditionModel", pos_embed_max_size=None
    )
    sd15 = ["model=sd15", f"model.pretrained={unet}", "diff2flow.enabled=true", "objective.allow_diff2flow=true"]
    big15 = manifest_only_cache(tmp_path / "big15", [[4, 24, 18]], resolution=512, pipeline="StableDiffusionPipeline")
    validate(compose([*sd15, "data=latents", f"data.path={big15}"]))


def test_user_error_inside_instantiate_is_unwrapped(tmp_path):
    with pytest.raises(Exception) as err:
        instantiate({"_target_": "fewstep.data.latents.LatentData", "path": str(tmp_path / "none")})
    assert type(err.value).__name__ == "InstantiationException"
    found = user_error(err.value)
    assert isinstance(found, LatentCacheError) and str(found).startswith(f"data.path={tmp_path / 'none'}: no such")
    assert user_error(RuntimeError("a bug")) is None
    wrapped = RuntimeError("not Hydra's wrapper")
    wrapped.__cause__ = FewstepError("inner")
    assert user_error(wrapped) is None  # only Hydra's instantiate wrapper is looked through


@pytest.mark.slow
def test_bad_cache_found_while_building_is_one_error_line(tmp_path):
    """The manifest passes the pre-check, the shard file is missing: LatentData raises inside Hydra's
    instantiate, and the CLI prints it as every other user error."""
    pretrained = config_only_pretrained(tmp_path / "pipe")
    cache = manifest_only_cache(tmp_path / "cache", [[4, 16, 16]])
    args = ["model=sd35", f"model.pretrained={pretrained}", "data=latents", f"data.path={cache}", *FAST]
    proc = subprocess.run(
        [sys.executable, "-m", "fewstep", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: data.path={cache}: shards/shard_00000.safetensors is missing; re-run precompute with out={cache} "
        "(it resumes)"
    ]
