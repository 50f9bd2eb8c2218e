"""The read-ahead loader (``fewstep.data.prefetch``): the batches of every slot, in order, are exactly the
synchronous reader's; a reader error reaches the step that would have read it; ``close`` stops the thread; a
``data=latents`` run with ``data.prefetch=2`` trains and resumes exactly as with ``data.prefetch=0``."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from fewstep.data.latents import LatentCacheError, LatentData
from fewstep.data.prefetch import Prefetcher, pinned

from helpers import FAST, compose

V1_FIXTURE = Path(__file__).parents[1] / "fixtures" / "latent_cache_v1"  # a 6-image tiny Qwen-Image cache


def streams(data, slots=2, position=0):
    return [data.batches(seed=5, position=position, rank=slot, world=slots) for slot in range(slots)]


def same(a, b) -> bool:
    return torch.equal(a.x, b.x) and all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)


def test_prefetched_batches_are_the_synchronous_readers_slot_for_slot():
    data = LatentData(str(V1_FIXTURE), batch_size=1)
    direct = streams(data, 2)
    expected = [[next(s) for s in direct] for _ in range(9)]  # 3 epochs of 3 global batches of 2
    fetcher = Prefetcher(streams(LatentData(str(V1_FIXTURE), batch_size=1), 2), depth=2)
    try:
        got = [[next(s) for s in fetcher.streams_out] for _ in range(9)]
    finally:
        fetcher.close()
    assert not fetcher._thread.is_alive()
    for step_a, step_b in zip(expected, got, strict=True):
        assert all(same(a, b) for a, b in zip(step_a, step_b, strict=True))
    assert not same(expected[0][0], expected[0][1])  # the two slots hold different rows


def test_prefetch_reads_at_most_depth_batches_ahead_per_stream():
    read = []

    def counting(tag):
        n = 0
        while True:
            read.append(tag)
            n += 1
            yield torch.full((1,), float(n))

    fetcher = Prefetcher([counting("a"), counting("b")], depth=3)
    try:
        for _ in range(200):
            if len(read) >= 7:
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.1)
        assert read.count("a") == 4 and read.count("b") == 3  # 3 queued each; the 4th "a" waits for room
        a, b = fetcher.streams_out  # taken in the order the loop takes them: slot 0, slot 1, slot 0, ...
        assert [(next(a).item(), next(b).item()) for _ in range(5)] == [(n, n) for n in (1.0, 2.0, 3.0, 4.0, 5.0)]
    finally:
        fetcher.close()


def test_a_reader_error_reaches_the_step_that_reads_next_as_the_same_error():
    def failing():
        yield torch.ones(1)
        raise LatentCacheError("data.path=X: shard_00001.safetensors is unreadable; re-run precompute")

    fetcher = Prefetcher([failing()], depth=2)
    try:
        assert torch.equal(next(fetcher.streams_out[0]), torch.ones(1))
        with pytest.raises(LatentCacheError, match="shard_00001.safetensors is unreadable"):
            next(fetcher.streams_out[0])
    finally:
        fetcher.close()
    with pytest.raises(ValueError, match=r"data.prefetch=0: give the number of batches"):
        Prefetcher([failing()], depth=0)
    with pytest.raises(ValueError, match="data.prefetch=-1 must be >= 0"):
        LatentData(str(V1_FIXTURE), prefetch=-1)


def test_a_pinned_batch_holds_the_same_numbers():
    if not torch.cuda.is_available():
        pytest.skip("page-locked memory needs a CUDA device")
    batch = next(LatentData(str(V1_FIXTURE), batch_size=2).batches(0))
    pinned_batch = pinned(batch)
    assert pinned_batch.x.is_pinned() and same(batch, pinned_batch)


def run(cache, run_dir, *extra):
    from fewstep.training.loop import train

    cfg = compose(
        ["objective=twinflow", "sampler=ucgm", "model=qwenimage", f"model.pretrained={cache.parent / 'pipe'}",
         "data=latents", f"data.path={cache}", "data.batch_size=1", "trainer.grad_accum=2", "trainer.max_steps=4",
         "trainer.final_nfe=[1]", "trainer.grid_size=4", "trainer.lr=1e-2",
         *FAST, "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.keep_last=5", *extra]
    )  # fmt: skip
    return train(cfg, run_dir=run_dir)


@pytest.mark.slow
def test_a_latent_run_with_prefetch_trains_and_resumes_as_without(tmp_path):
    from safetensors.torch import load_file

    from helpers.tiny_families import save_tiny_pipeline

    save_tiny_pipeline("qwenimage", tmp_path / "pipe", seed=0)
    cache = tmp_path / "cache"
    shutil.copytree(V1_FIXTURE, cache)
    run(cache, tmp_path / "sync", "data.prefetch=0")
    run(cache, tmp_path / "ahead", "data.prefetch=2")
    step2 = tmp_path / "ahead" / "checkpoints" / "step_0000002"
    summary = run(cache, tmp_path / "resumed", "data.prefetch=2", f"trainer.resume={step2}")
    assert summary["start_step"] == 2 and summary["steps"] == 4

    def weights(name):
        return load_file(str(tmp_path / name / "checkpoints" / "step_0000004" / "model.safetensors"))

    sync = weights("sync")
    for name in ("ahead", "resumed"):
        other = weights(name)
        assert all(torch.equal(sync[k], other[k]) for k in sync), name
    import json

    rows = [json.loads(line) for line in (tmp_path / "ahead" / "metrics.jsonl").read_text().splitlines()]
    assert all("time/data_wait_s" in r for r in rows if "loss" in r)
