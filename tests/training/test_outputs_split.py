"""Grids and the final evaluation are split across the processes of a run (``fewstep.training.outputs.Share``):
each samples its share of the rows, rank 0 gathers and writes."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fewstep.training.outputs import Share, to_images


@pytest.mark.parametrize(
    ("n", "world", "blocks"),
    [
        (100, 8, [(0, 13), (13, 26), (26, 39), (39, 52), (52, 65), (65, 78), (78, 91), (91, 100)]),
        (2000, 2, [(0, 1000), (1000, 2000)]),
        (3, 4, [(0, 1), (1, 2), (2, 3), (3, 3)]),  # the last rank has no row: it samples a copy, writes nothing
        (5, 1, [(0, 5)]),
    ],
)
def test_each_rank_samples_one_contiguous_block_of_the_same_padded_size(n, world, blocks):
    got = [Share(r, world).block(n) for r in range(world)]
    assert [(a, b) for a, b, _ in got] == blocks
    assert {per for *_, per in got} == {-(-n // world)}
    assert Share(0, world).main and not any(Share(r, world).main for r in range(1, world))


def test_one_process_counts_the_rows_it_evaluates():
    from fewstep.samplers.euler import EulerSampler

    share = Share()
    out = share.sample(EulerSampler(), lambda x, t, tt, c: torch.zeros_like(x), torch.ones(7, 2), torch.zeros(7), 3)
    assert torch.equal(out, torch.ones(7, 2)) and share.evaluated_rows == 21


def test_grid_latents_are_decoded_a_few_rows_at_a_time():
    class Data:
        calls = []

        def decode(self, x):
            self.calls.append(x.shape[0])
            return x * 2

    data = Data()
    x = torch.arange(20.0).reshape(20, 1)
    assert torch.equal(to_images(data, x, "cpu"), x * 2)
    assert data.calls == [8, 8, 4]


@pytest.mark.slow
def test_a_two_process_runs_final_evaluation_is_split_and_outlasts_no_timeout(tmp_path):
    """toy2d's final outputs: a 100-row grid and 2,000 evaluation rows at 1 NFE. With sampling slowed to 5 ms a row
    (10.5 s for all rows on one process) and a 6 s collective timeout, a rank waiting for rank 0's solo evaluation
    would time out; split, each rank samples 1,050 rows (5.25 s) and the run finishes with the same metrics as one
    process."""
    from test_stop import launch

    from helpers import faults

    over = ["trainer.max_steps=4", "trainer.final_nfe=[1]", "trainer.baseline_steps=0", "trainer.sample_every=1000",
            "trainer.evaluate=true", "trainer.grid_size=100",
            "sampler._target_=helpers.faults.SlowSampler"]  # fmt: skip
    slow = {faults.SLOW_SAMPLING_ENV: "0.005"}
    t0 = time.time()
    solo = launch(tmp_path / "solo", *over, processes=1, env=slow)
    solo_s = time.time() - t0
    assert solo.returncode == 0, solo.stderr[-2000:]
    split = launch(tmp_path / "split", *over, "trainer.dist_timeout_s=6", env=slow)
    assert split.returncode == 0, split.stderr[-3000:]
    one = json.loads((tmp_path / "solo" / "summary.json").read_text())
    two = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert one["final_eval_rows_per_process"] == [2100]
    assert two["final_eval_rows_per_process"] == [1050, 1050]
    assert set(two["eval"]) == {"nfe_1"} and (tmp_path / "split" / "samples" / "nfe_1.png").is_file()
    assert solo_s > 10.5  # the old solo evaluation alone exceeds the 6 s timeout
