"""Distributed runs without a cluster: shares cover the schedule exactly, the master's interval merge
equals one histogram fed every sample, the combined self-check, the CLI flag rules, the worker gauges."""

from __future__ import annotations

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry

from loadgen.driver.distributed import (
    DistributedOptions,
    IntervalMerger,
    Share,
    combined_generator,
    split_users,
)
from loadgen.driver.selfcheck import SelfCheck
from loadgen.patterns.schedule import count_in, schedule, schedule_offsets
from loadgen.recorder import HistogramSet, Recorder
from loadgen.scenario import OpenLoop, Stage
from loadgen.sinks.prometheus import RunCollector, WorkerHealth


def offsets_of(pattern: OpenLoop, share: Share) -> np.ndarray:
    chunks = list(schedule(pattern, share=(share.k, share.n), start_s=share.start_s))
    return np.concatenate(chunks) if chunks else np.empty(0)


@pytest.mark.parametrize("pattern", [
    OpenLoop(rate=400, duration=10),
    OpenLoop(rate=300, duration=40, arrival="poisson", seed=7),  # more than one 8192-arrival chunk
    OpenLoop(rate=0, stages=[Stage(duration=5, ramp_to=500), Stage(duration=5, rate=500)]),
])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_shares_send_the_single_process_schedule_between_them(pattern: OpenLoop, n: int) -> None:
    whole = schedule_offsets(pattern)
    parts = [offsets_of(pattern, Share(k, n)) for k in range(n)]
    assert sum(len(p) for p in parts) == len(whole)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), whole)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # every n-th arrival each: balanced


def test_a_lost_share_split_among_the_others_covers_it_from_the_takeover_instant() -> None:
    pattern = OpenLoop(rate=400, duration=10, arrival="poisson", seed=3)
    lost = Share(1, 3)
    taken = lost.split(2, 4.2)
    assert taken == [Share(1, 6, 4.2), Share(4, 6, 4.2)]
    own = offsets_of(pattern, lost)
    np.testing.assert_array_equal(np.sort(np.concatenate([offsets_of(pattern, s) for s in taken])),
                                  own[own >= 4.2])
    # split again (a second loss): still the same arrivals, from the later instant
    again = taken[1].split(3, 6.0)
    theirs = offsets_of(pattern, taken[1])
    np.testing.assert_array_equal(np.sort(np.concatenate([offsets_of(pattern, s) for s in again])),
                                  theirs[theirs >= 6.0])


def test_a_reshuffle_for_a_joining_worker_covers_the_rest_of_the_schedule_once() -> None:
    """Share 0/2, and 1/2 until 2 s then split in two (a lost worker's handover), end at 5.1 s; three
    fresh shares from there: together, exactly the schedule, no arrival twice."""
    pattern = OpenLoop(rate=300, duration=10, arrival="poisson", seed=4)
    before = [Share(0, 2), Share(1, 2).ended(2.0), *Share(1, 2).split(2, 2.0)]
    assert before[2:] == [Share(1, 4, 2.0), Share(3, 4, 2.0)]
    ended = [share.ended(5.1) for share in before]
    assert ended[0] == Share(0, 2, 0.0, 5.1) and not ended[0].sends_after(5.1) and Share(0, 2).sends_after(9.9)
    after = Share.reshuffle(3, 5.1)
    sent = [offsets_of(pattern, s) for s in (*ended, *after)]
    sent = [o[o < s.end_s] if s.end_s is not None else o for o, s in zip(sent, (*ended, *after), strict=True)]
    np.testing.assert_array_equal(np.sort(np.concatenate(sent)), schedule_offsets(pattern))
    # a share that had ended splits into pieces that end there too (a worker lost before the reshuffle)
    assert ended[2].split(2, 3.0) == [Share(1, 8, 3.0, 5.1), Share(5, 8, 3.0, 5.1)]


def test_shares_travel_as_json_with_and_without_an_end() -> None:
    for share in (Share(1, 4, 2.5), Share(0, 2, 0.0, 3.25)):
        assert Share.from_json(share.as_json()) == share
    assert Share.from_json([1, 3, 2.0]) == Share(1, 3, 2.0)
    assert str(Share(0, 2, 1.5, 4.0)) == "0/2 from 1.500 s until 4.000 s"


def test_a_worker_joining_mid_run_holds_back_only_the_slots_not_merged_yet() -> None:
    merged = Recorder(0.0, 1.0)
    merger = IntervalMerger(merged, ["a"])
    merger.add("a", 0.0, 1.0, HistogramSet(ok=5))
    merger.join("b")
    merger.add("b", 0.0, 1.0, HistogramSet())  # before it joined: nothing to add to a merged slot
    merger.add("a", 1.0, 2.0, HistogramSet(ok=3))
    assert [i.figures.ok for i in merged.intervals] == [5]  # slot 1 waits for b
    merger.add("b", 1.0, 2.0, HistogramSet(ok=2))
    assert [i.figures.ok for i in merged.intervals] == [5, 5]
    assert merged.cumulative.ok == 10


