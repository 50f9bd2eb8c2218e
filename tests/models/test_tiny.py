"""The embedded default's network and the embedded default's composition."""

from __future__ import annotations

import pytest
import torch

from fewstep.models.tiny import TinyMLP

from helpers import compose


def _inputs(b=16, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, *shape, generator=g) * torch.linspace(0.2, 3.0, b).reshape(-1, 1, 1, 1)  # varied norms
    t = torch.rand(b, generator=g)
    return x, t, t * 0.5, torch.randint(0, 10, (b,), generator=g)


def test_input_skip_is_zero_at_init_and_can_pass_x_t_through_at_its_scale():
    torch.manual_seed(0)
    net = TinyMLP((1, 8, 8), width=64, emb_dim=32)
    x, t, tt, y = _inputs()
    assert torch.equal(net(x, t, tt, y), torch.zeros_like(x))  # zero-initialised output, skip and modulation
    with torch.no_grad():
        net.skip.bias.fill_(1.0)
    torch.testing.assert_close(net(x, t, tt, y), x, rtol=0, atol=0)  # identity for every input norm
    with torch.no_grad():  # the LayerNorm path alone cannot: its output has the same norm for x and 3x
        net.skip.bias.zero_()
        net.out.weight.normal_()
        a, b = net(x[:1], t[:1], tt[:1], y[:1]), net(3 * x[:1], t[:1], tt[:1], y[:1])
    assert abs(a.norm().item() - b.norm().item()) / a.norm().item() < 0.5


def test_input_skip_can_be_turned_off():
    on = TinyMLP((1, 8, 8), width=64, emb_dim=32, out_modulation=False)
    off = TinyMLP((1, 8, 8), width=64, emb_dim=32, input_skip=False, out_modulation=False)
    assert off.skip is None
    extra = sum(p.numel() for p in on.parameters()) - sum(p.numel() for p in off.parameters())
    assert extra == 32 * 64 + 64


def test_the_embedded_default_uses_mse_and_the_any_step_sampler():
    cfg = compose([])
    assert cfg.model.input_skip is True and cfg.model.out_modulation is True
    assert cfg.objective.loss.type == "l2"
    s = cfg.sampler
    assert (s.style, s.stochast_ratio, s.extrapol_ratio, list(s.rfba_gap_steps)) == ("any", 0.0, 0.5, [0.001, 0.4])


@pytest.mark.parametrize("experiment", ["table6/sd35_full", "table6/sd35_lora_2order"])
def test_paper_rows_keep_the_reference_loss_and_sampler(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.objective.loss.type == "barron" and cfg.sampler.preset == "few_step"
