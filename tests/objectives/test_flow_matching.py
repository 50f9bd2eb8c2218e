"""FlowMatching's constructor, condition dropout and evaluation counts pinned with numbers (its loss by hand:
tests/objectives/test_twinflow_math.py::test_flow_matching_loss_by_hand_with_condition_dropout)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fewstep.objectives.flow_matching as fm_module
from fewstep.data.base import Batch
from fewstep.objectives.base import EvalCounter
from fewstep.objectives.flow_matching import FlowMatching, FlowMatchingConfig


def test_constructor_defaults_are_the_config_schemas_and_every_option_is_kept():
    defaults = {
        f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(FlowMatchingConfig)
        if f.name not in ("_target_", "loss")
    }
    assert defaults == {
        "target_step_count": 50,
        "time_dist": [1.0, 1.0, 1.0],
        "time_weighting": "none",
        "cond_dropout": 0.0,
        "allow_diff2flow": False,
    }
    obj = FlowMatching()
    assert {k: getattr(obj, k) for k in defaults} == {**defaults, "time_dist": (1.0, 1.0, 1.0)}
    given = {
        "target_step_count": 4,
        "time_dist": (2.0, 1.0, 0.5),
        "time_weighting": "tan",
        "cond_dropout": 0.1,
        "allow_diff2flow": True,
    }
    obj = FlowMatching(**given)
    assert {k: getattr(obj, k) for k in given} == given
    assert type(FlowMatching(target_step_count=4.0).target_step_count) is int
    with pytest.raises(ValueError, match="objective.time_weighting='cosine' is unknown; use 'tan' or 'none'"):
        FlowMatching(time_weighting="cosine")


class Seen:
    """A student ``0.5·x_t + c`` that records the condition it was given."""

    def __init__(self):
        self.conds = []

    def __call__(self, x_t, t, tt, cond):
        self.conds.append(cond)
        return 0.5 * x_t + cond.to(x_t.dtype)[:, None]


def test_a_row_whose_draw_equals_cond_dropout_keeps_its_condition():
    """A row is dropped when its uniform draw u < cond_dropout (so P(drop) = p exactly). Seed 0 draws u =
    [0.496, 0.768, 0.088, 0.132, 0.3074228…, 0.634]; with p set to row 4's draw, rows 2 and 3 are dropped and
    row 4, on the boundary, keeps its condition."""
    torch.manual_seed(0)
    u = torch.rand(6)
    p = float(u[4])
    assert p == pytest.approx(0.30742281675338745, abs=0) and sorted(u.tolist()).index(p) == 2
    student = Seen()
    batch = Batch(torch.zeros(6, 2), torch.arange(1, 7), torch.zeros(6, dtype=torch.long))
    torch.manual_seed(0)
    FlowMatching(cond_dropout=p).loss(student, None, batch, 0)
    assert student.conds[0].tolist() == [1, 2, 0, 0, 5, 6]


def test_condition_dropout_draws_on_the_datas_device(monkeypatch):
    """The dropout draw asks for the data's device (on the CPU a spy tells it from the default device; a meta-device
    run could too, but its first arithmetic costs seconds of imports)."""
    asked, real = [], torch.rand

    def spy(*args, **kwargs):
        asked.append(kwargs.get("device", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", spy)
    x = torch.zeros(4, 2)
    FlowMatching(cond_dropout=0.5).loss(Seen(), None, Batch(x, torch.ones(4), torch.zeros(4)), 0)
    assert asked == [x.device]


def test_the_student_pass_is_counted_under_its_name(monkeypatch):
    made = []

    class Counters(EvalCounter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(fm_module, "EvalCounter", Counters)
    _, logs = FlowMatching().loss(Seen(), None, Batch(torch.zeros(5, 2), torch.ones(5), torch.zeros(5)), 0)
    assert len(made) == 1 and made[0].by_pass == {"student": 5}
    assert (logs["nfe/calls_grad"], logs["nfe/rows_grad"], logs["nfe/calls_nograd"]) == (1, 5, 0)
