"""Render a run summary as a compact plain-text table for the terminal.

Place in the flow: Recorder -> summary -> **table** (printed at the end of `loadgen run`). Plain
text, so it reads the same in a CI log as in a terminal.

                    p50       p90       p99     p99.9       max      mean  (ms)
    latency       2.589     3.687     3.973     3.993     3.999     2.552
    service       2.539     3.637     3.923     3.943     3.949     2.502
    lag           0.050     0.050     0.050     0.050     0.050     0.050
    rate     offered 500.0/s   sent 500.0/s   achieved 500.0/s
    count    1000 requests, 980 ok, 20 errors (http_503 20), 1 dropped, 0 unsent
    GENERATOR-BOUND: lag p99 2.1 ms > 1 ms (these figures describe the generator, not the endpoint)

A streamed run (protocol openai) adds rows ttft, itl and tpot after lag (those it measured), a tokens
line with the output tokens per second, and the streams cancelled by the client in the count line (see
loadgen/sinks/summary.py).
With --goodput a goodput line follows the rates:

    goodput  480.0/s   96.0 % good (960 of 1000 responses met ttft<200ms,tpot<50ms)

A mix ([[mix]]) adds a line per entry after the counts: its requests, achieved rate and latency p50/p99:

    model    llama-8b       750 requests   374.6/s   p50 2.581   p99 3.969 ms   0 errors
"""

from __future__ import annotations

from typing import Any

ROWS = ("latency", "service", "lag")
STREAM_ROWS = ("ttft", "itl", "tpot")
"""Rows added when the summary has them (streamed runs)."""
COLUMNS = {"p50": "p50", "p90": "p90", "p99": "p99", "p99_9": "p99.9", "max": "max", "mean": "mean"}
"""Summary key -> column heading."""
_LABEL_WIDTH = 9
_CELL_WIDTH = 10


def render_table(summary: dict[str, Any]) -> str:
    """The percentile table, then rate, count and generator-health lines.

    >>> print(render_table(summary))  # doctest: +SKIP
    """
    lines = [_header(), *(_row(name, summary.get(f"{name}_ms", {})) for name in ROWS)]
    lines += [_row(name, summary[f"{name}_ms"]) for name in STREAM_ROWS if f"{name}_ms" in summary]
    lines.append(_rates_line(summary))
    if "output_tokens_per_s" in summary:
        lines.append(_tokens_line(summary))
    if "goodput" in summary:
        lines.append(_goodput_line(summary["goodput"]))
    lines.append(_counts_line(summary))
    lines += [_model_line(name, figures, summary["by_model"]) for name, figures in summary.get("by_model", {}).items()]
    if "accuracy" in summary:
        accuracy = summary["accuracy"]
        lines.append(f"{'accuracy':<{_LABEL_WIDTH}}top-1 {accuracy['top1']:.4f}   {accuracy['correct']} of "
                     f"{accuracy['scored']} answers scored against the labels")
    if summary.get("generator_bound") or summary.get("unsent"):
        lines.append(_bound_line(summary.get("generator", {}), summary.get("unsent", 0)))
    if "slo" in summary:
        lines.extend(_slo_lines(summary["slo"]))
    return "\n".join(lines)


def _slo_lines(verdict: dict[str, Any]) -> list[str]:
    lines = [f"{'slo':<{_LABEL_WIDTH}}{'MET' if verdict['met'] else 'FAILED'}"]
    for check in verdict["checks"]:
        mark = "ok  " if check["met"] else "MISS"
        detail = check["reason"] or f"measured {check['measured']:g}"
        lines.append(f"{'':<{_LABEL_WIDTH}}{mark} {check['name']}: {detail}")
    return lines


def _header() -> str:
    cells = "".join(f"{heading:>{_CELL_WIDTH}}" for heading in COLUMNS.values())
    return f"{'':<{_LABEL_WIDTH}}{cells}  (ms)"


def _row(name: str, figures: dict[str, float]) -> str:
    cells = "".join(f"{figures.get(key, 0.0):>{_CELL_WIDTH}.3f}" for key in COLUMNS)
    return f"{name:<{_LABEL_WIDTH}}{cells}"


def _rates_line(summary: dict[str, Any]) -> str:
    rates = (f"{kind} {summary.get(f'{kind}_rps', 0.0):.1f}/s" for kind in ("offered", "sent", "achieved"))
    return f"{'rate':<{_LABEL_WIDTH}}" + "   ".join(rates)


def _tokens_line(summary: dict[str, Any]) -> str:
    return (f"{'tokens':<{_LABEL_WIDTH}}output {summary['output_tokens_per_s']:.1f}/s   "
            f"{summary.get('output_tokens', 0)} output tokens")


def _goodput_line(goodput: dict[str, Any]) -> str:
    return (f"{'goodput':<{_LABEL_WIDTH}}{goodput['goodput_rps']:.1f}/s   {100 * goodput['share']:.1f} % good "
            f"({goodput['good']} of {goodput['judged']} responses met {goodput['terms']})")


def _model_line(name: str, figures: dict[str, Any], by_model: dict[str, Any]) -> str:
    width = max(len(other) for other in by_model)
    latency = figures.get("latency_ms", {})
    errors = sum(figures.get("errors", {}).values())
    return (f"{'model':<{_LABEL_WIDTH}}{name:<{width}}  {figures.get('requests', 0):>8} requests  "
            f"{figures.get('achieved_rps', 0.0):>8.1f}/s   p50 {latency.get('p50', 0.0):.3f}   "
            f"p99 {latency.get('p99', 0.0):.3f} ms   {errors} errors")


def _counts_line(summary: dict[str, Any]) -> str:
    errors: dict[str, int] = summary.get("errors", {})
    parts = [f"{summary.get('requests', 0)} requests", f"{summary.get('ok', 0)} ok"]
    error_count = sum(errors.values())
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items()))
    parts.append(f"{error_count} errors ({kinds})" if kinds else "0 errors")
    if summary.get("cancelled"):
        parts.append(f"{summary['cancelled']} cancelled")
    parts.append(f"{summary.get('dropped', 0)} dropped")
    parts.append(f"{summary.get('unsent', 0)} unsent")
    if summary.get("out_of_range"):
        parts.append(f"{summary['out_of_range']} values out of histogram range (clamped)")
    return f"{'count':<{_LABEL_WIDTH}}" + ", ".join(parts)


def _bound_line(generator: dict[str, Any], unsent: int = 0) -> str:
    """The generator-bound warning; arrivals never sent are always named in it."""
    reasons = generator.get("reasons") or []
    if isinstance(reasons, str):
        reasons = [reasons]
    reasons = [str(reason) for reason in reasons]
    if unsent and not any("never sent" in reason for reason in reasons):
        reasons.append(f"{unsent} scheduled arrivals never sent")
    reasons = "; ".join(reasons) or "no reason given"
    return f"GENERATOR-BOUND: {reasons} (these figures describe the generator, not the endpoint)"
