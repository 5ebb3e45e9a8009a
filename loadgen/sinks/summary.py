"""Compute a run's summary (rates, counts, percentiles, generator health) and write it as JSON.

Place in the flow: Recorder -> **summary** -> summary.json, terminal table, sweep steps and reports.
Every percentile comes from the recorder's cumulative HDR histograms; see
loadgen/recorder/_recorder.py for what latency, service and lag (and for streamed responses TTFT,
ITL and TPOT) measure, and loadgen/goodput.py for what makes a request good (the `goodput` block).
A run with a mix ([[mix]]) adds `by_model`: each entry's figures under its name (model_summary).
"""

from __future__ import annotations

import json
import os
from typing import Any

from loadgen.errors import redact_url
from loadgen.files import write_text_atomic
from loadgen.recorder import HistogramSet, Recorder


def build_summary(
    recorder: Recorder,
    *,
    offered_rps: float,
    duration_s: float,
    generator: dict[str, Any],
    in_flight_at_end: int = 0,
    inferences_per_request: int = 1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarise the recorder's cumulative figures (closed intervals only: call finish() first).

    `generator` carries the generator's own health (lag, CPU, in-flight figures, "bound" and its
    "reasons"); it is kept whole. `extra` keys are added last.

    Every arrival of an open-loop run window is in exactly one count: started ("sent": answered, or
    still in flight at the end: `in_flight_at_end`), "dropped" (in-flight cap) or "unsent" (never started: the dispatcher was
    still behind it when dispatching stopped).

    >>> summary = build_summary(rec, offered_rps=500.0, duration_s=60.0, generator=health)  # doctest: +SKIP
    >>> summary["latency_ms"]["p99"]  # doctest: +SKIP
    12.345
    """
    figures = recorder.cumulative
    summary: dict[str, Any] = {
        "offered_rps": float(offered_rps),
        "sent_rps": _rate(figures.sent + in_flight_at_end, duration_s),
        "achieved_rps": _rate(figures.completed_in_window, duration_s),
        "achieved_inferences_per_s": _rate(figures.completed_in_window * inferences_per_request, duration_s),
        "duration_s": float(duration_s),
        "requests": figures.requests,
        "ok": figures.ok,
        "errors": dict(sorted(figures.errors.items())),
        "dropped": figures.dropped,
        "unsent": figures.unsent,
        "out_of_range": figures.out_of_range,
        "sent": figures.sent + in_flight_at_end,
        "completed_in_window": figures.completed_in_window,
        "generator_bound": bool(generator.get("bound", False)),
        "generator": dict(generator),
        "latency_ms": figures.percentiles_ms("latency"),
        "service_ms": figures.percentiles_ms("service"),
        "lag_ms": figures.percentiles_ms("lag"),
    }
    if figures.scored:
        summary["accuracy"] = {"scored": figures.scored, "correct": figures.correct,
                               "top1": round(figures.correct / figures.scored, 6)}
        if figures.similarity_ppm:
            summary["accuracy"]["mean_cosine"] = round(figures.similarity_ppm / figures.scored / 1e6, 6)
    if figures.stream is not None:
        summary.update(stream_summary(figures, duration_s))
    if recorder.goodput is not None:
        summary["goodput"] = goodput_summary(figures, recorder.goodput.text, duration_s)
    if figures.by_model is not None:
        summary["by_model"] = {name: model_summary(entry, duration_s, recorder.goodput.text if recorder.goodput
                                                   else None) for name, entry in figures.by_model.items()}
    summary.update(extra or {})
    return summary


def model_summary(figures: HistogramSet, duration_s: float, goodput_terms: str | None = None) -> dict[str, Any]:
    """One mix entry's figures, each with the meaning of the run's own key of the same name (its requests
    only; dropped and unsent arrivals are the run's, not an entry's)."""
    summary: dict[str, Any] = {
        "requests": figures.requests,
        "ok": figures.ok,
        "errors": dict(sorted(figures.errors.items())),
        "sent": figures.sent,
        "completed_in_window": figures.completed_in_window,
        "achieved_rps": _rate(figures.completed_in_window, duration_s),
        "latency_ms": figures.percentiles_ms("latency"),
        "service_ms": figures.percentiles_ms("service"),
        "lag_ms": figures.percentiles_ms("lag"),
    }
    if figures.scored:
        summary["accuracy"] = {"scored": figures.scored, "correct": figures.correct,
                               "top1": round(figures.correct / figures.scored, 6)}
    if figures.stream is not None:
        summary.update(stream_summary(figures, duration_s))
    if goodput_terms is not None:
        summary["goodput"] = goodput_summary(figures, goodput_terms, duration_s)
    return summary


def stream_summary(figures: HistogramSet, duration_s: float) -> dict[str, Any]:
    """The token-level figures of a streamed run (protocol openai).

    ttft_ms (from the intended send, as latency_ms), ttft_service_ms (from the actual send), itl_ms
    (gaps between token chunks, pooled), tpot_ms (per response), each with latency_ms's keys, and each
    left out when the run measured none (non-streamed answers, embeddings, one-token answers: absent,
    not zero); output_tokens of every successful response, and output_tokens_per_s: the tokens of the
    responses that completed within the run window over its length (as achieved_rps counts them);
    cancelled: streams the client closed after their first token (counted apart from ok and errors).
    """
    stream = figures.stream
    assert stream is not None
    summary: dict[str, Any] = {
        f"{name}_ms": figures.percentiles_ms(name) for name in ("ttft", "ttft_service", "itl", "tpot")
        if getattr(stream, name).get_total_count()
    }
    summary.update(output_tokens=stream.output_tokens,
                   output_tokens_per_s=_rate(stream.output_tokens_in_window, duration_s),
                   cancelled=figures.cancelled)
    return summary


def goodput_summary(figures: HistogramSet, terms: str, duration_s: float) -> dict[str, Any]:
    """The goodput block (loadgen/goodput.py): the terms; good, the successful responses that met every
    term; judged, every response (ok or error); share = good / judged; goodput_rps, the good responses
    that completed within the run window over its length (as achieved_rps counts responses)."""
    judged = figures.requests
    return {
        "terms": terms,
        "good": figures.good,
        "judged": judged,
        "share": round(figures.good / judged, 6) if judged else 0.0,
        "goodput_rps": _rate(figures.good_in_window, duration_s),
    }


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """Write the summary as indented JSON (keys in the order built).

    >>> write_summary("runs/summary.json", summary)  # doctest: +SKIP
    """
    # built whole first (a value that cannot be written changes nothing); no URL's credentials in it
    text = redact_url(json.dumps(summary, indent=2) + "\n")
    write_text_atomic(path, text)


def _rate(count: int, duration_s: float) -> float:
    return round(count / duration_s, 3) if duration_s > 0 else 0.0
