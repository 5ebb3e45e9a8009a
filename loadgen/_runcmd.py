"""What `loadgen run` does around a run: load the scenario, execute, write outputs.

Imported only by verbs that send load: importing locust monkey-patches the process with gevent.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import locust  # noqa: F401  (gevent monkey-patching must come before the other imports)

from loadgen.driver.console import FormError, LiveConsole, Planner, WebOptions
from loadgen.driver.distributed import DistributedOptions
from loadgen.driver.master import open_cluster
from loadgen.driver.run import Cluster, RunResult, execute
from loadgen.driver.runbook import FinishedRun
from loadgen.errors import LoadgenError, ScenarioError, redact_url
from loadgen.protocols import spec_of
from loadgen.scenario import OpenLoop, Scenario, load_scenario
from loadgen.serverside import ServerMetrics, server_figures
from loadgen.sinks.hlog import write_hlog
from loadgen.sinks.summary import build_summary, write_summary
from loadgen.sinks.table import render_table
from loadgen.slo import Objective, judge, parse_slo
from loadgen.units import parse_duration

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
                   distributed: DistributedOptions | None = None, web: WebOptions | None = None) -> int:
    """Validate, run, write outputs, print the table. Returns the exit code.

    With `server_metrics` (the target's Prometheus URL) the server's own counters are scraped just
    before and after the run, outside it, and their difference is summary.json's `server`.
    With `distributed`, the run is sent by Locust workers (loadgen/driver/master.py); exit 3 when a
    lost worker stopped it (--stop-on-worker-loss). With `web`, the live console is served and outlives
    the run: each start from its page sends the scenario again with the form's load (_console_runs).
    """
    scenario = load_scenario(path, overrides)
    _check_server_flags(server_metrics, cost_per_hour)
    out_dir = Path(scenario.output.dir) if scenario.output.dir else _default_out(scenario)
    outputs = _Outputs(quiet=quiet, objectives=parse_slo(scenario.slo) if scenario.slo else None,
                       metrics=ServerMetrics(server_metrics, scenario.target.model) if server_metrics else None,
                       cost_per_hour=cost_per_hour)
    _say_trace(scenario)
    with open_cluster(distributed) if distributed else nullcontext() as cluster:
        if web is not None:
            console = LiveConsole(web, _planner(path, overrides, scenario), scenario)
            return _console_runs(console, scenario, out_dir, outputs, cluster)
        code, _ = _run_once(scenario, out_dir, outputs, cluster=cluster)
    return code


@dataclass(frozen=True)
class _Outputs:
    """What each run of the command writes and prints besides its own measurement."""

    quiet: bool
    objectives: list[Objective] | None
    metrics: ServerMetrics | None
    cost_per_hour: float | None


def _run_once(scenario: Scenario, out_dir: Path, outputs: _Outputs, *, cluster: Cluster | None = None,
              console: LiveConsole | None = None) -> tuple[int, dict[str, Any]]:
    """One run: execute, write summary.json and latency.hlog in `out_dir`, print the table and where the
    results are. Returns the exit code and the summary."""
    metrics = outputs.metrics
    before = metrics.sample() if metrics else None
    result = execute(scenario, cluster, console)
    server = server_figures(before, metrics.sample(), outputs.cost_per_hour) if metrics else None
    if metrics is not None and server is None:
        print(f"note: no server-side figures: {metrics.error}", file=sys.stderr)
    summary = write_outputs(result, out_dir, outputs.objectives, server=server)
    if not outputs.quiet:
        print(render_table(summary), flush=True)
    note = " (interrupted: partial results)" if result.interrupted else ""
    print(f"results in {out_dir}/ (summary.json, latency.hlog){note}", file=sys.stderr, flush=True)
    lost = (result.distributed or {}).get("lost", [])
    for record in lost:
        print(f"worker {record['worker']} (host {record['host']}, pid {record['pid']}) was lost "
              f"{record['lost_at_s']:.1f} s into the run; {record['then']}", file=sys.stderr)
    if lost and (result.distributed or {}).get("stopped_on_worker_loss"):
        return WORKER_LOST_EXIT, summary
    if result.interrupted:
        return 130, summary
    return (1 if outputs.objectives and not summary["slo"]["met"] else 0), summary


def _console_runs(console: LiveConsole, scenario: Scenario, out_dir: Path, outputs: _Outputs,
                  cluster: Cluster | None = None) -> int:
    """The runs of a live console: the command line's first (unless --web-wait), then one per start from
    the page, run N >= 2 written to OUT/run-N, until a quit; returns the last run's exit code (0: none ran).
    With `cluster`, each run is sent by its workers (connected before the console starts).

    The command line's run failing (an unreachable target, ...) ends the command as without a console
    (exit 2); a run started from the page that fails is said there and on stderr, and the console stays.
    """
    first = None if console.options.wait else (console.runs.book(scenario), scenario)  # before a page can ask
    console.start()
    code = 0
    try:
        console.announce()
        started = first if first is not None else console.next_start()
        while started is not None:
            number, planned = started
            from_page = number > 1 or console.options.wait
            code = _console_run(console, number, planned, out_dir / f"run-{number}" if number > 1 else out_dir,
                                outputs, from_page=from_page, cluster=cluster)
            started = console.next_start()
    finally:
        console.stop()
    return code


def _console_run(console: LiveConsole, number: int, scenario: Scenario, out_dir: Path, outputs: _Outputs, *,
                 from_page: bool, cluster: Cluster | None = None) -> int:
    """Run `number` of the console, its downloads served once written; its exit code."""
    try:
        code, summary = _run_once(scenario, out_dir, outputs, cluster=cluster, console=console)
    except LoadgenError as exc:
        if not from_page:
            raise
        print(f"error: run {number}: {redact_url(str(exc))}", file=sys.stderr, flush=True)
        console.runs.fail(number, redact_url(str(exc)))
        return exc.exit_code
    console.finished(FinishedRun(number, out_dir, code, summary))
    return code


_FORM_KEYS = {"rate": ("open_loop", "rate"), "users": ("closed_loop", "users"),
              "arrival": ("open_loop", "arrival"), "duration": ("open_loop", "duration"),
              "think_time": ("closed_loop", "think_time"), "seed": ("open_loop", "seed"),
              "max_in_flight": ("open_loop", "max_in_flight")}
"""The start form's fields and the scenario keys they set: those of --rate, --users, --arrival, --duration,
--think-time, --seed and --max-in-flight (loadgen/options.py)."""
_ARRIVALS = ("constant", "poisson", "gamma")
_SHARED_KEYS = ("duration", "seed")  # kept whichever loop the form picks (scenario.apply_overrides)


def _planner(path: Path | None, overrides: dict[Any, Any], scenario: Scenario) -> Planner:
    """The console's start form -> the scenario it runs: the command line's (file and flags, `scenario`) with the
    form's load over it; a form that switches the loop drops the command line's keys of the other loop."""
    closed = not isinstance(scenario.pattern, OpenLoop)

    def plan(form: Mapping[str, str]) -> Scenario:
        given = _form_values(form, closed_by_default=closed)
        dropped = "closed_loop" if "rate" in given else "open_loop" if "users" in given else None
        kept = {key: value for key, value in overrides.items()
                if not (_key(key)[0] == dropped and _key(key)[-1] not in _SHARED_KEYS)}
        return load_scenario(path, {**kept, **{_FORM_KEYS[name]: value for name, value in given.items()}})

    return plan


def _key(key: Any) -> tuple[str, ...]:
    return tuple(key.split(".", 1)) if isinstance(key, str) else tuple(key)


def _form_values(form: Mapping[str, str], *, closed_by_default: bool) -> dict[str, Any]:
    """The start form's given fields as scenario values (empty ones: not given); FormError names a bad one.
    The run is a closed loop when the form gives users, an open one when it gives a rate, else the command
    line's (`closed_by_default`): think time is a closed loop's, the in-flight cap an open loop's."""
    unknown = sorted(set(form) - set(_FORM_KEYS))
    if unknown:
        raise FormError(unknown[0], f"not a field of the start form ({', '.join(_FORM_KEYS)})")
    text = {name: str(form[name]).strip() for name in _FORM_KEYS if str(form.get(name) or "").strip()}
    values: dict[str, Any] = {}
    if "rate" in text:
        values["rate"] = _positive(text["rate"], float, "rate", "a rate in requests per second")
    if "users" in text:
        if "rate" in text:
            raise FormError("users", "rate (open loop) and users (closed loop) exclude each other: give one")
        values["users"] = _positive(text["users"], int, "users", "a whole number of users")
    closed = "users" in text or ("rate" not in text and closed_by_default)
    loop = "a closed loop's (users)" if closed else "an open loop's (rate)"
    if "arrival" in text:
        if "users" in text:
            raise FormError("arrival", "the arrival process is an open loop's (rate), not a closed loop's (users)")
        if text["arrival"] not in _ARRIVALS:
            raise FormError("arrival", f"expected one of {', '.join(_ARRIVALS)}, got {text['arrival']!r}")
        values["arrival"] = text["arrival"]
    if "duration" in text:
        values["duration"] = _duration(text["duration"], "duration", positive=True)
    if "think_time" in text:
        if not closed:
            raise FormError("think_time", f"think time is a closed loop's (users); this run is {loop}")
        values["think_time"] = _duration(text["think_time"], "think_time", positive=False)
    if "max_in_flight" in text:
        if closed:
            raise FormError("max_in_flight", f"the in-flight cap is an open loop's (rate); this run is {loop}")
        values["max_in_flight"] = _positive(text["max_in_flight"], int, "max_in_flight",
                                            "a whole number of requests")
    if "seed" in text:
        try:
            values["seed"] = int(text["seed"])
        except ValueError:
            raise FormError("seed", f"expected a whole number >= 0, got {text['seed']!r}") from None
        if values["seed"] < 0:
            raise FormError("seed", f"expected a whole number >= 0, got {text['seed']!r}")
    return values


def _duration(text: str, name: str, *, positive: bool) -> str:
    """A form's duration (`positive`: > 0, else >= 0), kept as its text for the scenario to read."""
    try:
        seconds = parse_duration(text)
        if positive and seconds <= 0:
            raise ValueError("must be > 0")
        if seconds < 0:
            raise ValueError("must be >= 0")
    except ValueError as exc:
        raise FormError(name, f"{exc} (got {text!r})") from None
    return text


def _positive(text: str, kind: type, name: str, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise FormError(name, f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise FormError(name, f"expected {what} > 0, got {text!r}")
    return value


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
