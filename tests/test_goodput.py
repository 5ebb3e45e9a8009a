"""Goodput: the terms, the per-request judging in the recorder, and a real run against a mock whose TTFT is
known request by request (servers/openai_mock --ttft-ms 20,120: completion n waits 20 ms when n is odd,
120 ms when even), so the number of good requests is known exactly before loadgen counts it."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from loadgen.errors import ScenarioError
from loadgen.goodput import parse_goodput
from loadgen.recorder import HistogramSet, Interval, Recorder
from loadgen.scenario import load_scenario
from loadgen.sinks.summary import build_summary
from loadgen.slo import judge, parse_slo
from loadgen.sweep import StepResult, verdict
from tests.support.processes import Server, run_loadgen, start_server, stop_process
from tests.support.timing import HostNoise

MODEL = "mock-llm"


# -- the terms ------------------------------------------------------------------------------------


def test_terms_parse_with_units_and_normalise() -> None:
    rule = parse_goodput(" ttft<200ms, tpot<=0.05s,itl<80000us , latency<2")
    assert rule.text == "ttft<200ms,tpot<=50ms,itl<80ms,latency<2ms"  # a bare number is ms, as in --slo
    assert [term.limit_s for term in rule.terms] == pytest.approx([0.2, 0.05, 0.08, 0.002])
    assert rule.needs_stream == ["ttft", "tpot", "itl"]
    assert parse_goodput("latency<2s").text == "latency<2s" and parse_goodput("latency<2s").needs_stream == []


@pytest.mark.parametrize(("text", "named"), [
    ("ttfb<200ms", "unknown term 'ttfb'"),
    ("ttft>200ms", "upper limit"),
    ("ttft<200parsecs", "unknown unit"),
    ("ttft<200ms,ttft<100ms", "ttft is given twice"),
    ("ttft<0ms", "must be > 0"),
    ("ttft", "expected NAME<VALUE"),
    (" , ", "no term given"),
])
def test_bad_terms_are_named(text: str, named: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_goodput(text)
    assert named in str(caught.value) and "--goodput" in str(caught.value)


def test_scenario_refuses_token_terms_without_streaming_and_goodput_slo_without_terms() -> None:
    base = {"target.url": "http://127.0.0.1:9", "target.model": "m", "open_loop.rate": 1, "open_loop.duration": 1}
    with pytest.raises(ScenarioError, match=r"goodput: ttft, itl judge token timings"):
        load_scenario(None, {**base, "goodput": "ttft<1s,itl<1s,latency<2s"})
    assert load_scenario(None, {**base, "goodput": "latency<2s"}).goodput_rule.text == "latency<2s"
    with pytest.raises(ScenarioError, match=r"slo: goodput_rps>=5 needs goodput terms"):
        load_scenario(None, {**base, "slo": "p99<1s,goodput_rps>=5"})
    with pytest.raises(ScenarioError, match=r"goodput: 'tpot<x'"):
        load_scenario(None, {**base, "target.protocol": "openai", "goodput": "tpot<x"})


def test_slo_judges_goodput_rps_and_share() -> None:
    objectives = parse_slo("goodput_rps>=40,goodput>=90%")
    assert [(o.metric, o.limit) for o in objectives] == [("goodput.goodput_rps", 40.0), ("goodput.share", 0.9)]
    summary = {"requests": 100, "errors": {}, "goodput": {"goodput_rps": 45.0, "share": 0.89}}
    checks = judge(summary, objectives)["checks"]
    assert [(c["met"], c["measured"]) for c in checks] == [(True, 45.0), (False, 0.89)]
    missing = judge({"requests": 10, "errors": {}}, parse_slo("goodput>=0.5"))["checks"][0]
    assert not missing["met"] and "--goodput" in missing["reason"]


# -- judging in the recorder ----------------------------------------------------------------------


def stream(rec: Recorder, intended: float, ttft: float, gaps: list[float], *, tokens: int | None = None,
           tail: float = 0.001, error: str | None = None, sent_after: float = 0.0) -> None:
    """One streamed response: first token chunk `ttft` after `intended`, then chunks `gaps` apart."""
    first = intended + ttft
    times = [first + sum(gaps[:k]) for k in range(len(gaps) + 1)]
    rec.record_stream(intended, intended + sent_after, times[-1] + tail, error, [] if error else times,
                      0 if error else (tokens if tokens is not None else len(times)))


def test_each_term_judges_the_requests_own_figures() -> None:
    rule = parse_goodput("ttft<100ms,tpot<20ms,itl<50ms,latency<1s")
    rec = Recorder(0.0, streams=True, goodput=rule, window_end_t=100.0)
    stream(rec, 0.0, 0.050, [0.010, 0.010])              # good
    stream(rec, 1.0, 0.150, [0.010])                     # ttft 150 ms: bad
    stream(rec, 2.0, 0.050, [0.010, 0.060] + [0.005] * 8)  # tpot 12.5 ms but one stall of 60 ms: bad
    stream(rec, 3.0, 0.050, [0.030, 0.030])              # every gap 30 ms: tpot 30 ms, bad
    stream(rec, 4.0, 0.050, [0.030], tokens=4)           # 4 tokens in 2 chunks: tpot 10 ms, itl 30 ms: good
    stream(rec, 5.0, 0.090, [])                          # one token: no tpot, no itl: met, good
    stream(rec, 6.0, 0.050, [0.010], tail=1.2)           # latency 1.26 s: bad
    stream(rec, 7.0, 0.050, [0.010], error="stream_error")  # failed: never good
    stream(rec, 8.0, 0.040, [0.010], sent_after=0.030)   # ttft 40 ms from intended (10 from sent): good
    rec.record_stream(9.0, 9.0, 9.5, None, [], 3)        # no token chunk at all: only latency judged: good
    rec.finish(10.0)
    figures = rec.cumulative
    assert (figures.good, figures.good_in_window, figures.requests) == (5, 5, 10)
    summary = build_summary(rec, offered_rps=1.0, duration_s=10.0, generator={})
    assert summary["goodput"] == {"terms": rule.text, "good": 5, "judged": 10, "share": 0.5, "goodput_rps": 0.5}


def test_ttft_is_from_the_intended_send_like_loadgens_ttft() -> None:
    rec = Recorder(0.0, streams=True, goodput=parse_goodput("ttft<100ms"))
    stream(rec, 0.0, 0.120, [0.01], sent_after=0.080)  # the server took 40 ms, the send was 80 ms late
    rec.finish(1.0)
    assert rec.cumulative.good == 0 and rec.cumulative.percentiles_ms("ttft")["max"] == pytest.approx(120, abs=0.2)


def test_good_after_the_window_counts_in_the_share_not_the_rate() -> None:
    rec = Recorder(0.0, streams=True, goodput=parse_goodput("latency<1s"), window_end_t=2.0)
    stream(rec, 1.0, 0.5, [0.1])   # done at 1.601: in the window
    stream(rec, 1.9, 0.5, [0.1])   # done at 2.501: the drain
    rec.finish(3.0)
    summary = build_summary(rec, offered_rps=1.0, duration_s=2.0, generator={})
    assert summary["goodput"]["good"] == 2 and summary["goodput"]["goodput_rps"] == 0.5 == summary["achieved_rps"]


def test_a_plain_recorder_judges_latency() -> None:
    rec = Recorder(0.0, goodput=parse_goodput("latency<=10ms"))
    for k, latency in enumerate((0.005, 0.010, 0.011, 0.002)):
        rec.record(float(k), float(k), k + latency, None)
    rec.record(5.0, 5.0, 5.001, "http_503")
    rec.finish(6.0)
    assert (rec.cumulative.good, rec.cumulative.requests) == (3, 5)


def test_vectorised_judging_equals_a_request_by_request_reading() -> None:
    """Random streams (0 to 6 chunks, tokens >= chunks) judged by the recorder's numpy path, in batches of
    several intervals, against a plain loop over each request's own figures."""
    rng = np.random.default_rng(7)
    rule = parse_goodput("ttft<60ms,tpot<12ms,itl<25ms,latency<150ms")
    rec = Recorder(0.0, streams=True, goodput=rule, window_end_t=50.0)
    expected, expected_in_window = 0, 0
    for k in range(600):
        intended = k * 0.1
        chunks = int(rng.integers(0, 7))
        times = list(intended + 0.01 + np.cumsum(rng.uniform(0.0, 0.05, size=chunks)))
        tokens = chunks + int(rng.integers(0, 3)) if chunks else int(rng.integers(0, 2))
        done = (times[-1] if times else intended + 0.02) + float(rng.uniform(0.0, 0.05))
        error = "timeout" if rng.random() < 0.1 else None
        rec.record_stream(intended, intended, done, error, [] if error else times, 0 if error else tokens)
        if k % 97 == 0:
            rec.close_interval(intended + 0.05)
        good = error is None and done - intended < 0.150
        if good and times:
            good = times[0] - intended < 0.060
            if good and tokens > 1:
                good = (times[-1] - times[0]) / (tokens - 1) < 0.012
            if good and len(times) > 1:
                good = max(b - a for a, b in itertools.pairwise(times)) < 0.025
        expected += good
        expected_in_window += good and done <= 50.0
    rec.finish(70.0)
    assert 50 < expected < 500  # both kinds are there
    assert (rec.cumulative.good, rec.cumulative.good_in_window) == (expected, expected_in_window)


