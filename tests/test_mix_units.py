"""Mixes without servers: the [[mix]] keys and their errors, which entry each arrival goes to, and the
per-entry figures of the recorder, the summary, the table, the hlog and /metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from loadgen.errors import ScenarioError
from loadgen.options import parse_mix
from loadgen.patterns.mix import EntryChooser
from loadgen.patterns.schedule import arrivals
from loadgen.recorder import HistogramSet, Recorder
from loadgen.scenario import load_scenario, validate_scenario
from loadgen.sinks import build_summary, read_hlog, render_table, write_hlog
from loadgen.sinks.prometheus import RunCollector

TARGET = {"url": "http://127.0.0.1:8000", "protocol": "openai", "model": "llama-8b"}
PATTERN = {"rate": 1000, "duration": 10, "arrival": "poisson", "seed": 7}


def scenario_with(mix, **extra):
    return validate_scenario({"target": dict(TARGET), "open_loop": dict(PATTERN), "mix": mix, **extra})


def problems_of(mix, **extra) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        scenario_with(mix, **extra)
    return caught.value.problems


# -- keys ----------------------------------------------------------------------------------------
def test_entries_inherit_the_target_and_override_its_keys() -> None:
    scenario = scenario_with([{"model": "llama-8b", "weight": 3},
                              {"model": "llama-70b", "weight": 1, "max_tokens": 64}])
    first, second = scenario.mix
    assert scenario.mix_names == ["llama-8b", "llama-70b"]
    assert first.target.url == second.target.url == TARGET["url"]
    assert second.target.max_tokens.value == 64 and first.target.max_tokens != second.target.max_tokens
    again = validate_scenario(scenario.model_dump(mode="json"))  # a worker gets the scenario dumped
    assert again.mix_names == scenario.mix_names and again.mix[1].target == second.target


def test_entries_sharing_a_model_get_names_of_their_own() -> None:
    scenario = scenario_with([{"model": "m", "weight": 1}, {"model": "m", "weight": 1, "url": "http://h2:9000"},
                              {"model": "m", "weight": 1, "name": "third"}])
    assert scenario.mix_names == ["m", "m/h2:9000", "third"]
    assert scenario_with([{"model": "m", "weight": 1}, {"model": "m", "weight": 2}]).mix_names == ["m#0", "m#1"]
    assert scenario_with([{"model": "m", "weight": 1, "name": "m"}, {"model": "m", "weight": 2}]).mix_names == \
        ["m", "m#1"]


@pytest.mark.parametrize(("mix", "expected"), [
    ([], "mix: give at least one entry"),
    ([{"model": "a", "weight": 0}], "mix[0].weight: Input should be greater than 0"),
    ([{"model": "a", "weight": 1}, {"model": "b", "weight": -1}], "mix[1].weight: Input should be greater than 0"),
    ([{"model": "a", "weight": float("inf")}], "mix[0].weight: Input should be a finite number"),
    ([{"model": "a", "weight": float("nan")}], "mix[0].weight: Input should be a finite number"),
    ([{"model": "a"}], "mix[0].weight: required key is missing"),
    ([{"model": "a", "weight": 1}, {"model": "b", "weight": 1, "max_tokens": 0}], "mix[1].max_tokens"),
    ([{"model": "a", "weight": 1}, {"model": "b", "weight": 1, "colour": "red"}], "mix[1].colour: unknown key"),
    ([{"model": "a", "weight": 1, "name": "x"}, {"model": "b", "weight": 1, "name": "x"}], "duplicate name(s) x"),
    ([{"model": "a", "weight": 1, "name": "a b"}], "mix[0].name: a name has no spaces"),
    ([{"model": "a", "weight": 1, "protocol": "kserve-http"}], "mix[0].protocol: every entry speaks the target's"),
])
def test_bad_entries_are_named(mix, expected) -> None:
    problems = problems_of(mix)
    assert any(expected in problem for problem in problems), problems


def test_a_bad_target_key_is_reported_once_not_per_entry() -> None:
    with pytest.raises(ScenarioError) as caught:
        validate_scenario({"target": {**TARGET, "timeout": -1}, "open_loop": dict(PATTERN),
                           "mix": [{"model": "a", "weight": 1}, {"model": "b", "weight": 1}]})
    assert [p for p in caught.value.problems if "timeout" in p] == [caught.value.problems[0]]
    assert caught.value.problems[0].startswith("target.timeout")


def test_the_mix_flag() -> None:
    assert parse_mix("llama-8b=3, llama-70b=1") == [{"model": "llama-8b", "weight": 3.0},
                                                     {"model": "llama-70b", "weight": 1.0}]
    for bad, said in (("a", "expected model=weight"), ("a=x", "is not a number"), ("=3", "expected model=weight")):
        with pytest.raises(ValueError, match=said):
            parse_mix(bad)
    scenario = load_scenario(None, {"target.url": TARGET["url"], "target.protocol": "openai", "open_loop.rate": 5,
                                    "open_loop.duration": "1s", "mix": parse_mix("a=3,b=1")})
    assert scenario.target.model == "a"  # no --model: the first entry's
    assert [entry.weight for entry in scenario.mix] == [3.0, 1.0]


# -- entry choice ----------------------------------------------------------------------------------
def test_weights_are_honoured_and_the_draws_repeat() -> None:
    picks = EntryChooser([3, 1], seed=7).entries_of(np.arange(10_000))
    share = np.count_nonzero(picks == 0) / picks.size
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / picks.size)  # binomial: 4 standard deviations
    assert np.array_equal(picks, EntryChooser([3, 1], seed=7).entries_of(np.arange(10_000)))
    assert not np.array_equal(picks, EntryChooser([3, 1], seed=8).entries_of(np.arange(10_000)))
    three = EntryChooser([1, 2, 7], seed=1).entries_of(np.arange(10_000))
    for entry, weight in enumerate((0.1, 0.2, 0.7)):
        assert abs(np.count_nonzero(three == entry) / 10_000 - weight) < 4 * np.sqrt(weight * (1 - weight) / 10_000)


def test_shares_of_a_schedule_pick_the_entries_of_the_whole() -> None:
    pattern = scenario_with([{"model": "a", "weight": 3}, {"model": "b", "weight": 1}]).open_loop
    whole = {int(row): entry for _, rows in arrivals(pattern)
             for row, entry in zip(rows, EntryChooser([3, 1], pattern.seed).entries_of(rows), strict=True)}
    shared = {}
    for k in range(3):
        chooser = EntryChooser([3, 1], pattern.seed)  # each generator its own
        for _, rows in arrivals(pattern, share=(k, 3)):
            shared.update(zip(rows.tolist(), chooser.entries_of(rows).tolist(), strict=True))
    assert len(whole) > 9_000
    assert shared == whole


def test_trace_rows_go_to_the_entry_they_name(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": i * 0.01, "model": model} for i, model in enumerate(["big", "small", "", "big"] * 50)]
    trace.write_text("".join(json.dumps(row).replace(', "model": ""', "") + "\n" for row in rows))
    scenario = validate_scenario({"target": dict(TARGET), "open_loop": {"trace": str(trace)},
                                  "mix": [{"model": "small", "weight": 1}, {"model": "llama-70b", "weight": 1,
                                                                             "name": "big"}]})
    chooser = EntryChooser([1, 1], 1, scenario.trace, scenario.mix_by_model)
    picked = [chooser.entry_of(i) for i in range(len(rows))]
    assert [picked[i] for i in range(0, 200, 4)] == [1] * 50 and [picked[i] for i in range(1, 200, 4)] == [0] * 50
    assert {picked[i] for i in range(2, 200, 4)} == {0, 1}  # rows naming no model are drawn
    trace.write_text(trace.read_text() + json.dumps({"timestamp": 9, "model": "huge"}) + "\n")
    with pytest.raises(ScenarioError) as caught:
        validate_scenario({"target": dict(TARGET), "open_loop": {"trace": str(trace)},
                           "mix": [{"model": "small", "weight": 1}, {"model": "big", "weight": 1}]})
    assert f"{trace} line 201: model 'huge' is no [[mix]] entry's" in caught.value.problems[0]


# -- figures ---------------------------------------------------------------------------------------
START = 1000.0


def mixed_recorder(streams: bool = False) -> Recorder:
    """Two entries over two intervals: a 30 ok of 2 ms + 1 timeout, b 10 ok of 8 ms; 2 dropped."""
    rec = Recorder(START, models=("a", "b"), window_end_t=START + 2, streams=streams)
    a, b = rec.parts
    for index in range(2):
        t = START + index
        for _ in range(15):
            a.record(t, t + 0.0001, t + 0.002, None)
        for _ in range(5):
            b.record(t, t + 0.0001, t + 0.008, None)
        rec.record_dropped(t)
        rec.close_interval(t + 1)
    a.record(START + 1.5, START + 1.5, START + 1.9, "timeout")
    rec.finish(START + 2)
    return rec


def test_the_totals_are_the_sum_of_the_entries() -> None:
    rec = mixed_recorder()
    total, (a, b) = rec.cumulative, rec.cumulative.by_model.values()
    assert (a.ok, a.errors, b.ok, b.errors) == (30, {"timeout": 1}, 10, {})
    assert total.requests == a.requests + b.requests == 41 and total.dropped == 2 and a.dropped == b.dropped == 0
    assert total.latency.get_total_count() == 40
    assert a.percentiles_ms("latency")["p99"] == pytest.approx(2.0, abs=0.01)
    assert b.percentiles_ms("latency")["p50"] == pytest.approx(8.0, abs=0.01)
    assert [i.figures.by_model["a"].ok for i in rec.intervals] == [15, 15, 0]


def test_workers_intervals_merge_exactly_per_entry() -> None:
    one, two = mixed_recorder(), mixed_recorder()
    merged = Recorder(START, models=("a", "b"))
    for interval in (*one.intervals, *two.intervals):
        decoded = HistogramSet.decode(json.loads(json.dumps(interval.figures.encode())))
        merged.merge_interval(interval.__class__(interval.start_t, interval.end_t, decoded))
    for name in ("a", "b"):
        mine, theirs = merged.cumulative.by_model[name], one.cumulative.by_model[name]
        assert mine.requests == 2 * theirs.requests
        assert mine.latency.get_total_count() == 2 * theirs.latency.get_total_count()
    assert sum(e.requests for e in merged.cumulative.by_model.values()) == merged.cumulative.requests == 82


def test_a_recorder_without_a_mix_keeps_no_entries() -> None:
    rec = Recorder(START)
    rec.record(START, START, START + 0.001, None)
    rec.finish(START + 1)
    assert rec.cumulative.by_model is None and "by_model" not in rec.cumulative.encode()
    summary = build_summary(rec, offered_rps=1, duration_s=1, generator={})
    assert "by_model" not in summary and "model " not in render_table(summary)


def test_summary_table_and_hlog_break_the_figures_down(tmp_path: Path) -> None:
    rec = mixed_recorder(streams=True)
    summary = build_summary(rec, offered_rps=21, duration_s=2.0, generator={})
    by_model = summary["by_model"]
    assert list(by_model) == ["a", "b"]
    assert by_model["a"]["requests"] + by_model["b"]["requests"] == summary["requests"]
    assert by_model["a"]["achieved_rps"] == 15.5 and by_model["b"]["achieved_rps"] == 5.0
    assert by_model["b"]["latency_ms"]["p50"] == pytest.approx(8.0, abs=0.01)
    assert by_model["a"]["errors"] == {"timeout": 1} and "output_tokens" in by_model["a"]
    table = render_table(summary)
    assert "model    a        31 requests" in table and "model    b        10 requests" in table
    write_hlog(tmp_path / "run.hlog", rec, start_epoch_s=1.7e9)
    tags = read_hlog(tmp_path / "run.hlog")
    assert sum(h.get_total_count() for h in tags["latency:a"]) == 30
    assert sum(h.get_total_count() for h in tags["latency:b"]) == 10
    assert sum(h.get_total_count() for h in tags[None]) == 40  # the untagged line: total latency
    first = (tmp_path / "run.hlog").read_text().splitlines()
    assert next(line for line in first if not line.startswith(("#", '"'))).split(",")[0] != "Tag=latency:a"


@dataclass
class FakeRun:
    recorder: Recorder
    in_flight: int = 0
    metrics_host: str = "127.0.0.1"

    def offered_rps_now(self) -> float:
        return 0.0

    def worker_health(self) -> None:
        return None


def test_metrics_have_model_labelled_families_beside_the_totals() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(FakeRun(mixed_recorder())))
    get = registry.get_sample_value
    assert get("loadgen_requests_total", {"outcome": "ok", "kind": "ok"}) == 40
    assert get("loadgen_model_requests_total", {"model": "a", "outcome": "ok", "kind": "ok"}) == 30
    assert get("loadgen_model_requests_total", {"model": "a", "outcome": "error", "kind": "timeout"}) == 1
    assert get("loadgen_model_requests_total", {"model": "b", "outcome": "ok", "kind": "ok"}) == 10
    labels = {"model": "b", "quantile": "0.5", "window": "run"}
    assert get("loadgen_model_latency_percentile_seconds", labels) == pytest.approx(0.008, abs=1e-5)
    labels["window"] = "10s"
    assert get("loadgen_model_latency_percentile_seconds", labels) == pytest.approx(0.008, abs=1e-5)
    plain = CollectorRegistry(auto_describe=False)
    rec = Recorder(START)
    rec.record(START, START, START + 0.001, None)
    rec.finish(START + 1)
    plain.register(RunCollector(FakeRun(rec)))
    assert not any(m.name.startswith("loadgen_model_") for m in plain.collect())


def test_docstring_examples() -> None:
    import doctest

    import loadgen.patterns.mix

    assert doctest.testmod(loadgen.patterns.mix).failed == 0
