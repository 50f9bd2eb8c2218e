"""Every JVP / multi-network objective trains two steps on a tiny SD3 LoRA (tests/helpers/tiny_sd3.py): attention
runs under forward-mode AD on the CPU, LoRA weights move, nothing is non-finite."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.base import Batch
from fewstep.teachers import EMATeacher

LATENT = (4, 16, 16)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

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
    # the JVP is along our t (the wrapper feeds the transformer |t|·1000): central differences in t, 0.13 % off
    # at eps = 1e-4 in float32 (a derivative in the 0..1000 timestep would be 1000x off); the t part is not small
    from fewstep.objectives.jvp import time_derivative

    batch, eps = latent_batch(seed=7), 1e-4
    t, tt = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.1, 0.5, 0.0])
    dx = torch.randn(batch.x.shape, generator=torch.Generator().manual_seed(3))
    _, dfdt = time_derivative(model, batch.x, t, tt, batch.cond, dx)
    with torch.no_grad():
        fd = model(batch.x + eps * dx, t + eps, tt, batch.cond) - model(batch.x - eps * dx, t - eps, tt, batch.cond)
    assert ((dfdt - fd / (2 * eps)).norm() / dfdt.norm()).item() < 1e-2
    _, along_x = time_derivative(lambda x, a, b, c: model(x, t, tt, c), batch.x, t, tt, batch.cond, dx)
    assert ((dfdt - along_x).norm() / dfdt.norm()).item() > 0.1


@pytest.mark.slow
def test_scm_trains_two_steps_on_tiny_sd3_lora(pretrained):
    from fewstep.objectives.scm import SCM

    model = sd3_lora(pretrained, time_pair=False)
    losses, moved, logs = two_steps(SCM(warmup_steps=1), model)
    assert all(torch.isfinite(torch.tensor(losses))) and moved > 0
    assert logs["loss/warmup"] == 1.0


@pytest.mark.slow
def test_dmd2_trains_two_steps_on_tiny_sd3_lora_with_a_second_adapter(pretrained):
    """The fake score is a second LoRA adapter on the student's frozen base (held once); step 0 updates the
    fake score and GAN head, step 1 the generator, as the loop would (``Objective.stepping``)."""
    from types import SimpleNamespace

    from fewstep.objectives.dmd2 import DMD2

    objective = DMD2(critic_steps=1, gan=True, guidance_scale=2.0)
    model = sd3_lora(pretrained, time_pair=False)
    objective.setup(model, SimpleNamespace(shape=LATENT))
    fake = objective.networks["fake_score"].module
    own = dict(model.named_parameters())
    for name, p in fake.named_parameters():
        assert (p is own[name]) == (not p.requires_grad), name  # frozen base shared, adapter copied
    assert any(".lora_" in n for n, p in fake.named_parameters() if p.requires_grad)
    nets = {"student": model, **{n: net.module for n, net in objective.networks.items()}}
    params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in nets.items()}
    opts = {n: torch.optim.AdamW(ps, lr=1e-3) for n, ps in params.items()}
    before = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
    teacher = EMATeacher(decay=0.9)
    teacher.bind(model)
    for step in range(2):
        torch.manual_seed(step)
        loss, logs = objective.loss(model, teacher, latent_batch(seed=step), step)
        assert torch.isfinite(loss)
        loss.backward()
        for name in objective.stepping(step):
            opts[name].step()
        for opt in opts.values():
            opt.zero_grad()
    for name in nets:
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(params[name], before[name]))
        assert moved > 0, name
    assert logs["nfe/rows_nograd"] == 2 * 3 + 3  # real score cond + null (one batched pass), fake score