def test_count_in_counts_a_shares_arrivals_in_a_window() -> None:
    pattern = OpenLoop(rate=200, duration=10)
    assert count_in(pattern, (0, 2), 0.0, 10.0) == 1000
    assert count_in(pattern, (1, 2), 2.0, 3.0) == 100
    assert count_in(pattern, (0, 1), 9.5, 20.0) == 100
    assert count_in(pattern, (0, 1), 3.0, 3.0) == 0


def test_share_rejects_a_k_outside_n() -> None:
    with pytest.raises(ValueError, match="0 <= k < n"):
        Share(2, 2)


def test_users_split_as_evenly_as_they_go() -> None:
    assert split_users(10, 4) == [3, 3, 2, 2]
    assert split_users(1, 3) == [1, 0, 0]
    assert sum(split_users(17, 5)) == 17


def worker_interval(rng: np.random.Generator, scale_ms: float) -> tuple[HistogramSet, list[float]]:
    """A worker's interval of 200 requests; returns it and the latencies it recorded (seconds)."""
    rec = Recorder(0.0)
    latencies = list(rng.exponential(scale_ms / 1000.0, 200))
    for i, latency in enumerate(latencies):
        intended = i / 200
        rec.record(intended, intended + latency / 10, intended + latency, None)
    rec.record(0.5, 0.5, 0.6, "http_503")
    rec.record_dropped(0.7)
    rec.finish(1.0)
    return rec.cumulative, latencies


def test_merged_intervals_equal_one_histogram_fed_every_workers_samples() -> None:
    rng = np.random.default_rng(5)
    merged = Recorder(100.0, 1.0, window_end_t=105.0)
    merger = IntervalMerger(merged, ["a", "b", "c"])
    truth = HdrHistogram(1, 3_600_000_000, 3)
    for k in range(5):
        for worker, scale in (("a", 2.0), ("b", 20.0), ("c", 200.0)):
            figures, latencies = worker_interval(rng, scale)
            for latency in latencies:
                truth.record_value(round(latency * 1e6))
            merger.add(worker, float(k), float(k + 1), HistogramSet.decode(figures.encode()))
    merger.flush()
    cumulative = merged.cumulative
    assert cumulative.ok == 3000 and cumulative.errors == {"http_503": 15} and cumulative.dropped == 15
    assert cumulative.latency.get_total_count() == truth.get_total_count()
    for q in (50, 90, 99, 99.9, 100):
        assert cumulative.latency.get_value_at_percentile(q) == truth.get_value_at_percentile(q)
    assert [(i.start_t, i.end_t) for i in merged.intervals] == [(100.0 + k, 101.0 + k) for k in range(5)]
    assert [i.figures.ok for i in merged.intervals] == [600] * 5


def test_a_slot_waits_for_every_sending_worker_and_a_closed_one_holds_nothing_back() -> None:
    merged = Recorder(0.0, 1.0)
    merger = IntervalMerger(merged, ["a", "b"])
    one = HistogramSet(ok=1)
    merger.add("a", 0.0, 1.0, one)
    merger.add("a", 1.0, 2.0, one)
    assert merged.intervals == []  # b has sent nothing yet
    merger.add("b", 0.0, 1.0, HistogramSet(ok=2))
    assert [i.figures.ok for i in merged.intervals] == [3]
    merger.close("b")  # b lost: slot 1 need not wait for it
    assert [i.figures.ok for i in merged.intervals] == [3, 1]
    merger.add("a", 2.0, 2.4, one)  # the last, partial interval
    assert merged.intervals[-1].end_t == pytest.approx(2.4)
    assert merged.cumulative.ok == 5


def test_flush_merges_what_is_left_in_order() -> None:
    merged = Recorder(0.0, 1.0)
    merger = IntervalMerger(merged, ["a", "b"])
    merger.add("a", 0.0, 1.0, HistogramSet(ok=1))
    merger.add("a", 1.0, 2.0, HistogramSet(ok=1))
    merger.flush()
    assert [(i.start_t, i.figures.ok) for i in merged.intervals] == [(0.0, 1), (1.0, 1)]


def generator_of(lag_p99_ms: float = 0.2, cpu: float = 0.3) -> dict:
    """A worker's self-check as it ships it: open loop, cap 100, lag p99 as given."""
    return SelfCheck(lag_ms={"p50": 0.05, "p99": lag_p99_ms}, cpu_fraction=cpu, peak_in_flight=3,
                     max_in_flight=100, max_lag_ms=1.0).as_json()