def test_good_counts_travel_with_a_workers_intervals_and_add_up_on_the_master() -> None:
    rule = parse_goodput("ttft<100ms")
    master = Recorder(0.0, streams=True, goodput=rule)
    total = 0
    for worker in range(3):
        rec = Recorder(0.0, streams=True, goodput=rule)
        for k in range(10):
            stream(rec, k * 0.05, 0.05 if (k + worker) % 3 else 0.2, [0.01])
        rec.finish(1.0)
        total += rec.cumulative.good
        for interval in rec.intervals:
            shipped = json.loads(json.dumps(interval.figures.encode()))  # what a worker sends
            master.merge_interval(Interval(interval.start_t, interval.end_t, HistogramSet.decode(shipped)))
    assert master.cumulative.good == total == 20


# -- the sweep's goodput knee ---------------------------------------------------------------------


def step(index: int, rate: float, good_rps: float, share: float, *, bound: bool = False) -> StepResult:
    return StepResult(index=index, load=rate, offered_rps=rate, achieved_rps=rate, latency_ms={"p99": 1.0},
                      errors=0, dropped=0, generator_bound=bound, stable=True, slo_met=None, requests=100,
                      goodput={"terms": "ttft<1s", "good": 0, "judged": 100, "share": share,
                               "goodput_rps": good_rps})


