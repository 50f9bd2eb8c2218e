"""Every Table-6 row fits the GPUs it names (``launch.hardware``) with at least 10 % headroom, by the FakeTensor
estimate of the row as shipped on its family's published architecture (``fewstep.bench.fit``)."""

from __future__ import annotations

import pytest

from fewstep.bench.fit import HEADROOM, FitError, hardware_gb, row_config, row_fit, rows, with_online_text

ROWS = rows()


def test_the_rows_are_the_ten_of_table_6():
    assert len(ROWS) == 10 and {r.split("_")[0] for r in ROWS} == {"openuni", "qwenimage", "sd35"}


@pytest.mark.parametrize(
    ("text", "gpus", "gib"),
    [("8 x 80 GB", 8, 80e9 / 2**30), ("8 x 80 GB, FSDP", 8, 80e9 / 2**30), ("8 x 40-80 GB", 8, 40e9 / 2**30),
     ("4 × 141 GB", 4, 141e9 / 2**30)],
)  # fmt: skip
def test_hardware_is_read_as_gpus_and_the_smallest_memory(text, gpus, gib):
    assert hardware_gb(text) == (gpus, pytest.approx(gib))


def test_unreadable_hardware_and_unknown_rows_are_one_line_errors():
    with pytest.raises(FitError, match=r"launch.hardware='a GPU' is not 'N x M GB'"):
        hardware_gb("a GPU")
    with pytest.raises(FitError, match=r"fit=nope: .*rows: openuni_full, "):
        row_config("nope", 1)


@pytest.mark.parametrize("row", ROWS)
def test_a_row_is_estimated_as_it_ships(row):
    cfg = row_config(row, 2)
    shipped = row_config(row, 2, ["data.batch_size=3"])
    assert cfg.model.random_init and cfg.model.num_layers == 2
    assert cfg.data.resolution == cfg.launch.resolution and cfg.data.batch_size != 3 == shipped.data.batch_size
    assert cfg.data.architecture == cfg.model.architecture
    if cfg.model.lora.enabled:  # the frozen base in bf16, as the reference; the LoRA weights stay float32
        assert cfg.model.dtype == "bfloat16" and cfg.trainer.mixed_precision == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_every_row_fits_its_gpus_with_headroom(row):
    fit = row_fit(row)
    print(f"{row}: {fit.gpu_peak_gb:.1f} of {fit.gpu_gb:.1f} GiB, host {fit.host_peak_gb:.1f} GiB")
    assert fit.headroom >= HEADROOM, f"{row} needs {fit.gpu_peak_gb:.1f} GiB per GPU of {fit.gpu_gb:.1f}"
    assert fit.host_peak_gb <= 80  # one process's host memory while loading (rank 0 of the FSDP row: 76 GiB)
    assert fit.processes == 8


@pytest.mark.slow
def test_a_qwen_image_lora_row_with_an_fp32_frozen_base_does_not_fit():
    """The row as it shipped before: the 20.4 B frozen base in float32 alone is 76 GiB per GPU."""
    fp32 = row_fit("qwenimage_lora_1order", ["model.dtype=float32"])
    bf16 = row_fit("qwenimage_lora_1order")
    assert not fp32.fits and fp32.gpu_peak_gb > fp32.gpu_gb
    assert fp32.gpu_peak_gb - bf16.gpu_peak_gb == pytest.approx(2 * 20.4e9 / 2**30, rel=0.05)  # 2 bytes/frozen weight
    assert bf16.trainable_params == fp32.trainable_params == pytest.approx(436e6, rel=0.01)
    online = with_online_text(bf16)  # text=online: Qwen2.5-VL-7B (8.29 B) in bf16 on every GPU, and it still fits
    assert online.gpu_peak_gb - bf16.gpu_peak_gb == online.text_encoder_gb == pytest.approx(2 * 8.29e9 / 2**30)
    assert online.fits and online.headroom >= HEADROOM and bf16.text_encoder_gb == 0


def test_every_shipped_architecture_names_its_text_encoders():
    from fewstep.models import architectures

    counts = {name: architectures.load(name).text_encoder_params for name in architectures.names()}
    assert counts == {"openuni_l_512": 1.54e9, "qwen_image": 8.29e9, "sana_1600m_1024px": 2.61e9,
                      "sd35_large": 5.58e9, "sd35_medium": 5.58e9, "sdxl_base": 8.17e8}  # fmt: skip


@pytest.mark.slow
def test_the_depth_extrapolation_agrees_with_a_full_depth_estimate():
    """The fit extrapolates from 1 and 2 blocks; on the SANA row (20 blocks) the full-depth estimate agrees."""
    from fewstep.bench.estimate import estimate_step_memory

    fit = row_fit("openuni_lora_2order")
    cfg = row_config("openuni_lora_2order", fit.layers)
    full = estimate_step_memory(cfg, "bf16", steps=3)
    assert fit.layers == 20
    assert fit.gpu_peak_gb == pytest.approx(full["peak_memory_mb"] / 1024, rel=0.01)
    assert fit.params == pytest.approx(full["params"], rel=1e-6)
