"""One sweep step: the figures of one run at one load, with its warm-up cut off and its stability judged.

Place in the flow: plan -> **step** -> verdict. A step is an ordinary run of the scenario at the
step's load for warm-up + duration (the orchestration in loadgen/_sweepcmd.py runs it). Only the
intervals that start at or after the end of the warm-up count: `measured_recorder` merges them into
a fresh Recorder, so every figure of the step (summary.json, latency.hlog, the curve) comes from the
same HDR histograms, just without the warm-up. Responses that arrive after the run window (the
drain) keep their latency but do not count towards achieved throughput, as in a plain run.

A step is *stable* when achieved throughput and p99 latency over its last few one-second windows
(3 by default) stay within a set percentage (10 % by default) of their mean: a queue that is still
growing shows as a rising p99, a server that is slowing down as a falling throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loadgen.driver.selfcheck import SelfCheck
from loadgen.recorder import Interval, Recorder

__all__ = [
    "StepResult",
    "Window",
    "measured_generator",
    "measured_recorder",
    "stability",
    "step_result",
    "windows_of",
]

_EPS_S = 1e-6
_LLM_KEYS = ("ttft_ms", "itl_ms", "tpot_ms", "output_tokens_per_s")
"""The summary keys of a streamed step kept in its StepResult (and sweep.json)."""


@dataclass(frozen=True)
class Window:
    """One closed interval of a step, as the stability test reads it."""

    achieved_rps: float
    p99_ms: float


@dataclass
class StepResult:
    """A finished step; what the plan reads (see plan.StepOutcome) and what sweep.json shows."""

    index: int
    load: float
    """The step's load: req/s in open loop, users in closed loop."""
    offered_rps: float
    achieved_rps: float
    latency_ms: dict[str, float]
    errors: int
    dropped: int
    generator_bound: bool
    stable: bool
    slo_met: bool | None
    """None when the sweep has no SLO."""
    generator_reasons: list[str] = field(default_factory=list)
    stability: dict[str, Any] = field(default_factory=dict)
    out_dir: str = ""
    server: dict[str, Any] | None = None
    """What the target's own metrics say about this step (loadgen/serverside.py), when scraped."""
    requests: int = 0
    """Responses in the measured part, ok and errors (the error ratio's denominator)."""
    goodput: dict[str, Any] | None = None
    """The step's summary.json goodput block (terms, good, judged, share, goodput_rps); None without terms."""
    llm: dict[str, Any] | None = None
    """A streamed step's token figures: ttft_ms, itl_ms, tpot_ms (percentiles) and output_tokens_per_s."""

    @property
    def goodput_rps(self) -> float | None:
        return None if self.goodput is None else float(self.goodput["goodput_rps"])

    @property
    def goodput_share(self) -> float | None:
        return None if self.goodput is None else float(self.goodput["share"])

    @property
    def error_ratio(self) -> float:
        """Errors over responses (0 when there were none)."""
        return self.errors / self.requests if self.requests else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.index,
            "load": self.load,
            "offered_rps": round(self.offered_rps, 3),
            "achieved_rps": round(self.achieved_rps, 3),
            "latency_ms": self.latency_ms,
            "errors": self.errors,
            "dropped": self.dropped,
            "stable": self.stable,
            "stability": self.stability,
            "generator_bound": self.generator_bound,
            "generator_reasons": self.generator_reasons,
            "slo_met": self.slo_met,
            **({"goodput": self.goodput} if self.goodput is not None else {}),
            **(self.llm or {}),
            "server": self.server,
            "dir": self.out_dir,
        }


def measured_recorder(recorder: Recorder, warmup_s: float) -> Recorder:
    """A Recorder holding only `recorder`'s intervals that start `warmup_s` or later after its start."""
    measured = Recorder(recorder.start_t + warmup_s, recorder.interval_s, recorder.window_end_t,
                        streams=recorder.streams, goodput=recorder.goodput, models=recorder.models)
    for interval in recorder.intervals:
        if interval.start_t >= measured.start_t - _EPS_S:
            measured.merge_interval(interval)
    return measured


def measured_generator(generator: SelfCheck, measured: Recorder) -> SelfCheck:
    """The run's generator self-check, with lag and dropped arrivals judged on the measured part only.

    The warm-up exists to absorb start-up (connections, first collections): its lag says nothing
    about the measured figures. CPU and in-flight figures stay those of the whole run.
    """
    figures = measured.cumulative
    return generator.measured(figures.percentiles_ms("lag"), figures.dropped)


def windows_of(recorder: Recorder) -> list[Window]:
    """The intervals inside the run window (not the drain after it), as throughput and p99 figures."""
    windows = []
    for interval in recorder.intervals:
        if interval.start_t >= recorder.window_end_t - _EPS_S:
            continue
        windows.append(_window(interval))
    return windows


def _window(interval: Interval) -> Window:
    length = max(interval.end_t - interval.start_t, _EPS_S)
    figures = interval.figures
    return Window(figures.requests / length, figures.percentiles_ms("latency")["p99"])


def stability(windows: list[Window], tolerance: float = 0.10, last: int = 3) -> dict[str, Any]:
    """Judge the last `last` windows: stable when throughput and p99 each stay within `tolerance` of
    their mean. Fewer windows than `last` cannot show stability.

    >>> stability([Window(100, 10), Window(101, 10.5), Window(99, 10.2)])["stable"]
    True
    >>> stability([Window(100, 10), Window(100, 20), Window(100, 30)])["stable"]
    False
    """
    tail = windows[-last:]
    throughput = _spread([w.achieved_rps for w in tail])
    p99 = _spread([w.p99_ms for w in tail])
    enough = len(tail) >= last
    return {
        "stable": enough and throughput <= tolerance and p99 <= tolerance,
        "windows": len(tail),
        "throughput_spread": round(throughput, 4),
        "p99_spread": round(p99, 4),
        "tolerance": tolerance,
    }


def _spread(values: list[float]) -> float:
    """Largest distance from the mean, as a fraction of the mean (0 when all are zero or none)."""
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    if mean <= 0:
        return 0.0
    return max(abs(v - mean) for v in values) / mean


def step_result(index: int, load: float, summary: dict[str, Any], judged: dict[str, Any],
                out_dir: str = "") -> StepResult:
    """A StepResult from a step's summary (as summary.json holds it) and its stability judgement."""
    slo = summary.get("slo")
    return StepResult(
        index=index,
        load=load,
        offered_rps=float(summary["offered_rps"]),
        achieved_rps=float(summary["achieved_rps"]),
        latency_ms=dict(summary["latency_ms"]),
        errors=sum(summary.get("errors", {}).values()),
        requests=int(summary.get("requests", 0)),
        dropped=int(summary.get("dropped", 0)),
        generator_bound=bool(summary.get("generator_bound", False)),
        generator_reasons=list(summary.get("generator", {}).get("reasons", [])),
        stable=bool(judged["stable"]),
        stability=judged,
        slo_met=None if slo is None else bool(slo["met"]),
        out_dir=out_dir,
        goodput=dict(summary["goodput"]) if "goodput" in summary else None,
        llm={key: summary[key] for key in _LLM_KEYS} if all(key in summary for key in _LLM_KEYS) else None,
    )
