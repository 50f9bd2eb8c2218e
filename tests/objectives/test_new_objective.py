"""A new objective is one Python file + one YAML (docs/objectives.md): the example in
tests/helpers/example_objective.py, with its YAML in a user config folder, composes with its typed schema, is
checked by its own check_config, trains on the one loop and is a bench variant, without any other file knowing it."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.bench.command import variants
from fewstep.config.checks import ConfigError
from fewstep.config.validate import sampling_guidance, validate
from fewstep.data.base import Batch
from fewstep.objectives.base import registered
from fewstep.training.loop import train

from helpers import FAST, compose
from helpers.example_objective import YAML, PseudoHuberFlowMatching

TOY = ["data=toy2d", "model=tiny_toy", "data.batch_size=64", *FAST]


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    (tmp_path / "conf" / "objective").mkdir(parents=True)
    (tmp_path / "conf" / "objective" / "pseudo_huber.yaml").write_text(YAML)
    monkeypatch.setenv("FEWSTEP_CONFIG_PATH", str(tmp_path / "conf"))
    return tmp_path


def test_the_new_objective_is_registered_composed_checked_and_a_bench_variant(user_conf):
    assert registered()["pseudo_huber"] is PseudoHuberFlowMatching
    assert variants()["pseudo_huber"] == ["objective=pseudo_huber"]
    cfg = validate(compose(["objective=pseudo_huber", *TOY]))
    assert cfg.objective.c == 0.03 and sampling_guidance(cfg) == 0.0  # flow-matching style: sampler's scale (0)
    with pytest.raises(Exception, match="cc"):  # its typed schema: a misspelt key fails at compose time
        compose(["objective=pseudo_huber", "objective.cc=0.1", *TOY])
    with pytest.raises(ConfigError, match=r"objective.c=0.0 must lie in \(0, inf\) \(the distance's L2-to-L1"):
        validate(compose(["objective=pseudo_huber", "objective.c=0", *TOY]))


def test_the_new_objective_loss_is_its_formula_and_it_trains_on_the_loop(user_conf, tmp_path):
    objective = PseudoHuberFlowMatching(c=0.5)
    x = torch.randn(6, 2, dtype=torch.float64)

    def student(x_t, t, tt, cond):
        return 2.0 * x_t

    torch.manual_seed(0)
    loss, logs = objective.loss(student, None, Batch(x=x, cond=None, null_cond=None), 0)
    torch.manual_seed(0)  # the same draws: t ~ Beta(1, 1), then z
    t = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((6,)).double()
    z = torch.randn_like(x)
    r = 2.0 * (t[:, None] * z + (1 - t[:, None]) * x) - (z - x)
    expected = ((r.pow(2).mean(dim=1) + 0.25).sqrt() - 0.5).mean()
    assert abs(loss.item() - expected.item()) < 1e-12 and logs["nfe/per_step"] == 1.0

    over = ["objective=pseudo_huber", *TOY, "trainer.max_steps=100", "trainer.lr=1e-2", "trainer.log_every=10"]
    summary = train(compose([*over, "trainer.final_nfe=[]", "trainer.baseline_steps=0"]), run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 100 and summary["objective"] == "PseudoHuberFlowMatching"
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]  # 1.04 -> 0.88 (toy2d's flow-matching loss has a large floor)
