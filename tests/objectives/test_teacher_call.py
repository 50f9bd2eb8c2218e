"""The teacher's call swaps its shadow weights into the student for one forward: the same outputs as
``torch.func.functional_call`` (tied aliases included), and the student's own parameters back after."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from fewstep.models.tiny import TinyMLP
from fewstep.teachers import EMATeacher


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied: one parameter under two names

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _perturbed_teacher(model):
    teacher = EMATeacher(decay=0.9)
    teacher.bind(model)
    for value in teacher.shadow.values():
        value.add_(0.1 * torch.randn_like(value))
    return teacher


def test_teacher_call_equals_functional_call_and_restores_the_student():
    torch.manual_seed(0)
    model = TinyMLP([6], num_classes=3, width=32, depth=2, emb_dim=16)
    own = {k: p for k, p in model.named_parameters()}
    before = {k: p.detach().clone() for k, p in own.items()}
    teacher = _perturbed_teacher(model)
    x, t, tt, c = torch.randn(5, 6), torch.rand(5), torch.rand(5) * 0.5, torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        got = teacher.model(x, t, tt, c)
        expected = functional_call(model, teacher.shadow, (x, t, tt, c), strict=False)
        student_out = model(x, t, tt, c)
    assert torch.equal(got, expected)
    assert not torch.equal(got, student_out)  # the shadow differs from the student
    assert all(p is own[k] and torch.equal(p, before[k]) for k, p in model.named_parameters())


def test_teacher_call_swaps_tied_aliases_and_restores_after_an_error():
    torch.manual_seed(0)
    model = Tied()
    assert set(dict(model.named_parameters())) == {"a.weight", "a.bias", "b.bias"}  # b.weight is a.weight
    teacher = _perturbed_teacher(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(teacher.model(x), functional_call(model, teacher.shadow, (x,), strict=False))
        w, sh, linear = teacher.shadow["a.weight"], teacher.shadow, torch.nn.functional.linear
        by_hand = linear(torch.tanh(linear(x, w, sh["a.bias"])), w, sh["b.bias"])
        assert torch.equal(teacher.model(x), by_hand)  # the tied alias b.weight is the shadow's a.weight too
    weight = model.a.weight
    with pytest.raises(RuntimeError):
        teacher.model(torch.randn(3, 5))  # wrong width: the forward raises inside the swap
    assert model.a.weight is weight and model.b.weight is weight
