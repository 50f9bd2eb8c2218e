"""trainer.torch_threads=0: the thread count chosen at start from the cores this process may use and a short
probe (fewstep/training/threads.py)."""

from __future__ import annotations

import pytest
import torch

from fewstep.training import threads
from fewstep.training.threads import Threads, candidates, cgroup_cpu_quota, choose_threads, fewest_within


@pytest.fixture
def machine(monkeypatch):
    """A machine of ``cores`` usable cores and torch default ``default`` threads, no thread env variables."""

    def make(cores: int, default: int | None = None):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        monkeypatch.setattr(threads.torch, "get_num_threads", lambda: default or cores)

    return make


def fake_probe(times: dict[int, float]):
    asked = []

    def probe(counts):
        asked.append(list(counts))
        return {n: times[n] for n in counts}

    probe.asked = asked
    return probe


def test_the_fewest_threads_within_ten_percent_of_the_fastest():
    assert fewest_within({2: 3.0, 1: 6.0}) == 2  # quiet 2 cores: parallel pays
    assert fewest_within({2: 50.0, 1: 8.0}) == 1  # beside a busy process: threads wait on each other
    assert fewest_within({2: 5.4, 1: 5.0}) == 1  # a tie goes to fewer threads
    assert fewest_within({8: 1.0, 4: 1.09, 2: 1.5, 1: 3.0}) == 4
    assert fewest_within({8: 1.0, 4: 1.11, 2: 1.5, 1: 3.0}) == 8
    assert candidates(8) == [8, 4, 2, 1] and candidates(6) == [6, 3, 1] and candidates(1) == [1]


def test_quiet_machine_keeps_every_core_and_a_busy_one_drops_to_one(machine):
    machine(2)
    quiet = choose_threads(0, probe=fake_probe({2: 0.030, 1: 0.055}))
    assert quiet.count == 2 and quiet.reason == "auto: 2 usable cores; probe 1: 55 ms, 2: 30 ms"
    assert str(quiet) == "2 torch threads (auto: 2 usable cores; probe 1: 55 ms, 2: 30 ms)"
    busy = choose_threads(0, probe=fake_probe({2: 0.500, 1: 0.070}))
    assert busy.count == 1 and str(busy).startswith("1 torch thread (auto")


def test_an_explicit_count_or_thread_variable_is_taken_as_given(machine, monkeypatch):
    machine(2)
    probe = fake_probe({2: 1.0, 1: 1.0})
    assert choose_threads(3, probe=probe) == Threads(3, "trainer.torch_threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(0, probe=probe) == Threads(2, "OMP_NUM_THREADS=1")  # torch already follows it
    assert probe.asked == []


def test_processes_of_one_node_share_its_cores(machine, monkeypatch):
    machine(16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # accelerate launch / torchrun, 8 GPUs
    probe = fake_probe({2: 1.0, 1: 1.9})
    assert choose_threads(0, probe=probe) == Threads(2, "auto: 16 usable cores / 8 processes on this node; "
                                                        "probe 1: 1900 ms, 2: 1000 ms")  # fmt: skip
    assert probe.asked == [[2, 1]]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert choose_threads(0, probe=probe).count == 1 and probe.asked == [[2, 1]]  # one core each: no probe
    machine(1)
    assert choose_threads(0, probe=probe) == Threads(1, "1 usable cores")


def test_the_cap_is_torchs_default_and_the_probe_halves_down_from_it(machine):
    machine(32, default=16)  # torch: physical cores
    probe = fake_probe({16: 1.0, 8: 1.05, 4: 1.6, 2: 3.0, 1: 6.0})
    assert choose_threads(0, probe=probe).count == 8
    assert probe.asked == [[16, 8, 4, 2, 1]]


def test_cgroup_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_cpu_quota(v1) == 3.0


def test_the_probe_times_each_count_leaves_the_rng_and_the_thread_count(monkeypatch):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    before = torch.get_num_threads()
    times = threads.probe_times([2, 1], rounds=3)
    assert sorted(times) == [1, 2] and all(t > 0 for t in times.values())
    assert torch.get_num_threads() == before
    assert torch.equal(torch.rand(3), expected)  # the run's seed stream untouched


def test_a_count_chosen_once_is_reused_by_the_runs_a_process_starts_soon_after(monkeypatch):
    calls = []

    def choose(requested):
        calls.append(requested)
        return Threads(1, "auto: 2 usable cores; probe 1: 5 ms, 2: 40 ms") if requested <= 0 else Threads(3, "x")

    monkeypatch.setattr(threads, "choose_threads", choose)
    monkeypatch.setattr(threads, "_last", None)
    before = torch.get_num_threads()
    try:
        first = threads.set_torch_threads(0)
        second = threads.set_torch_threads(0)
        assert calls == [0] and first.count == second.count == 1 and torch.get_num_threads() == 1
        assert second.reason.startswith(first.reason + ", ") and second.reason.endswith(" s ago")
        assert threads.set_torch_threads(3).count == 3 and calls == [0, 3]  # an explicit count: always its own
        monkeypatch.setattr(threads, "_last", (threads.time.monotonic() - threads.REUSE_S - 1, first))
        threads.set_torch_threads(0)
        assert calls == [0, 3, 0]  # measured again after REUSE_S
    finally:
        torch.set_num_threads(before)


def test_one_slow_pass_does_not_decide_but_frequent_ones_do(monkeypatch):
    """Each count's slowest pass is left out of its total: a hiccup on a quiet machine (one 50 ms pass at
    2 threads) keeps both cores; a thread that keeps waiting for a core (every other pass slow) does not."""

    def clocked(durations_ms: dict[int, list[float]]) -> dict[int, float]:
        state = {"now": 0.0, "count": None, "phase": None, "passes": {n: iter(d) for n, d in durations_ms.items()}}

        def set_threads(n):
            state["count"], state["phase"] = n, "armed"

        def clock():
            if state["phase"] == "armed":  # the pass's start
                state["phase"] = "timing"
            elif state["phase"] == "timing":  # its end
                state["now"] += next(state["passes"][state["count"]]) / 1e3
                state["phase"] = None
            return state["now"]

        monkeypatch.setattr(threads.torch, "set_num_threads", set_threads)
        monkeypatch.setattr(threads.time, "perf_counter", clock)
        try:
            return threads.probe_times([2, 1], rounds=5, budget_s=60)
        finally:
            monkeypatch.undo()

    quiet = clocked({2: [1, 1, 50, 1, 1], 1: [2, 2, 2, 2, 2]})
    assert quiet == pytest.approx({2: 0.004, 1: 0.008}) and fewest_within(quiet) == 2
    busy = clocked({2: [1, 30, 1, 30, 1], 1: [2, 2, 2, 2, 2]})
    assert busy == pytest.approx({2: 0.033, 1: 0.008}) and fewest_within(busy) == 1
