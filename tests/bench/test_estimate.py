"""fewstep.bench.estimate: a training step's peak memory counted on fake tensors equals the same count of the real
step; small tensors keep real values (masks, row counts), a decision on a large tensor's values is one clear
error; the bench reports it as a table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from fewstep.bench.command import main
from fewstep.bench.estimate import BLOCK, SMALL, estimate_step_memory, fake_execution
from fewstep.bench.tables import collect
from fewstep.errors import FewstepError

# SD3.5-medium's published architecture at 1 layer and 64² (4 × 4 latents): real widths and heads, tiny depth
TINY_REAL = [
    "model=sd35_lora", "data=synthetic", "model.random_init=true", "model.architecture=sd35_medium",
    "model.num_layers=1", "data.resolution=64", "data.batch_size=4", "model.dtype=bfloat16",
]  # fmt: skip


@pytest.mark.parametrize(
    "objective",
    [
        pytest.param(["objective=twinflow", "objective.enhanced_ratio=0.5"], marks=pytest.mark.slow),
        ["objective=dmd2", "objective.critic_steps=1"],  # (flow matching: DMD2's critic step is one like it)
        pytest.param(["model=sd35", "objective=dmd2", "objective.critic_steps=1"], marks=pytest.mark.slow),
    ],
    ids=["twinflow", "dmd2_lora", "dmd2_full"],
)
def test_the_fake_step_counts_the_bytes_the_real_step_holds(objective):
    """2 steps (DMD2: a critic step, then a generator step): peaks and resident bytes of the estimate equal
    those of the real step counted the same way, within a few allocation blocks."""
    torch.manual_seed(0)
    fake = estimate_step_memory([*TINY_REAL, *objective], "bf16", steps=2)
    real = estimate_step_memory([*TINY_REAL, *objective], "bf16", steps=2, fake=False)
    assert fake["estimated"] and not real["estimated"]
    assert fake["params"] == real["params"] and fake["trainable_params"] == real["trainable_params"]
    for key in ("built_mb", "resident_mb", "peak_memory_mb"):
        assert abs(fake[key] - real[key]) * 2**20 <= 8 * BLOCK, (key, fake[key], real[key])
    for f, r in zip(fake["step_peaks_mb"], real["step_peaks_mb"], strict=True):
        assert abs(f - r) * 2**20 <= 8 * BLOCK
    # FLOPs: equal wherever the step did the same work (TwinFlow's groups are drawn from the real generator, which
    # the fake step's large random tensors leave untouched, so its draws may differ from the real step's)
    same = [i for i, (f, r) in enumerate(zip(fake["step_evals"], real["step_evals"], strict=True)) if f == r]
    assert same and all(fake["step_tflops"][i] == real["step_tflops"][i] > 0 for i in same)
    # at least the bf16 weights are resident, and a step holds more than what is resident
    weights_mb = fake["params"] * 2 / 2**20
    assert fake["built_mb"] >= weights_mb and fake["peak_memory_mb"] > fake["resident_mb"]


@pytest.mark.parametrize("fake", [True, False])
def test_matmul_and_attention_flops_follow_their_formulas(fake):
    """2·m·k·n per matmul; attention forward 2 batched matmuls (4·b·h·s²·d), its backward 5 (10·b·h·s²·d):
    the CPU's fused attention kernels count like the GPU's."""
    b, h, s, d = 2, 3, 64, 32
    with fake_execution(fake) as memory:
        x, w = torch.randn(8, 16), torch.randn(16, 32)
        q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
        before = memory.flops
        x @ w
        assert memory.flops - before == 2 * 8 * 16 * 32
        before = memory.flops
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert memory.flops - before == 4 * b * h * s * s * d
        before = memory.flops
        out.sum().backward()
        assert memory.flops - before == 10 * b * h * s * s * d
        # a depthwise 3×3 convolution (SANA's Mix-FFN): 2·k²·B·C·H·W forward, as much again per gradient
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        image = torch.randn(2, 64, 8, 8, requires_grad=True)
        before = memory.flops
        y = conv(image)
        assert memory.flops - before == 2 * 9 * 2 * 64 * 8 * 8
        before = memory.flops
        y.sum().backward()
        assert memory.flops - before == 2 * (2 * 9 * 2 * 64 * 8 * 8)


def test_small_tensors_keep_values_and_a_large_decision_is_one_clear_error():
    with fake_execution() as memory:
        x = torch.randn(8, SMALL)  # large: no values
        mask = torch.arange(8) % 3 == 0  # small: real values
        picked = x[mask]
        assert picked.shape == (3, SMALL) and int(mask.sum()) == 3 and bool(mask.any())
        x[mask] = torch.zeros(3, SMALL)
        assert memory.live >= 8 * SMALL * 4 and memory.peak >= memory.live
        with pytest.raises(FewstepError, match="depends on the values of a tensor of more than") as err:
            bool(x.sum() > 0)
        assert "\n" not in str(err.value) and "drop estimate_memory=true" in str(err.value)


def test_the_count_follows_allocations_and_frees_in_blocks():
    with fake_execution() as memory:
        memory.rebase()
        start = memory.live
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes -> 4,096
        b = torch.empty(10)  # 40 bytes -> 512
        assert memory.live - start == 4096 + 512
        view = a[:10]  # a view holds no storage of its own
        assert memory.live - start == 4096 + 512
        del a
        assert memory.live - start == 4096 + 512  # the view keeps the storage alive
        del view
        assert memory.live - start == 512 and memory.peak - start == 4096 + 512
        del b


def test_a_deep_copied_table_and_its_views_are_counted_once():
    """DMD2 and the EMA teacher deep-copy modules: the copy's buffer is one storage, a reshape of it a view."""
    with fake_execution() as memory:
        module = torch.nn.Module()
        module.register_buffer("table", torch.zeros(1, 4096, 64), persistent=False)  # 1 MiB
        memory.rebase()
        start = memory.live
        clone = copy.deepcopy(module)
        assert memory.live - start == 2**20
        view = clone.table.reshape(1, 64, 64, 64)
        assert memory.live - start == 2**20 and view._base is clone.table
    assert "__deepcopy__" not in FakeTensor.__dict__  # restored once the estimate is done


