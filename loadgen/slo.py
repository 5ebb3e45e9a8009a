"""SLOs: parse "p99<150ms,errors<1%" and judge a run's summary against it (exit code 1 on failure).

Terms, comma-separated, each `METRIC OP VALUE[UNIT]`:
  p50 p90 p99 p99.9 max mean   latency percentiles (ms, or s/us with the unit)
  service_p99 ...              the same on service time (send -> response)
  ttft_p99 itl_p99 tpot_p99 ... streamed (openai) runs: time to first token, inter-token latency,
                               time per output token, with the same percentiles and units
  tokens_per_s                 streamed runs: output tokens per second
  goodput_rps                  with --goodput: good requests per second (req/s optional)
  goodput                      with --goodput: good requests as a share of responses, 0..1 or a % ("0.9", "90%")
  errors                       failed requests as % of requests ("%" optional)
  throughput                   achieved req/s (rps, req/s optional)
OP is one of < <= > >=. Every check is reported with its measured value, and a run whose generator
could not keep its schedule fails a "generator healthy" check: its figures describe the generator,
so they cannot show that the endpoint meets anything (like an INVALID result in MLPerf LoadGen).
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass
from typing import Any

from loadgen.errors import ScenarioError

__all__ = ["Check", "Objective", "judge", "parse_slo"]

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_TERM = re.compile(r"^\s*([a-z_0-9.]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*([a-z%/]*)\s*$")
_PERCENTILES = {"p50": "p50", "p90": "p90", "p99": "p99", "p99.9": "p99_9", "p99_9": "p99_9",
                "max": "max", "mean": "mean"}
_TIME_UNITS = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 0.001}
_FAMILIES = ("service_", "ttft_", "itl_", "tpot_")
"""Prefixes of the summary's other time figures (service_ms, ttft_ms, itl_ms, tpot_ms)."""


@dataclass(frozen=True)
class Objective:
    """One term: `metric` (a summary path such as latency_ms.p99), `op`, `limit` (in the path's unit)."""

    text: str
    metric: str
    op: str
    limit: float


@dataclass(frozen=True)
class Check:
    name: str
    measured: float | None
    limit: float | None
    met: bool
    reason: str = ""


def _objective(term: str) -> Objective:
    match = _TERM.match(term.lower())
    if not match:
        raise ValueError(f"{term.strip()!r}: expected METRIC OP VALUE, e.g. p99<150ms or errors<1%")
    name, op, value, unit = match.groups()
    limit = float(value)
    if name == "errors":
        if unit not in ("", "%"):
            raise ValueError(f"{term.strip()!r}: errors are a percentage, e.g. errors<1%")
        return Objective(term.strip(), "error_percent", op, limit)
    if name in ("throughput", "rps"):
        if unit not in ("", "rps", "req/s"):
            raise ValueError(f"{term.strip()!r}: throughput is in req/s, e.g. throughput>=500")
        return Objective(term.strip(), "achieved_rps", op, limit)
    if name in ("tokens_per_s", "output_tokens_per_s"):
        if unit not in ("", "tok/s"):
            raise ValueError(f"{term.strip()!r}: output tokens are per second, e.g. tokens_per_s>=500")
        return Objective(term.strip(), "output_tokens_per_s", op, limit)
    if name == "goodput_rps":
        if unit not in ("", "rps", "req/s"):
            raise ValueError(f"{term.strip()!r}: goodput_rps is in req/s, e.g. goodput_rps>=50")
        return Objective(term.strip(), "goodput.goodput_rps", op, limit)
    if name in ("goodput", "goodput_share"):
        if unit not in ("", "%"):
            raise ValueError(f"{term.strip()!r}: goodput is a share of the responses, e.g. goodput>=0.9 or "
                             "goodput>=90%")
        return Objective(term.strip(), "goodput.share", op, limit / 100.0 if unit == "%" else limit)
    family, key = name.split("_", 1) if name.startswith(_FAMILIES) else ("latency", name)
    if key not in _PERCENTILES or unit not in _TIME_UNITS:
        raise ValueError(f"{term.strip()!r}: unknown metric or unit (p50, p90, p99, p99.9, max, mean; ms, s, us)")
    return Objective(term.strip(), f"{family}_ms.{_PERCENTILES[key]}", op, limit * _TIME_UNITS[unit])


def parse_slo(text: str) -> list[Objective]:
    """Objectives from "p99<150ms,errors<1%"; a bad term raises ScenarioError (exit 2) naming it.

    >>> [o.metric for o in parse_slo("p99<150ms, errors<1%, throughput>=100")]
    ['latency_ms.p99', 'error_percent', 'achieved_rps']
    """
    objectives, problems = [], []
    for term in filter(str.strip, text.split(",")):
        try:
            objectives.append(_objective(term))
        except ValueError as exc:
            problems.append(f"slo: {exc}")
    if problems or not objectives:
        raise ScenarioError(problems or ["slo: no objective given"], "--slo")
    return objectives


def _measured(summary: dict[str, Any], metric: str) -> float | None:
    """The summary's figure for `metric`; None when the run has no such figure (e.g. ttft without streaming)."""
    if metric == "error_percent":
        requests = summary.get("requests", 0)
        return 100.0 * sum(summary.get("errors", {}).values()) / requests if requests else 0.0
    value: Any = summary
    for part in metric.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    return float(value)


def judge(summary: dict[str, Any], objectives: list[Objective]) -> dict[str, Any]:
    """{"met": bool, "checks": [...]} for the summary; goes into summary.json as "slo"."""
    checks = []
    for objective in objectives:
        measured = _measured(summary, objective.metric)
        if measured is None:
            why = ("goodput needs terms: --goodput" if objective.metric.startswith("goodput.")
                   else "streamed figures need --protocol openai")
            checks.append(Check(objective.text, None, objective.limit, False,
                                f"this run has no {objective.metric} ({why})"))
            continue
        met = _OPS[objective.op](measured, objective.limit)
        checks.append(Check(objective.text, round(measured, 3), objective.limit, met))
    if summary.get("requests", 0) == 0:
        checks.append(Check("requests answered", 0, None, False, "no request was answered: nothing to judge"))
    if summary.get("generator_bound"):
        reasons = "; ".join(summary.get("generator", {}).get("reasons", []))
        checks.append(Check("generator healthy", None, None, False,
                            f"the generator was the bottleneck ({reasons}): scale it out or lower the load"))
    return {"met": all(check.met for check in checks), "checks": [asdict(check) for check in checks]}
