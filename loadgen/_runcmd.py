"""What `loadgen run` does around a run: load the scenario, execute, write outputs.

Imported only by verbs that send load: importing locust monkey-patches the process with gevent.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import locust  # noqa: F401  (gevent monkey-patching must come before the other imports)

from loadgen.driver.console import WebOptions
from loadgen.driver.distributed import DistributedOptions
from loadgen.driver.master import open_cluster
from loadgen.driver.run import RunResult, execute
from loadgen.errors import ScenarioError, redact_url
from loadgen.protocols import spec_of
from loadgen.scenario import OpenLoop, Scenario, load_scenario
from loadgen.serverside import ServerMetrics, server_figures
from loadgen.sinks.hlog import write_hlog
from loadgen.sinks.summary import build_summary, write_summary
from loadgen.sinks.table import render_table
from loadgen.slo import Objective, judge, parse_slo

__all__ = ["WORKER_LOST_EXIT", "run_and_report", "write_outputs"]

WORKER_LOST_EXIT = 3
"""Exit code of a distributed run that --stop-on-worker-loss stopped."""


def _default_out(scenario: Scenario) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{scenario.target.model}"


def summarize(result: RunResult) -> dict[str, Any]:
    pattern, target = result.scenario.pattern, result.scenario.target
    extra = {
        **(result.metadata.get("to_summary") or {}),  # what the client says of its requests (openai)
        "pattern": type(pattern).__name__,
        "target": {"url": redact_url(target.url), "model": target.model, "batch_size": target.inferences_per_request},
        "interrupted": result.interrupted,
        "in_flight_at_end": result.in_flight_at_end,
        "warmup_requests": result.warmup_requests,
        "clock": {"start_monotonic_s": result.recorder.start_t, "start_epoch_s": result.start_epoch_s},
    }
    trace = result.scenario.trace
    if trace is not None:
        assert isinstance(pattern, OpenLoop)
        extra["trace"] = {**trace.describe(), "speedup": pattern.trace_speedup, "loop": pattern.trace_loop,
                          "sizes_sent": trace.sized and spec_of(target.protocol).sized}
    if result.metrics_port is not None:
        extra["metrics_port"] = result.metrics_port
    if result.rate_changes:
        extra["rate_changes"] = result.rate_changes
    if result.distributed is not None:
        extra["distributed"] = result.distributed
    summary = build_summary(
        result.recorder,
        offered_rps=result.offered_rps,
        duration_s=result.duration_s,
        generator=result.generator.as_json(),
        in_flight_at_end=result.in_flight_at_end,
        inferences_per_request=target.inferences_per_request,
        extra=extra,
    )
    mix = result.scenario.mix
    if mix and "by_model" in summary:  # each entry's model and weight first, then its figures
        summary["by_model"] = {name: {"model": entry.target.model, "weight": entry.weight,
                                      **summary["by_model"].get(name, {})}
                               for name, entry in zip(result.scenario.mix_names, mix, strict=True)}
    return summary


def write_outputs(result: RunResult, out_dir: Path, objectives: list[Objective] | None = None, *,
                  server: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json (with the SLO verdict when objectives are given, and the server-side figures
    when scraped) and latency.hlog in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    if server is not None:
        summary["server"] = server
    if objectives:
        summary["slo"] = judge(summary, objectives)
    write_summary(out_dir / "summary.json", summary)
    write_hlog(out_dir / "latency.hlog", result.recorder, result.start_epoch_s)
    return summary


def run_and_report(path: Path | None, overrides: dict[Any, Any], *, quiet: bool = False,
                   server_metrics: str | None = None, cost_per_hour: float | None = None,
                   distributed: DistributedOptions | None = None, web: tuple[int, str] | None = None) -> int:
    """Validate, run, write outputs, print the table. Returns the exit code.

    With `server_metrics` (the target's Prometheus URL) the server's own counters are scraped just
    before and after the run, outside it, and their difference is summary.json's `server`.
    With `distributed`, the run is sent by Locust workers (loadgen/driver/master.py); exit 3 when a
    lost worker stopped it (--stop-on-worker-loss). With `web` (port, host), the live console is served
    while the run lasts (loadgen/driver/console.py).
    """
    scenario = load_scenario(path, overrides)
    _check_server_flags(server_metrics, cost_per_hour)
    out_dir = Path(scenario.output.dir) if scenario.output.dir else _default_out(scenario)
    objectives = parse_slo(scenario.slo) if scenario.slo else None
    metrics = ServerMetrics(server_metrics, scenario.target.model) if server_metrics else None
    _say_trace(scenario)
    with open_cluster(distributed) if distributed else nullcontext() as cluster:
        before = metrics.sample() if metrics else None
        result = execute(scenario, cluster, WebOptions(*web) if web is not None else None)
    server = server_figures(before, metrics.sample(), cost_per_hour) if metrics else None
    if metrics is not None and server is None:
        print(f"note: no server-side figures: {metrics.error}", file=sys.stderr)
    summary = write_outputs(result, out_dir, objectives, server=server)
    if not quiet:
        print(render_table(summary))
    note = " (interrupted: partial results)" if result.interrupted else ""
    print(f"results in {out_dir}/ (summary.json, latency.hlog){note}", file=sys.stderr)
    lost = (result.distributed or {}).get("lost", [])
    for record in lost:
        print(f"worker {record['worker']} (host {record['host']}, pid {record['pid']}) was lost "
              f"{record['lost_at_s']:.1f} s into the run; {record['then']}", file=sys.stderr)
    if lost and (result.distributed or {}).get("stopped_on_worker_loss"):
        return WORKER_LOST_EXIT
    if result.interrupted:
        return 130
    return 1 if objectives and not summary["slo"]["met"] else 0


def _say_trace(scenario: Scenario) -> None:
    """One line on the trace being replayed: its rows, span, speed-up, and what the protocol takes of it."""
    trace = scenario.trace
    if trace is None:
        return
    pattern = scenario.pattern
    assert isinstance(pattern, OpenLoop)
    sizes = ("each row's prompt and output tokens are sent" if spec_of(scenario.target.protocol).sized
             else f"sizes mean nothing to {scenario.target.protocol}: only the instants are replayed") \
        if trace.sized else "the trace gives no sizes"
    loop = f", looped for {pattern.total_duration:g} s" if pattern.trace_loop else ""
    print(f"trace: {trace.path} ({trace.format}): {len(trace)} rows over {trace.span_s:g} s, replayed "
          f"x{pattern.trace_speedup:g}{loop}; {sizes}", file=sys.stderr)
    if trace.sorted_rows:
        print(f"warning: {trace.sorted_rows} rows of {trace.path} were out of time order and were sorted "
              "(--trace-strict refuses such a trace)", file=sys.stderr)


def _check_server_flags(server_metrics: str | None, cost_per_hour: float | None) -> None:
    problems = []
    if server_metrics is not None and not server_metrics.startswith(("http://", "https://")):
        problems.append(f"--server-metrics must be an http(s) URL, got {server_metrics!r}")
    if cost_per_hour is not None and (cost_per_hour <= 0 or server_metrics is None):
        problems.append("--cost-per-hour must be > 0 and needs --server-metrics")
    if problems:
        raise ScenarioError(problems, "flags")
