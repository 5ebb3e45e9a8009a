"""Compute a run's summary (rates, counts, percentiles, generator health) and write it as JSON.

Place in the flow: Recorder -> **summary** -> summary.json, terminal table, sweep steps and reports.
Every percentile comes from the recorder's cumulative HDR histograms; see
loadgen/recorder/_recorder.py for what latency, service and lag measure.
"""

from __future__ import annotations

import json
import os
from typing import Any

from loadgen.recorder import Recorder


def build_summary(
    recorder: Recorder,
    *,
    offered_rps: float,
    duration_s: float,
    generator: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarise the recorder's cumulative figures (closed intervals only: call finish() first).

    `generator` carries the generator's own health (lag, CPU, in-flight figures, "bound" and its
    "reasons"); it is kept whole. `extra` keys are added last.

    >>> summary = build_summary(rec, offered_rps=500.0, duration_s=60.0, generator=health)  # doctest: +SKIP
    >>> summary["latency_ms"]["p99"]  # doctest: +SKIP
    12.345
    """
    figures = recorder.cumulative
    summary: dict[str, Any] = {
        "offered_rps": float(offered_rps),
        "sent_rps": _rate(figures.sent, duration_s),
        "achieved_rps": _rate(figures.completed_in_window, duration_s),
        "duration_s": float(duration_s),
        "requests": figures.requests,
        "ok": figures.ok,
        "errors": dict(sorted(figures.errors.items())),
        "dropped": figures.dropped,
        "out_of_range": figures.out_of_range,
        "sent": figures.sent,
        "completed_in_window": figures.completed_in_window,
        "generator_bound": bool(generator.get("bound", False)),
        "generator": dict(generator),
        "latency_ms": figures.percentiles_ms("latency"),
        "service_ms": figures.percentiles_ms("service"),
        "lag_ms": figures.percentiles_ms("lag"),
    }
    summary.update(extra or {})
    return summary


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """Write the summary as indented JSON (keys in the order built).

    >>> write_summary("runs/summary.json", summary)  # doctest: +SKIP
    """
    with open(path, "w", encoding="utf-8") as out:
        json.dump(summary, out, indent=2)
        out.write("\n")


def _rate(count: int, duration_s: float) -> float:
    return round(count / duration_s, 3) if duration_s > 0 else 0.0
