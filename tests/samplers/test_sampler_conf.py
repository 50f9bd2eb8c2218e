"""conf/sampler/*.yaml: every constructor field, at its default (but for RUN_VALUES), and Hydra can instantiate them."""

from __future__ import annotations

import inspect

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from helpers import compose

# the runs' values that differ from the constructor's on purpose: runs key step noise on each sample's initial noise
# (as exported pipelines do); the constructor keeps drawing from the generator it is given, as the reference loop
RUN_VALUES = {"ucgm": {"step_noise": "latents"}, "euler": {}}


@pytest.mark.parametrize("name", ["ucgm", "euler"])
def test_sampler_yaml_lists_every_field_at_its_default(name):
    cfg = compose([f"sampler={name}"]).sampler
    cls = get_class(cfg._target_)
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    params.update(RUN_VALUES[name])
    fields = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    assert set(fields) == set(params)
    for key, default in params.items():
        value = fields[key]
        assert (list(value) if isinstance(value, list) else value) == (
            list(default) if isinstance(default, tuple) else default
        ), key
    sampler = instantiate(cfg)
    assert isinstance(sampler, cls)
    assert sampler.nfe(2) == 2
