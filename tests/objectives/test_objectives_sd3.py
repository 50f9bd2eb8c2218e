"""Every JVP / multi-network objective trains two steps on a tiny SD3 LoRA (tests/tiny_sd3.py): attention
runs under forward-mode AD on the CPU, LoRA weights move, nothing is non-finite."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.base import Batch
from fewstep.teachers import EMATeacher

LATENT = (4, 16, 16)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tiny_sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def sd3_lora(pretrained, time_pair: bool):
    from fewstep.models.sd3 import SD3Model

    torch.manual_seed(0)
    lora = {"enabled": True, "rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    return SD3Model(pretrained=str(pretrained), lora=lora, time_pair=time_pair, data_shape=list(LATENT))


def latent_batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {
        "prompt_embeds": torch.randn(n, 6, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(n, 64, generator=g),
    }
    null = {k: torch.zeros_like(v) for k, v in cond.items()}
    return Batch(torch.randn(n, *LATENT, generator=g), cond, null)


def two_steps(objective, model):
    teacher = EMATeacher(decay=0.9)
    teacher.bind(model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(2):
        torch.manual_seed(step)
        teacher.update(model, step)
        loss, logs = objective.loss(model, teacher, latent_batch(seed=step), step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(params, before))
    return losses, moved, logs


@pytest.mark.slow
def test_meanflow_trains_two_steps_on_tiny_sd3_lora(pretrained):
    from fewstep.objectives.meanflow import MeanFlow

    objective = MeanFlow(equal_time_ratio=0.0, guidance_scale=1.5, cond_dropout=0.3)
    model = sd3_lora(pretrained, time_pair=True)
    losses, moved, logs = two_steps(objective, model)
    assert all(torch.isfinite(torch.tensor(losses))) and moved > 0
    assert logs["nfe/rows_grad"] == 3


@pytest.mark.slow
def test_scm_trains_two_steps_on_tiny_sd3_lora(pretrained):
    from fewstep.objectives.scm import SCM

    model = sd3_lora(pretrained, time_pair=False)
    losses, moved, logs = two_steps(SCM(warmup_steps=1), model)
    assert all(torch.isfinite(torch.tensor(losses))) and moved > 0
    assert logs["loss/warmup"] == 1.0
