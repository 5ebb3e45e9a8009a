"""Goodput: the requests a user would call good, judged one by one against per-request latency terms.

    --goodput "ttft<200ms,tpot<50ms,itl<80ms,latency<2s"     (scenario: top-level `goodput = "..."`)

A request is *good* when it succeeded and meets EVERY term. The terms, each `NAME < VALUE[UNIT]` (or
`<=`; units ms (default), s, us), judge figures of that one request, as the recorder measures them
(loadgen/recorder/_recorder.py):
- ttft     first token chunk - intended send instant (open loop: its wait for a send slot counts)
- tpot     its own (last token chunk - first token chunk) / (output tokens - 1)
- itl      its LARGEST gap between two successive token chunks: the worst stall its user saw (a
           response whose one gap was a 2 s pause is not good, however quick its other chunks)
- latency  response complete - intended send instant (end to end)
Figures and limits are compared in whole microseconds (the histograms' rounding), so "latency<=10ms" keeps
a request the histogram records at 10.000 ms. A term on a figure a request does not have is met: tpot of a one-token answer, itl of an answer in one
chunk, ttft of a stream without a token chunk. ttft, tpot and itl exist only for streamed responses
(protocol openai); the scenario refuses them for other protocols.

Judging happens where outcomes are recorded (Recorder.flush), so `good` is an exact count that adds up
across intervals and across the workers of a distributed run like every other counter. summary.json's
`goodput` block gives good, judged (every response, ok or error), share = good / judged and
goodput_rps = good responses completed within the run window / its length (achieved_rps's counting).

This module sits beside loadgen.units and loadgen.errors (the recorder below everything else uses it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from loadgen.errors import ScenarioError

__all__ = ["STREAM_TERMS", "TERMS", "Goodput", "GoodputTerm", "parse_goodput"]

TERMS = ("ttft", "tpot", "itl", "latency")
"""The figures a term may judge, in the order the judging reads them."""
STREAM_TERMS = ("ttft", "tpot", "itl")
"""Terms on token timings: only streamed responses have these figures."""
_TERM = re.compile(r"^\s*([a-z_0-9.]+)\s*(<=|>=|<|>|=)\s*([0-9]*\.?[0-9]+)\s*([a-z%/]*)\s*$")
_UNITS_S = {"": 1e-3, "ms": 1e-3, "s": 1.0, "us": 1e-6}


@dataclass(frozen=True)
class GoodputTerm:
    """One term: the figure `name`, `op` ("<" or "<="), `limit_s` in seconds; `text` as normalised."""

    name: str
    op: str
    limit_s: float

    @property
    def text(self) -> str:
        return f"{self.name}{self.op}{_format_s(self.limit_s)}"

    def met(self, values_s: np.ndarray) -> np.ndarray:
        """Per request: True when its value meets the term or it has none (NaN). Values and limit are
        compared in whole microseconds, rounded as the recorder rounds what its histograms record."""
        values_us, limit_us = np.rint(values_s * 1e6), round(self.limit_s * 1e6)
        with np.errstate(invalid="ignore"):
            within = values_us < limit_us if self.op == "<" else values_us <= limit_us
        return within | np.isnan(values_s)


@dataclass(frozen=True)
class Goodput:
    """The terms a good request meets (at most one per figure)."""

    terms: tuple[GoodputTerm, ...]

    @property
    def text(self) -> str:
        """The terms, normalised, comma-separated: "ttft<200ms,latency<2s"."""
        return ",".join(term.text for term in self.terms)

    @property
    def needs_stream(self) -> list[str]:
        """The terms that judge token timings (only streamed responses have them)."""
        return [term.name for term in self.terms if term.name in STREAM_TERMS]

    def judge(self, **figures_s: np.ndarray) -> np.ndarray:
        """Per request, whether it meets every term; `figures_s` holds one float array (seconds, NaN for
        "this request has no such figure") per term name, all the same length. A figure no term names is
        ignored; a term whose figure is not given is met by every request.

        >>> rule = parse_goodput("ttft<100ms,latency<1s")
        >>> rule.judge(ttft=np.array([0.05, 0.2, np.nan]), latency=np.array([0.5, 0.5, 0.5])).tolist()
        [True, False, True]
        """
        good: np.ndarray | None = None
        for term in self.terms:
            values = figures_s.get(term.name)
            if values is None:
                continue
            met = term.met(np.asarray(values, dtype=np.float64))
            good = met if good is None else good & met
        if good is None:
            size = len(next(iter(figures_s.values()))) if figures_s else 0
            return np.ones(size, dtype=bool)
        return good


def _format_s(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{seconds:g}s"
    return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}us"


def _term(text: str) -> GoodputTerm:
    match = _TERM.match(text.lower())
    if not match:
        raise ValueError(f"{text.strip()!r}: expected NAME<VALUE, e.g. ttft<200ms (names: {', '.join(TERMS)})")
    name, op, value, unit = match.groups()
    if name not in TERMS:
        raise ValueError(f"{text.strip()!r}: unknown term {name!r}; known: {', '.join(TERMS)}")
    if op not in ("<", "<="):
        raise ValueError(f"{text.strip()!r}: a goodput term is an upper limit: use < or <=")
    if unit not in _UNITS_S:
        raise ValueError(f"{text.strip()!r}: unknown unit {unit!r} (ms, s, us; none: ms)")
    limit = float(value) * _UNITS_S[unit]
    if limit <= 0:
        raise ValueError(f"{text.strip()!r}: the limit must be > 0")
    return GoodputTerm(name, op, limit)


def parse_goodput(text: str, source: str = "--goodput") -> Goodput:
    """The terms of "ttft<200ms,tpot<50ms"; a bad or repeated term raises ScenarioError (exit 2) naming it.

    >>> parse_goodput("ttft<200ms, itl<=0.08s").text
    'ttft<200ms,itl<=80ms'
    """
    terms: list[GoodputTerm] = []
    problems: list[str] = []
    for piece in filter(str.strip, text.split(",")):
        try:
            term = _term(piece)
        except ValueError as exc:
            problems.append(f"goodput: {exc}")
            continue
        if any(known.name == term.name for known in terms):
            problems.append(f"goodput: {piece.strip()!r}: {term.name} is given twice")
            continue
        terms.append(term)
    if problems or not terms:
        raise ScenarioError(problems or ["goodput: no term given, e.g. ttft<200ms,tpot<50ms"], source)
    return Goodput(tuple(terms))