def test_verdict_gives_the_best_goodput_step_and_the_last_load_that_kept_the_share() -> None:
    steps = [step(1, 10, 10, 1.0), step(2, 20, 19, 0.95), step(3, 40, 30, 0.75), step(4, 30, 27.5, 0.92),
             step(5, 80, 40, 0.5, bound=True)]
    goodput = verdict(steps, has_slo=False)["goodput"]
    assert goodput["best"]["step"] == 3 and goodput["best"]["goodput_rps"] == 30  # step 5 is generator-bound
    assert goodput["knee"]["step"] == 4 and goodput["knee"]["load"] == 30  # 10, 20, 30 kept >= 0.9; 40 did not
    assert goodput["share_floor"] == 0.9 and goodput["terms"] == "ttft<1s"
    steps.append(step(6, 5, 5, 0.8))  # the lowest load already under the floor: no knee
    assert verdict(steps, has_slo=False)["goodput"]["knee"] is None
    assert "goodput" not in verdict([dataclasses.replace(steps[0], goodput=None)], has_slo=False)


# -- a real run against a mock whose TTFT is known per request -------------------------------------


@pytest.fixture
def mock_server() -> Iterator:
    started: list[Server] = []

    def factory(*args: str) -> Server:
        server = start_server(list(args), module="servers.openai_mock")
        started.append(server)
        return server

    yield factory
    for server in started:
        stop_process(server.proc)


