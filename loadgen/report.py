"""`loadgen report DIR`: a self-contained HTML report with PNG plots of a finished run or sweep.

Place in the flow: the files a run or sweep wrote (summary.json + latency.hlog, or sweep.json +
curve.csv + steps/) -> **report** -> DIR/report.html and DIR/plots/*.png. Nothing is re-measured:
every figure comes from those files, so a report can be made later, elsewhere, and for a run or
sweep that was interrupted (its files hold what was measured; the report says it was cut short).

Plots (matplotlib, Agg backend, no display needed):
- run: latency over time (p50, p99, max per interval) and the HDR percentile spectrum (latency and
  service time against 1/(1-percentile) on a log axis, the usual HdrHistogram view);
- compare: the variants' table, accuracy against p99 latency and against throughput (the Pareto
  fronts joined), and against $ per million inferences when priced;
- sweep: latency against achieved throughput (p50, p99 per step: the throughput-under-load curve),
  achieved against offered load, the percentile spectrum of each step, latency over time across
  the steps, and the server's own figures per step when the sweep scraped them.
The PNGs are embedded in the HTML (base64), so the one file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "write_report"]

_SPECTRUM = (0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999)


class ReportError(ValueError):
    """The folder holds no run or sweep results."""


def write_report(folder: Path) -> Path:
    """Write folder/report.html (and folder/plots/*.png); returns the HTML's path."""
    import matplotlib

    matplotlib.use("Agg")
    if (folder / "compare.json").is_file():
        document = _load_json(folder / "compare.json")
        title = f"Comparison of {len(document.get('models', []))} model variants"
        sections = _compare_sections(folder, document)
    elif (folder / "sweep.json").is_file():
        document = _load_json(folder / "sweep.json")
        title = f"Sweep of {document.get('target', {}).get('model', '?')} at {document.get('target', {}).get('url', '?')}"
        sections = _sweep_sections(folder, document)
    elif (folder / "summary.json").is_file():
        document = _load_json(folder / "summary.json")
        title = f"Run on {document.get('target', {}).get('model', '?')} at {document.get('target', {}).get('url', '?')}"
        sections = _run_sections(folder, document)
    else:
        raise ReportError(f"{folder}: no compare.json, sweep.json or summary.json (is it a loadgen run, sweep or "
                          "compare folder?)")
    path = folder / "report.html"
    path.write_text(_page(title, document, sections), encoding="utf-8")
    return path


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read it: {exc}") from exc


# -- compare --------------------------------------------------------------------------------------

def _compare_sections(folder: Path, document: dict[str, Any]) -> list[str]:
    models = document.get("models", [])
    head = ["model", "status", "accuracy", "p50 ms", "p99 ms", "achieved/s", "saturation/s", "bytes", "J/inference",
            "$/M", "front: latency", "front: throughput", "error"]
    rows = [[m["model"], m["status"], m.get("accuracy"), (m.get("latency_ms") or {}).get("p50"),
             (m.get("latency_ms") or {}).get("p99"), m.get("achieved_rps"), m.get("saturation_rps"),
             m.get("model_bytes"), m.get("energy_j_per_inference"), m.get("cost_per_million"),
             m.get("pareto_latency"), m.get("pareto_throughput"), m.get("error")] for m in models]
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    header = "".join(f"<th>{html.escape(name)}</th>" for name in head)
    sections = [f"<h2>Variants</h2><table><tr>{header}</tr>{cells}</table>",
                _table("Notes", [("note", note) for note in document.get("notes", [])] or [("note", "none")])]
    scored = [m for m in models if m.get("status") == "ok" and m.get("accuracy") is not None]
    if not scored:
        return sections
    sections.append(_figure(folder, "accuracy-vs-p99", "Accuracy against p99 latency (Pareto front joined)",
                            lambda ax: _pareto_plot(ax, scored, lambda m: m["latency_ms"]["p99"], "pareto_latency",
                                                    "p99 latency (ms)", lower_is_better=True)))
    rate = "saturation_rps" if any(m.get("saturation_rps") is not None for m in scored) else "achieved_rps"
    with_rate = [m for m in scored if m.get(rate) is not None]
    if with_rate:
        sections.append(_figure(folder, "accuracy-vs-throughput", f"Accuracy against {rate.replace('_', ' ')}",
                                lambda ax: _pareto_plot(ax, with_rate, lambda m: m[rate], "pareto_throughput",
                                                        "throughput (req/s)", lower_is_better=False)))
    with_cost = [m for m in scored if m.get("cost_per_million") is not None]
    if with_cost:
        sections.append(_figure(folder, "accuracy-vs-cost", "Accuracy against $ per million inferences",
                                lambda ax: _pareto_plot(ax, with_cost, lambda m: m["cost_per_million"], None,
                                                        "$ per million inferences", lower_is_better=True)))
    return sections


def _pareto_plot(ax, models: list[dict[str, Any]], x_of: Callable[[dict[str, Any]], float], front: str | None,
                 xlabel: str, *, lower_is_better: bool) -> None:
    for model in models:
        on_front = bool(front and model.get(front))
        ax.plot(x_of(model), model["accuracy"], "o" if on_front else "x", color="C0" if on_front else "C7")
        ax.annotate(model["model"], (x_of(model), model["accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    if front:
        line = sorted((m for m in models if m.get(front)), key=x_of)
        ax.plot([x_of(m) for m in line], [m["accuracy"] for m in line], "-", color="C0", alpha=0.6)
    ax.set_xlabel(xlabel + (" (lower is better)" if lower_is_better else " (higher is better)"))
    ax.set_ylabel("accuracy (top-1)")


# -- run ------------------------------------------------------------------------------------------

def _run_sections(folder: Path, summary: dict[str, Any]) -> list[str]:
    sections = [_table("Summary", _run_rows(summary))]
    hlog = folder / "latency.hlog"
    if hlog.is_file():
        by_tag = _read(hlog)
        sections.append(_figure(folder, "latency-over-time", "Latency over time",
                                lambda ax: _over_time(ax, [by_tag.get(None, [])])))
        sections.append(_figure(folder, "percentile-spectrum", "Percentile spectrum",
                                lambda ax: _spectrum(ax, {"latency": _total(by_tag.get(None, [])),
                                                          "service": _total(by_tag.get("service", []))})))
    return sections


def _run_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(key, _fmt(summary.get(key))) for key in
            ("offered_rps", "sent_rps", "achieved_rps", "requests", "ok", "dropped", "generator_bound",
             "interrupted")]
    rows.append(("errors", _fmt(summary.get("errors") or {})))
    for figure in ("latency_ms", "service_ms", "lag_ms", "ttft_ms", "itl_ms", "tpot_ms"):
        if isinstance(summary.get(figure), dict):
            rows.append((figure, "  ".join(f"{k} {_fmt(v)}" for k, v in summary[figure].items())))
    if summary.get("goodput"):
        rows.append(("goodput", _fmt(summary["goodput"])))
    if summary.get("slo"):
        rows.append(("slo", "met" if summary["slo"].get("met") else "MISSED"))
    if summary.get("server"):
        rows.append(("server", _fmt(summary["server"])))
    return rows


# -- sweep ----------------------------------------------------------------------------------------

def _sweep_sections(folder: Path, sweep: dict[str, Any]) -> list[str]:
    steps = sorted(sweep.get("steps", []), key=lambda step: step["load"])
    verdict = [(key, _fmt(sweep.get(key))) for key in
               ("saturation_rps", "saturated", "max_rps_meeting_slo", "slo", "slo_met", "knee", "goodput", "plan",
                "interrupted") if key != "goodput" or key in sweep]
    verdict += [("note", note) for note in sweep.get("notes", [])]
    sections = [_table("Verdict", verdict), _steps_table(steps)]
    if not steps:
        return sections
    sections.append(_figure(folder, "latency-vs-throughput", "Latency against achieved throughput",
                            lambda ax: _curve(ax, steps)))
    sections.append(_figure(folder, "achieved-vs-offered", "Achieved against offered load",
                            lambda ax: _achieved(ax, steps)))
    logs = {step["step"]: _read(folder / step["dir"] / "latency.hlog") for step in steps
            if (folder / step.get("dir", "-") / "latency.hlog").is_file()}
    if logs:
        ordered = sorted(steps, key=lambda step: step["step"])
        sections.append(_figure(folder, "percentile-spectrum", "Percentile spectrum per step",
                                lambda ax: _spectrum(ax, {_load_label(step): _total(logs[step["step"]].get(None, []))
                                                          for step in steps if step["step"] in logs})))
        sections.append(_figure(folder, "latency-over-time", "Latency over time (steps in the order run)",
                                lambda ax: _over_time(ax, [logs[s["step"]].get(None, []) for s in ordered
                                                           if s["step"] in logs])))
    if any(step.get("server") for step in steps):
        sections.append(_figure(folder, "server-side", "Server-side figures per step",
                                lambda ax: _server(ax, steps)))
    return sections


def _steps_table(steps: list[dict[str, Any]]) -> str:
    head = ["step", "load", "offered/s", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "stable",
            "generator-bound", "SLO", "server batch", "server queue ms"]
    body = []
    for step in steps:
        lat, server = step.get("latency_ms", {}), step.get("server") or {}
        body.append([step["step"], step["load"], step["offered_rps"], step["achieved_rps"], lat.get("p50"),
                     lat.get("p99"), lat.get("p99_9"), step.get("errors"), step.get("stable"),
                     step.get("generator_bound"), step.get("slo_met"), server.get("mean_batch_size"),
                     server.get("queue_ms_per_request")])
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(cell))}</td>" for cell in row) + "</tr>" for row in body)
    header = "".join(f"<th>{html.escape(name)}</th>" for name in head)
    return f"<h2>Steps</h2><table><tr>{header}</tr>{cells}</table>"


def _load_label(step: dict[str, Any]) -> str:
    return f"step {step['step']}: {step['achieved_rps']:.0f} req/s"


# -- plots ----------------------------------------------------------------------------------------

def _curve(ax, steps: list[dict[str, Any]]) -> None:
    achieved = [step["achieved_rps"] for step in steps]
    for key, style in (("p50", "o-"), ("p99", "s-"), ("p99_9", "^--")):
        ax.plot(achieved, [step["latency_ms"][key] for step in steps], style, label=key.replace("_", "."))
    bound = [step for step in steps if step.get("generator_bound")]
    if bound:
        ax.plot([s["achieved_rps"] for s in bound], [s["latency_ms"]["p99"] for s in bound], "rx", markersize=12,
                label="generator-bound")
    ax.set_xlabel("achieved throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()


def _achieved(ax, steps: list[dict[str, Any]]) -> None:
    offered = [step["offered_rps"] or step["achieved_rps"] for step in steps]
    ax.plot(offered, [step["achieved_rps"] for step in steps], "o-", label="achieved")
    top = max(offered + [step["achieved_rps"] for step in steps])
    ax.plot([0, top], [0, top], ":", color="grey", label="achieved = offered")
    ax.set_xlabel("offered load (req/s; closed loop: what the users sent)")
    ax.set_ylabel("achieved throughput (req/s)")
    ax.legend()


def _spectrum(ax, histograms: dict[str, Any]) -> None:
    for label, hist in histograms.items():
        if hist is None or hist.get_total_count() == 0:
            continue
        xs = [1 / (1 - p / 100) for p in _SPECTRUM]
        ax.plot(xs, [hist.get_value_at_percentile(p) / 1000 for p in _SPECTRUM], "o-", label=label, markersize=3)
    ax.set_xscale("log")
    ticks = [1 / (1 - p / 100) for p in (0.0, 90.0, 99.0, 99.9, 99.99, 99.999)]
    ax.set_xticks(ticks, ["0", "90", "99", "99.9", "99.99", "99.999"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize="small")


def _over_time(ax, segments: list[list[Any]]) -> None:
    offset = 0.0
    xs, p50, p99, top = [], [], [], []
    for intervals in segments:
        if not intervals:
            continue
        first = intervals[0].get_start_time_stamp()
        for hist in intervals:
            if hist.get_total_count() == 0:
                continue
            xs.append(offset + (hist.get_start_time_stamp() - first) / 1000)
            p50.append(hist.get_value_at_percentile(50) / 1000)
            p99.append(hist.get_value_at_percentile(99) / 1000)
            top.append(hist.get_max_value() / 1000)
        offset += (intervals[-1].get_end_time_stamp() - first) / 1000
    ax.plot(xs, p50, label="p50")
    ax.plot(xs, p99, label="p99")
    ax.plot(xs, top, ":", label="max")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()


def _server(ax, steps: list[dict[str, Any]]) -> None:
    achieved = [step["achieved_rps"] for step in steps]
    servers = [step.get("server") or {} for step in steps]
    for key, label in (("queue_ms_per_request", "queue ms / request"),
                       ("compute_ms_per_request", "compute ms / request")):
        ax.plot(achieved, [server.get(key) or 0 for server in servers], "o-", label=label)
    ax.set_xlabel("achieved throughput (req/s)")
    ax.set_ylabel("ms")
    twin = ax.twinx()
    twin.plot(achieved, [server.get("mean_batch_size") or 0 for server in servers], "k^--", label="batch size")
    twin.set_ylabel("mean batch size")
    ax.legend(loc="upper left")
    twin.legend(loc="upper right")


# -- helpers --------------------------------------------------------------------------------------

def _read(path: Path) -> dict[str | None, list[Any]]:
    from loadgen.sinks.hlog import read_hlog

    try:
        return read_hlog(path)
    except Exception:  # noqa: BLE001 - a damaged log drops its plots, never the report
        return {}


def _total(intervals: list[Any]) -> Any:
    if not intervals:
        return None
    from loadgen.recorder import new_histogram

    total = new_histogram()
    for hist in intervals:
        total.add(hist)
    return total


def _figure(folder: Path, name: str, title: str, draw: Callable[[Any], None]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        draw(ax)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        plots = folder / "plots"
        plots.mkdir(exist_ok=True)
        path = plots / f"{name}.png"
        fig.savefig(path)
    finally:
        plt.close(fig)
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">'


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<h2>{html.escape(title)}</h2><table>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none"
    return str(value)


def _page(title: str, document: dict[str, Any], sections: list[str]) -> str:
    warning = ""
    if document.get("interrupted"):
        warning = '<p class="warn">Interrupted: these are the results measured before it was stopped.</p>'
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;font-size:90%}img{max-width:100%}.warn{color:#b00;font-weight:bold}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{warning}"
            + "".join(sections) + "</body></html>\n")