@pytest.mark.slow  # a subprocess per variant
def test_bench_estimate_memory_writes_an_estimated_table_and_collect_keeps_it(tmp_path):
    out = tmp_path / "est"
    result = main([
        f"out={out}", "model=sd35_lora", "data=synthetic", "mixed_precision=bf16", "batch_size=2",
        "estimate_memory=true", "estimate_steps=2", "variants=[flow_matching,twinflow]",
        "overrides=[model.random_init=true,model.architecture=sd35_medium,model.num_layers=1,data.resolution=64,"
        "model.dtype=bfloat16]",
    ])  # fmt: skip
    assert result["estimated"] and result["device"].startswith("estimate") and "sampling" not in result
    objs = result["objectives"]
    assert objs["flow_matching"]["memory_vs_flow_matching"] == 1.0
    assert objs["twinflow"]["memory_vs_flow_matching"] > 1.0 and objs["twinflow"]["evals_per_step"] > 1.0
    assert all("step_time_s" not in r and len(r["step_peaks_mb"]) == 2 for r in objs.values())
    assert objs["flow_matching"]["flops_vs_flow_matching"] == 1.0 and objs["twinflow"]["flops_vs_flow_matching"] > 1
    md = (out / "bench.md").read_text()
    assert "estimated peak memory (GB)" in md and "| twinflow |" in md and "TFLOP / step" in md
    collect(tmp_path / "table", [out])
    merged = json.loads((tmp_path / "table.json").read_text())
    assert [r["objective"] for r in merged["rows"]] == ["flow_matching", "twinflow"]
    assert "| est | twinflow |" in (tmp_path / "table.md").read_text()


def test_estimate_vs_measured_matches_rows_on_config_and_objective(tmp_path, capsys):
    import runpy

    script = runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "estimate_vs_measured.py"))
    config = "model=sd35_lora data=synthetic batch=4 precision=bf16"
    measured = {"device": "GPU X", "rows": [
        {"run": "a", "config": config, "objective": "flow_matching", "peak_memory_mb": 9000.0},
        {"run": "a", "config": config, "objective": "dmd2", "oom": True},
        {"run": "b", "config": "other", "objective": "flow_matching", "peak_memory_mb": 1.0},
    ]}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(measured))
    est = tmp_path / "est"
    est.mkdir()
    (est / "bench.json").write_text(json.dumps({"config": config, "objectives": {
        "flow_matching": {"peak_memory_mb": 8550.0}, "dmd2": {"peak_memory_mb": 9100.0},
    }}))  # fmt: skip
    rows = script["rows"](tmp_path / "m.json", [est])
    assert rows == [{"config": config, "objective": "flow_matching", "measured_gib": 9000 / 1024,
                     "estimated_gib": 8550 / 1024, "ratio": 0.95}]  # fmt: skip
    # rows that record their overrides match only the estimate made with the same ones (a reduced-depth dry run
    # is not compared with the full-size estimate)
    measured["rows"][0]["overrides"] = ["model.num_layers=1", "data.resolution=64"]
    (tmp_path / "m2.json").write_text(json.dumps(measured))
    assert script["rows"](tmp_path / "m2.json", [est]) == []
    bench = json.loads((est / "bench.json").read_text())
    (est / "bench.json").write_text(json.dumps({**bench, "overrides": ["data.resolution=64", "model.num_layers=1"]}))
    assert [r["ratio"] for r in script["rows"](tmp_path / "m2.json", [est])] == [0.95]
    script["main"]([str(tmp_path / "m.json"), str(est)])
    assert "| flow_matching | 8.79 | 8.35 | 0.950 |" in capsys.readouterr().out
    # step times from FLOPs: flow matching's measured 2 s for 100 TFLOP calibrate 50 TFLOP/s, so DMD2's 150 TFLOP
    # predict 3 s (it OOMed in the measurement: no measured time beside it)
    measured["rows"][0].update(step_time_s=2.0, overrides=["data.resolution=64", "model.num_layers=1"])
    (tmp_path / "m3.json").write_text(json.dumps(measured))
    bench["objectives"]["flow_matching"].update(tflops_per_step=100.0, flops_vs_flow_matching=1.0)
    bench["objectives"]["dmd2"].update(tflops_per_step=150.0, flops_vs_flow_matching=1.5)
    (est / "bench.json").write_text(json.dumps({**bench, "overrides": ["data.resolution=64", "model.num_layers=1"]}))
    predicted = {p["objective"]: p for p in script["predictions"](tmp_path / "m3.json", [est])}
    assert predicted["flow_matching"]["predicted_s"] == predicted["flow_matching"]["measured_s"] == 2.0
    assert predicted["dmd2"]["rate"] == 50.0 and predicted["dmd2"]["predicted_s"] == 3.0
    assert predicted["dmd2"]["measured_s"] is None
    script["main"]([str(tmp_path / "m3.json"), str(est)])
    assert "| dmd2 | 150.0 | 1.50 | 50 | 3.000 |  |  |" in capsys.readouterr().out
    script["main"](["--time", str(tmp_path / "m3.json"), str(est)])
    assert capsys.readouterr().out.startswith("| config | objective | TFLOP / step |")