def measured_records(server: Server, summary: dict) -> list[dict]:
    """The mock's record of each completion loadgen measured (its warm-up requests come first)."""
    records = httpx.get(server.url + "/mock", timeout=5).json()["requests"]
    assert [r["serial"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) == summary["warmup_requests"] + summary["requests"]
    return records[summary["warmup_requests"]:]


@pytest.mark.integration
@pytest.mark.parametrize("distributed", [[], ["--processes", "2"]], ids=["run", "two-workers"])
def test_good_requests_are_exactly_those_whose_ttft_met_the_term(mock_server, host_noise: HostNoise, tmp_path,
                                                                 distributed: list[str]) -> None:
    """TTFT 20 ms or 120 ms by the request's serial; term ttft<70ms. A fast request could only miss it by a
    host stall over 50 ms, a slow one never meets it, so good = the requests the server answered in 20 ms."""
    server = mock_server("--ttft-ms", "20,120", "--itl-ms", "2")
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, "--rate", "25",
                      "--duration", "2s", "--max-tokens", "4", "--goodput", "ttft<70ms,tpot<50ms,latency<1s",
                      *distributed, out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    records = measured_records(server, summary)
    assert summary["errors"] == {} and summary["requests"] == len(records) >= 45
    fast = sum(r["ttft_ms"] == 20.0 for r in records)
    assert 0 < fast < len(records) and {r["ttft_ms"] for r in records} == {20.0, 120.0}
    goodput = summary["goodput"]
    host_noise.assert_holds(goodput["good"] == fast, margin_ms=50.0,
                            what=f"good {goodput['good']} against {fast} requests answered in 20 ms")
    assert goodput["judged"] == summary["requests"] and goodput["share"] == round(fast / len(records), 6)
    assert goodput["terms"] == "ttft<70ms,tpot<50ms,latency<1s"
    assert 0 < goodput["goodput_rps"] <= summary["achieved_rps"]
    assert f"goodput  {goodput['goodput_rps']:.1f}/s" in run.stdout and f"{goodput['good']} of" in run.stdout
    if distributed:
        assert sum(w["requests"] for w in summary["distributed"]["workers"]) == summary["requests"]


@pytest.mark.integration
def test_a_bad_goodput_term_exits_2_naming_it(tmp_path) -> None:
    run = run_loadgen("--protocol", "openai", "--target", "http://127.0.0.1:9", "--model", MODEL, "--rate", "1",
                      "--duration", "1s", "--goodput", "ttft<200ms,stall<1s", out=tmp_path / "run", timeout=60)
    assert run.returncode == 2 and "goodput" in run.stderr and "'stall'" in run.stderr, run.stderr


@pytest.mark.timing  # its verdict needs a generator with the cores to itself
@pytest.mark.integration
def test_sweep_curve_and_verdict_carry_goodput_and_token_figures(mock_server, tmp_path) -> None:
    server = mock_server("--ttft-ms", "5,5,5,80", "--itl-ms", "2")  # every 4th request slow
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, "--rates", "10,20",
                      "--step-duration", "1s", "--warmup", "0s", "--max-tokens", "4", "--goodput", "ttft<50ms",
                      out=tmp_path / "sweep", verb="sweep")
    assert run.returncode == 0, run.stdout + run.stderr
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    rows = list(csv.DictReader((tmp_path / "sweep" / "curve.csv").open()))
    assert len(rows) == 2 == len(sweep["steps"])
    for row, step_json in zip(rows, sorted(sweep["steps"], key=lambda s: s["load"]), strict=True):
        summary = json.loads((tmp_path / "sweep" / step_json["dir"] / "summary.json").read_text())
        assert float(row["goodput_rps"]) == summary["goodput"]["goodput_rps"] == step_json["goodput"]["goodput_rps"]
        assert float(row["goodput_share"]) == summary["goodput"]["share"]
        assert 0.6 <= summary["goodput"]["share"] <= 0.85  # one in four is slow, give or take the warm-up's
        assert float(row["ttft_p50_ms"]) == summary["ttft_ms"]["p50"] and float(row["ttft_p99_ms"]) >= 80.0
        assert float(row["itl_p99_ms"]) == summary["itl_ms"]["p99"]
        assert float(row["tpot_p99_ms"]) == summary["tpot_ms"]["p99"]
        assert float(row["output_tokens_per_s"]) == summary["output_tokens_per_s"] > 0
    goodput = sweep["goodput"]
    healthy = [s for s in sweep["steps"] if not s["generator_bound"]]  # best is judged among healthy steps
    assert goodput["terms"] == "ttft<50ms"
    if healthy:
        assert goodput["best"]["goodput_rps"] == max(s["goodput"]["goodput_rps"] for s in healthy)
    else:
        assert goodput["best"] is None
    assert goodput["knee"] is None  # no step kept 90 % good
    assert "goodput: best" in run.stdout
