"""Euler baseline: grid, exact integration of straight paths, one batched CFG forward."""

from __future__ import annotations

import pytest
import torch

from fewstep.samplers.euler import EulerSampler, euler_time_grid

from .models import DiracVelocity, RandomVelocityMLP


def test_grid_uniform_and_shifted():
    assert euler_time_grid(4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-15)
    # SD3 shift 3: t' = 3t / (1 + 2t)
    assert euler_time_grid(2, shift=3.0).tolist() == pytest.approx([1.0, 1.5 / 2.0, 0.0], abs=1e-15)
    assert EulerSampler(shift=3.0).time_grid(4).tolist() == pytest.approx(
        [1.0, 2.25 / 2.5, 1.5 / 2.0, 0.75 / 1.5, 0.0], abs=1e-15
    )
    assert EulerSampler().nfe(30) == 30


def test_euler_by_hand_and_target_time_equals_time():
    model = RandomVelocityMLP()
    noise = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    cond = torch.randn(3, 3, dtype=torch.float64)
    out = EulerSampler().sample(model, noise, cond, 2)
    calls = list(model.calls)
    full = lambda v: torch.full((3,), v, dtype=torch.float64)  # noqa: E731
    x = noise - 0.5 * model(noise, full(1.0), full(1.0), cond)
    x = x - 0.5 * model(x, full(0.5), full(0.5), cond)
    assert (out - x).abs().max().item() < 1e-12
    assert [(float(t[0]), float(tt[0])) for t, tt in calls] == [(1.0, 1.0), (0.5, 0.5)]


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_straight_field_is_integrated_exactly(steps):
    target, noise = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    out = EulerSampler(shift=2.0).sample(DiracVelocity(), noise, target, steps)
    assert (out - target).abs().max().item() < 1e-10


def test_cfg_is_one_batched_forward_with_exact_mix():
    """Point-mass fields: cond → c, uncond → c_u; one Euler step lands on c_u + g·(c − c_u)."""
    g = 2.5
    c, c_u = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    noise = torch.randn(3, 4, dtype=torch.float64)
    model = DiracVelocity()
    for steps in (1, 2, 5):
        model.calls.clear()
        out = EulerSampler(guidance_scale=g).sample(model, noise, c, steps, null_cond=c_u)
        # mixing straight fields keeps the path straight after the first step: the result is exact at any NFE
        assert (out - (c_u + g * (c - c_u))).abs().max().item() < 1e-10
        assert [b for b, _ in model.calls] == [6] * steps  # cond + uncond in ONE 2B forward per step


def test_cfg_with_dict_conditions():
    seen = []

    def model(x, t, tt, cond):
        seen.append({k: v.shape for k, v in cond.items()})
        return x - cond["target"]

    cond = {"target": torch.ones(2, 3), "mask": torch.ones(2, 1)}
    null = {"target": torch.zeros(2, 3), "mask": torch.zeros(2, 1)}
    out = EulerSampler(guidance_scale=3.0).sample(model, torch.randn(2, 3), cond, 1, null_cond=null)
    assert torch.allclose(out, torch.full((2, 3), 3.0))
    assert seen == [{"target": (4, 3), "mask": (4, 1)}]


def test_cfg_needs_null_cond():
    with pytest.raises(ValueError, match="null_cond"):
        EulerSampler(guidance_scale=2.0).sample(RandomVelocityMLP(), torch.randn(1, 2, 2, 2), torch.zeros(1, 3), 2)
    with pytest.raises(ValueError):
        EulerSampler(guidance_scale=-1.0)


def test_dtype_round_trip():
    noise = torch.randn(2, 3, dtype=torch.bfloat16)
    out = EulerSampler().sample(lambda x, t, tt, c: torch.zeros_like(x), noise, None, 3)
    assert out.dtype == torch.bfloat16


def test_qwenimage_guided_euler_is_its_pipelines_rescaled_true_cfg(tmp_path):
    """``sampler=euler`` with guidance on a Qwen-Image model combines the two predictions as ``QwenImagePipeline``
    does (true CFG rescaled per packed token to the conditional norm), checked against the formula computed here
    on the transformer's own packed output; it was plain CFG, which differs."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from fewstep.models.family import bind_guidance
    from fewstep.models.qwenimage import QwenImageModel

    torch.manual_seed(0)
    QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                                num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
                                ).save_pretrained(tmp_path)  # fmt: skip
    model = QwenImageModel(pretrained=str(tmp_path)).eval()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 4, 6, generator=gen)  # latents 4×4×6: 2×3 tokens of 16 channels
    cond, null = ({"prompt_embeds": torch.randn(2, 5, 16, generator=gen), "prompt_embeds_mask": torch.ones(2, 5)}
                  for _ in range(2))  # fmt: skip
    scale = 4.0
    sampler = EulerSampler(guidance_scale=scale)
    bind_guidance(sampler, model)
    out = QwenImagePipeline._pack_latents(sampler.sample(model, noise, cond, 1, null_cond=null), 2, 4, 4, 6)

    packed = QwenImagePipeline._pack_latents(noise, 2, 4, 4, 6)
    with torch.no_grad():
        v_c, v_u = (model.transformer(hidden_states=packed, encoder_hidden_states=c["prompt_embeds"],
                                      timestep=torch.ones(2), img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)[0]
                    for c in (cond, null))  # fmt: skip
    comb = v_u + scale * (v_c - v_u)
    rescaled = comb * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.allclose(out, packed - rescaled, atol=1e-5)  # one step from t = 1 to 0: x − F
    # not plain CFG: the tokens' guided norms are 0.969–1.068 × the conditional ones, and the step moves by up to 0.048
    ratio = torch.norm(comb, dim=-1) / torch.norm(v_c, dim=-1)
    assert (ratio.min().item(), ratio.max().item()) == pytest.approx((0.9687, 1.0685), abs=1e-3)
    assert (out - (packed - comb)).abs().max().item() == pytest.approx(0.0483, abs=1e-3)


def test_a_runs_guided_sampling_gets_the_null_condition(tmp_path):
    """A run may sample its multi-step model with CFG (``objective=flow_matching sampler=euler
    sampler.guidance_scale=2``), but its final grids, evaluation samples and validation grid passed the sampler no
    null condition: the run stopped at its first grid with "needs null_cond". Each now gets the data's, batched
    after the condition."""
    from types import SimpleNamespace

    from fewstep.training.loop import _validation_grid
    from fewstep.training.outputs import Share, final_outputs

    class Data:
        shape, value_range = (2,), None

        def grid_conds(self, n):
            return torch.zeros(n, dtype=torch.long)

        def null_cond(self, n):
            return torch.ones(n, dtype=torch.long)

        def eval_inputs(self):
            return torch.zeros(2, 2), torch.full((2,), 2)

    seen = []

    def model(x, t, tt, c):
        seen.append(c.tolist())
        return torch.zeros_like(x)

    sampler = EulerSampler(guidance_scale=2.0)
    final_outputs(tmp_path, model, sampler, Data(), [1], 0, "cpu", grid_size=3, log=lambda *_: None)
    assert seen == [[0, 0, 0, 1, 1, 1], [2, 2, 1, 1]] and (tmp_path / "samples" / "nfe_1.npz").exists()
    seen.clear()
    run = SimpleNamespace(target_step_count=1), SimpleNamespace(autocast=None)
    writer = SimpleNamespace(log_images=lambda *_: None)
    _validation_grid(tmp_path, 2, run[0], sampler, model, Data(), "cpu", run[1], writer, Share())
    assert seen == [[0] * 50 + [1] * 50]
