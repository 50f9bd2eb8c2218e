"""How a pretrained transformer is loaded: ``model.dtype=auto`` (frozen base in the compute dtype, trainables in
float32) and ``loading_onto`` (weights straight onto an accelerator, never whole in host memory)."""

from __future__ import annotations

import pytest
import torch

from fewstep.models.family import loading_onto, weight_dtype_name


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.mark.parametrize(
    ("dtype", "lora", "mixed", "expected"),
    [
        ("auto", True, "bf16", "bfloat16"),
        ("auto", True, "fp16", "float16"),
        ("auto", True, "no", "float32"),
        ("auto", False, "bf16", "float32"),  # full fine-tuning: trainable weights stay float32
        ("float32", True, "bf16", "float32"),  # an explicit dtype is kept
        ("bfloat16", False, "no", "bfloat16"),
    ],
)
def test_auto_weight_dtype_is_the_compute_dtype_for_a_frozen_base_only(dtype, lora, mixed, expected):
    assert weight_dtype_name(dtype, lora, mixed) == expected


def recorded_loads(monkeypatch):
    from diffusers import SD3Transformer2DModel

    calls = []
    original = SD3Transformer2DModel.from_pretrained.__func__

    def record(cls, *args, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("device_map", None)  # no accelerator here: load on the host as before
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "from_pretrained", classmethod(record))
    return calls


def test_a_gpu_process_loads_its_transformer_straight_onto_its_device(pretrained, monkeypatch):
    from fewstep.models.sd3 import SD3Model

    calls = recorded_loads(monkeypatch)
    with loading_onto(torch.device("cuda", 3)):
        SD3Model(pretrained=str(pretrained), dtype="bfloat16")
    SD3Model(pretrained=str(pretrained))  # outside: host loading, float32 (no dtype argument)
    with loading_onto("cpu"):
        SD3Model(pretrained=str(pretrained))
    assert calls[0]["device_map"] == torch.device("cuda", 3)
    assert calls[0]["torch_dtype"] == torch.bfloat16  # straight into the target dtype, no float32 copy
    assert "device_map" not in calls[1] and "device_map" not in calls[2]


def test_lora_model_defaults_load_the_frozen_base_in_bf16_under_bf16(pretrained):
    from fewstep.models.sd3 import SD3Model
    from fewstep.training.trainables import resolve_weight_dtype

    from helpers import compose

    for model, mixed, base in (("sd35_lora", "bf16", torch.bfloat16), ("sd35_lora", "no", torch.float32),
                               ("sd35", "bf16", torch.float32)):  # fmt: skip
        cfg = compose([f"model={model}", f"trainer.mixed_precision={mixed}", "model.dtype=auto"])
        resolve_weight_dtype(cfg)
        assert cfg.model.dtype == str(base).removeprefix("torch.")
        lora = {"enabled": True, "rank": 2, "alpha": 2} if cfg.model.lora.enabled else None
        built = SD3Model(pretrained=str(pretrained), dtype=cfg.model.dtype, lora=lora)
        frozen = {p.dtype for p in built.parameters() if not p.requires_grad}
        trainable = {p.dtype for p in built.parameters() if p.requires_grad}
        assert frozen <= {base} and trainable == {torch.float32}
        assert bool(frozen) == bool(lora)
    assert compose(["model=sd35_lora"]).model.dtype == "auto"  # the default of every model=*_lora