def test_combined_check_is_bound_when_any_worker_was_and_names_it() -> None:
    workers = [
        {"worker": "0", "generator": generator_of(), "lost_at_s": None, "last_report_s": 10.0},
        {"worker": "1", "generator": generator_of(3.0, 0.5),
         "lost_at_s": None, "last_report_s": 10.0},
    ]
    check = combined_generator(workers, HistogramSet(), open_loop=True, max_in_flight=100, max_lag_ms=1.0,
                               master_cpu=0.1)
    assert check.bound and check.bound_workers == ["1"]
    assert check.reasons == ["schedule lag p99 3.000 ms > 1.0 ms on worker 1"]
    assert check.cpu_fraction == 0.5 and check.peak_in_flight == 6 and check.max_in_flight == 100
    # a sweep judges lag again on the measured part: the worker's whole-run lag gives way to it
    assert not check.measured({"p50": 0.1, "p99": 0.5}, 0).bound
    assert check.measured({"p50": 0.1, "p99": 2.0}, 0).reasons == ["schedule lag p99 2.000 ms > 1.0 ms (all workers)"]


def test_combined_check_reports_a_lost_worker_and_a_busy_master() -> None:
    workers = [
        {"worker": "0", "generator": generator_of(), "lost_at_s": None, "last_report_s": 10.0},
        {"worker": "1", "generator": None, "lost_at_s": 4.5, "last_report_s": 3.0},
    ]
    check = combined_generator(workers, HistogramSet(), open_loop=False, max_in_flight=None, max_lag_ms=1.0,
                               master_cpu=0.99)
    assert check.bound and check.bound_workers == ["1"]
    assert "worker 1 lost 4.5 s into the run" in check.reasons[0]
    assert "after 3.0 s" in check.reasons[0]
    assert "on the master" in check.reasons[1]
    assert check.measured({"p99": 0.1}, 0).bound  # a lost worker stays a finding of the measured part


def test_healthy_workers_make_a_healthy_run() -> None:
    workers = [{"worker": str(i), "generator": generator_of(), "lost_at_s": None, "last_report_s": 10.0}
               for i in range(3)]
    check = combined_generator(workers, HistogramSet(), open_loop=True, max_in_flight=10, max_lag_ms=1.0,
                               master_cpu=0.05)
    assert not check.bound and check.reasons == [] and check.bound_workers == []
    assert check.as_json()["bound"] is False and check.as_json()["bound_workers"] == []


def test_flags_single_process_local_workers_and_master() -> None:
    assert DistributedOptions.from_flags() is None
    local = DistributedOptions.from_flags(processes=3)
    assert (local.processes, local.wanted, local.bind_host, local.bind_port) == (3, 3, "127.0.0.1", 0)
    master = DistributedOptions.from_flags(master=True, expect_workers=8, stop_on_worker_loss=True)
    assert (master.wanted, master.bind_host, master.bind_port, master.stop_on_worker_loss) == (8, "*", 5557, True)
    assert DistributedOptions.from_flags(processes=-1).processes >= 1


@pytest.mark.parametrize(("flags", "message"), [
    ({"processes": 2, "master": True}, "exclude each other"),
    ({"master": True}, "--expect-workers"),
    ({"expect_workers": 2}, "goes with --master"),
    ({"processes": -3}, "--processes must be"),
    ({"stop_on_worker_loss": True}, "go with --processes or --master"),
    ({"master": True, "expect_workers": 1, "bind_port": 70000}, "--master-bind-port"),
])
def test_bad_flags_are_named(flags: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistributedOptions.from_flags(**flags)


class _View:
    recorder = None
    in_flight = 0
    metrics_host = "127.0.0.1"

    def offered_rps_now(self) -> float:
        return 0.0

    def worker_health(self) -> list[WorkerHealth]:
        return [WorkerHealth("0", "hostA", True, 0.0002, 0, 0.4, 3),
                WorkerHealth("1", "hostB", False, 0.004, 12, 0.9, 0)]


def test_the_master_exports_each_workers_health() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(_View()))
    b = {"worker": "1", "host": "hostB"}
    assert registry.get_sample_value("loadgen_worker_up", {"worker": "0", "host": "hostA"}) == 1.0
    assert registry.get_sample_value("loadgen_worker_up", b) == 0.0
    assert registry.get_sample_value("loadgen_worker_lag_p99_seconds", b) == 0.004
    assert registry.get_sample_value("loadgen_worker_dropped_total", b) == 12
    assert registry.get_sample_value("loadgen_worker_cpu_ratio", b) == 0.9
    assert registry.get_sample_value("loadgen_worker_in_flight", {"worker": "0", "host": "hostA"}) == 3
