"""The last TwinFlowScheduler survivors of `make mutate`: flow-matching custom ``timesteps=`` (integers, divided by
the training timesteps in float64) and grids given as a column rather than a list."""

from __future__ import annotations

import torch

from fewstep.samplers.scheduler import TwinFlowScheduler


def test_flow_matching_integer_timesteps_become_float64_flow_times():
    scheduler = TwinFlowScheduler()  # flow matching: no alphas_cumprod, timestep = 1000 · t
    scheduler.set_timesteps(timesteps=[999, 500])
    assert scheduler.sigmas.dtype == torch.float64
    assert torch.equal(scheduler.sigmas, torch.tensor([0.999, 0.5, 0.0], dtype=torch.float64))  # not float32-rounded
    assert scheduler.num_inference_steps == 2


def test_a_column_of_sigmas_or_timesteps_is_followed_as_the_flat_grid():
    flat, column = TwinFlowScheduler(), TwinFlowScheduler()
    flat.set_timesteps(sigmas=[0.8, 0.3])
    column.set_timesteps(sigmas=torch.tensor([[0.8], [0.3]], dtype=torch.float64))
    assert torch.equal(flat.sigmas, column.sigmas) and column.num_inference_steps == 2
    flat.set_timesteps(timesteps=[900.0, 400.0])
    column.set_timesteps(timesteps=[[900.0], [400.0]])
    assert torch.equal(flat.sigmas, column.sigmas)
    assert TwinFlowScheduler(time_dist_ctrl=[[1.0], [1.0], [0.6]]).config.time_dist_ctrl == [1.0, 1.0, 0.6]


def test_the_placeholder_grid_is_recognised_as_a_column_too():
    """Qwen-Image / Flux pass ``linspace(1, 1/n, n)`` with ``mu`` when the user gives no grid: the trained grid is
    used, whatever the array's shape."""
    flat, column, custom = TwinFlowScheduler(), TwinFlowScheduler(), TwinFlowScheduler()
    flat.set_timesteps(sigmas=[1.0, 0.5], mu=0.0)
    column.set_timesteps(sigmas=torch.tensor([[1.0], [0.5]], dtype=torch.float64), mu=0.0)
    custom.set_timesteps(sigmas=[1.0, 0.6], mu=0.0)  # not the placeholder: followed as given
    assert torch.equal(flat.sigmas, column.sigmas)
    assert flat.sigmas.tolist() != [1.0, 0.5, 0.0] and custom.sigmas.tolist() == [1.0, 0.6, 0.0]


def test_a_timestep_is_compared_in_the_schedules_dtype():
    """An integer schedule (as some pipelines keep) compares integer timesteps: 750.7 is 750 there, nearer 500 than
    1001 (as a float it would be nearer 1001)."""
    schedule = torch.tensor([1001, 500, 0])
    scheduler = TwinFlowScheduler()
    assert scheduler.index_for_timestep(750.7, schedule) == 1
    assert scheduler.index_for_timestep(torch.tensor(750.7), schedule.double()) == 0
