"""SLO terms: parsing (bad terms named, exit 2) and verdicts on summaries (every check reported)."""

import pytest

from loadgen.scenario import ScenarioError, load_scenario
from loadgen.slo import judge, parse_slo

SUMMARY = {
    "requests": 1000,
    "errors": {"http_503": 5, "timeout": 5},
    "achieved_rps": 480.0,
    "latency_ms": {"p50": 20.0, "p90": 30.0, "p99": 120.0, "p99_9": 300.0, "max": 400.0, "mean": 25.0},
    "service_ms": {"p50": 19.0, "p90": 29.0, "p99": 90.0, "p99_9": 200.0, "max": 300.0, "mean": 22.0},
    "generator_bound": False,
    "generator": {"reasons": []},
}


def test_parse_units_and_metrics() -> None:
    objectives = parse_slo("p99<150ms, p99.9 <= 0.5s, mean<30000us, service_p99<100, errors<1%, throughput>=450")
    assert [(o.metric, o.op, o.limit) for o in objectives] == [
        ("latency_ms.p99", "<", 150.0),
        ("latency_ms.p99_9", "<=", 500.0),
        ("latency_ms.mean", "<", 30.0),
        ("service_ms.p99", "<", 100.0),
        ("error_percent", "<", 1.0),
        ("achieved_rps", ">=", 450.0),
    ]


def test_every_bad_term_is_named() -> None:
    with pytest.raises(ScenarioError) as info:
        parse_slo("p98<1ms, p99<1lightyear, latency is fine, errors<2ms")
    assert len(info.value.problems) == 4 and info.value.exit_code == 2
    assert "p98<1ms" in str(info.value) and "errors<2ms" in str(info.value)


def test_verdict_lists_each_check() -> None:
    verdict = judge(SUMMARY, parse_slo("p99<150ms,errors<1%,throughput>=500"))
    assert [(c["name"], c["measured"], c["met"]) for c in verdict["checks"]] == [
        ("p99<150ms", 120.0, True),
        ("errors<1%", 1.0, False),
        ("throughput>=500", 480.0, False),
    ]
    assert verdict["met"] is False
    assert judge(SUMMARY, parse_slo("p99<150ms,errors<=1%"))["met"] is True


def test_generator_bound_run_cannot_meet_an_slo() -> None:
    summary = {**SUMMARY, "generator_bound": True, "generator": {"reasons": ["12 arrivals dropped"]}}
    verdict = judge(summary, parse_slo("p99<1s"))
    assert verdict["met"] is False
    assert "12 arrivals dropped" in verdict["checks"][-1]["reason"]


def test_empty_run_cannot_meet_an_slo() -> None:
    assert judge({**SUMMARY, "requests": 0, "errors": {}}, parse_slo("p99<1s"))["met"] is False


def test_scenario_slo_is_validated_with_the_rest() -> None:
    overrides = {"target.url": "http://h:1", "target.model": "m", "open_loop.rate": 1, "open_loop.duration": 1}
    assert load_scenario(None, {**overrides, "slo": "p99<10ms"}).slo == "p99<10ms"
    with pytest.raises(ScenarioError, match="slo"):
        load_scenario(None, {**overrides, "slo": "p99<<10ms"})


def test_streamed_figures_are_judged_and_missing_ones_fail_with_a_reason() -> None:
    objectives = parse_slo("ttft_p99<50ms, itl_mean<=11ms, tpot_p50<0.012s, tokens_per_s>=100")
    assert [o.metric for o in objectives] == ["ttft_ms.p99", "itl_ms.mean", "tpot_ms.p50", "output_tokens_per_s"]
    streamed = {"requests": 10, "errors": {}, "ttft_ms": {"p99": 40.0}, "itl_ms": {"mean": 10.5},
                "tpot_ms": {"p50": 10.2}, "output_tokens_per_s": 200.0}
    assert judge(streamed, objectives)["met"] is True
    assert judge({**streamed, "ttft_ms": {"p99": 60.0}}, objectives)["met"] is False
    verdict = judge({"requests": 10, "errors": {}, "latency_ms": {"p99": 3.0}}, objectives)
    assert verdict["met"] is False
    assert all(check["measured"] is None and "need --protocol openai" in check["reason"]
               for check in verdict["checks"])
