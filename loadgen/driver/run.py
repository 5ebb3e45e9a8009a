"""One run, headless, with Locust as a library: client -> Locust users -> recorder -> outputs.

`execute(scenario)` checks the target, starts the Locust runner with the user class of the
scenario's pattern, waits for the schedule (open loop) or the duration (closed loop) to end or for
SIGINT/SIGTERM, lets in-flight requests finish (bounded), and returns a RunResult holding the
recorder and the generator's self-check. Writing files is the caller's business (sinks).

`execute(scenario, console=LiveConsole(...))` sends the run under the live console (loadgen/driver/console.py:
Locust's web UI with loadgen's page, figures and controls, up across runs): the run takes the console's
Environment (fresh events, stats and runner) and shows its LoadContext there; the console's stop and quit
end it as SIGINT does.

`execute(scenario, cluster=...)` runs it distributed instead: a Cluster (loadgen/driver/master.py) of
Locust workers sends the load and the RunResult holds the master's merged recorder (with a console, the
master's run is the one shown: its merged figures and each worker's health).
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
from gevent.event import Event
from locust.env import Environment
from locust.event import Events

from loadgen.driver.console import LiveConsole
from loadgen.driver.context import BACKSTOP_S, LoadContext
from loadgen.driver.exporter import MetricsExporter
from loadgen.driver.mix import client_of
from loadgen.driver.selfcheck import SelfCheck
from loadgen.driver.users import ClosedLoopUser, OpenLoopUser
from loadgen.errors import LoadgenError, ScenarioError
from loadgen.lowlevel.fdlimit import beyond_hard_limit, ensure_fd_limit
from loadgen.lowlevel.keepawake import KeepAwake
from loadgen.patterns.schedule import profile_of
from loadgen.recorder import Recorder
from loadgen.scenario import ClosedLoop, OpenLoop, Scenario

__all__ = ["Cluster", "RunResult", "drain", "execute", "result_of", "self_check"]

_LEAD_S = 0.05  # the run starts this long after setup, so the dispatcher is waiting at t = 0


class _QuietSpawnWarning(logging.Filter):
    """A closed loop starts all its users at once on purpose: drop Locust's warning about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "spawn rate is very high" not in record.getMessage()


logging.getLogger("locust.runners").addFilter(_QuietSpawnWarning())
_INTERRUPT_DRAIN_S = 2.0


class Cluster(Protocol):
    """Workers that send a run for this process (loadgen/driver/master.py's Cluster is one)."""

    local_pids: list[int]
    """Workers started on this host (--processes); empty for remote ones."""

    def run(self, scenario: Scenario, console: LiveConsole | None = None) -> RunResult: ...


@dataclass
class RunResult:
    scenario: Scenario
    recorder: Recorder
    duration_s: float
    offered_rps: float
    generator: SelfCheck
    interrupted: bool = False
    in_flight_at_end: int = 0
    start_epoch_s: float = 0.0
    warmup_requests: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics_port: int | None = None
    """The port /metrics was served on during the run, when it was."""
    distributed: dict[str, Any] | None = None
    """A distributed run's workers (share, counts, own self-check) and the ones lost; None otherwise."""
    rate_changes: list[dict[str, float]] = field(default_factory=list)
    """The open-loop rate changes made during the run (the live console's): {"at_s", "rate"} each."""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def execute(scenario: Scenario, cluster: Cluster | None = None, console: LiveConsole | None = None) -> RunResult:
    """Run `scenario` (see _execute), with the generator's CPUs kept awake if the scenario asks; on
    `cluster`'s workers when one is given (local workers leave keeping the CPUs awake to this process,
    remote ones do it on their hosts). `console`: show and steer the run in the live console (a distributed
    run shows the master's merged figures and each worker's health there)."""
    if not scenario.output.keep_awake or (cluster is not None and not cluster.local_pids):
        return cluster.run(scenario, console) if cluster is not None else _execute(scenario, console)
    with KeepAwake(os.sched_getaffinity(0)):
        return cluster.run(scenario, console) if cluster is not None else _execute(scenario, console)


def _execute(scenario: Scenario, console: LiveConsole | None = None) -> RunResult:
    """Run `scenario` to its end (or SIGINT/SIGTERM, or the console's stop) and return what was measured.
    SIGINT/SIGTERM under a console also quit it (the run command ends once the outputs are written).

    Raises a TargetError (exit 2) before any load is sent when the target is not usable.
    """
    pattern = scenario.pattern
    is_open = isinstance(pattern, OpenLoop)
    fd_note = open_file_limits(pattern, pattern.users if not is_open else 0, lambda short: (
        f"closed_loop.users: {short}: give fewer users, or spread them over processes (--processes) or hosts"))
    if fd_note:
        print(f"warning: {fd_note}", file=sys.stderr, flush=True)
    client = client_of(scenario, seed=pattern.seed)
    metadata = client.prepare()

    user_class = OpenLoopUser if is_open else ClosedLoopUser
    environment = console.environment_for(user_class) if console is not None else \
        Environment(user_classes=[user_class], events=Events())
    ctx = LoadContext(scenario, client, environment)
    ctx.fd_note = fd_note
    environment.loadgen = ctx
    try:
        exporter = _start_exporter(ctx, scenario.output.metrics_port)
    except LoadgenError:
        client.close()
        raise
    runner = environment.create_local_runner()
    stop = Event()
    if console is not None:
        console.attach(ctx, stop)

    def on_signal() -> None:
        stop.set()
        if console is not None:
            console.quit()

    handlers = [gevent.signal_handler(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)]
    # Everything allocated so far lives for the whole run: keep the cyclic collector off it, so
    # that a full collection cannot pause the dispatcher for milliseconds mid-run.
    gc.collect()
    gc.freeze()
    if exporter is not None:
        exporter.announce()  # the last thing before the start (_LEAD_S ahead): tests time stalls from it
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    epoch0 = time.time() + _LEAD_S
    try:
        ctx.begin(time.monotonic() + _LEAD_S)
        if is_open:
            runner.start(1, spawn_rate=1)
        else:
            runner.start(pattern.users, spawn_rate=max(pattern.users, 1) * 1000)
        gevent.spawn(_end_at, ctx, stop)
        gevent.wait([stop, ctx.done], count=1)
        interrupted = stop.is_set() and time.monotonic() < ctx.end_t
        ctx.stopping = True
        if ctx.dispatcher is not None:
            ctx.dispatcher.stop()
        drain(ctx, _INTERRUPT_DRAIN_S if interrupted else scenario.target.timeout + 1.0)
        runner.quit()
        end_t = time.monotonic()
        ctx.finish(max(end_t, ctx.start_t))
    finally:
        for handler in handlers:
            handler.cancel()
        # What this run froze (its context, client, Locust runner) is collectable again once dropped: a
        # console's next run or a sweep's next step freezes its own instead of piling up every run's.
        gc.unfreeze()
        if exporter is not None:
            exporter.stop()
        client.close()
    cpu = (_cpu_seconds() - cpu0) / max(end_t - wall0, 1e-9)
    result = result_of(ctx, end_t, interrupted=interrupted, cpu=cpu, start_epoch_s=epoch0, metadata=metadata)
    result.metrics_port = exporter.port if exporter is not None else None
    return result


def open_file_limits(pattern: OpenLoop | ClosedLoop, users_here: int, why: Callable[[str], str],
                     source: str = "scenario") -> str:
    """Before a run: refuse a closed loop whose `users_here` connections (each user holds one throughout)
    the hard open-file limit cannot hold (ScenarioError with `why(short)`), then raise the soft limit for the
    connections this process may hold (max_in_flight, or the run's users); the note when it cannot ("")."""
    if isinstance(pattern, ClosedLoop) and (short := beyond_hard_limit(users_here)):
        raise ScenarioError([why(short)], source)
    return ensure_fd_limit(pattern.max_in_flight if isinstance(pattern, OpenLoop) else pattern.users)


def _start_exporter(ctx: LoadContext, port: int | None) -> MetricsExporter | None:
    """Serve /metrics for the run when a port is asked for (0: a free one); said just before the start."""
    if port is None:
        return None
    return MetricsExporter(ctx, port).start()


def result_of(
    ctx: LoadContext,
    end_t: float,
    *,
    interrupted: bool,
    cpu: float = 0.0,
    start_epoch_s: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> RunResult:
    """The RunResult of a finished context (the recorder's last interval closed)."""
    pattern = ctx.pattern
    duration = min(end_t, ctx.end_t) - ctx.start_t if interrupted else pattern.total_duration
    if start_epoch_s is None:
        start_epoch_s = time.time() - (time.monotonic() - ctx.start_t)
    return RunResult(
        scenario=ctx.scenario,
        recorder=ctx.recorder,
        duration_s=max(duration, 1e-9),
        offered_rps=_offered_rps(pattern, duration),
        generator=self_check(ctx, ctx.scenario, cpu),
        interrupted=interrupted,
        in_flight_at_end=ctx.in_flight,
        warmup_requests=ctx.client.warmup_requests,
        start_epoch_s=start_epoch_s,
        metadata=metadata or {},
        rate_changes=list(ctx.rate_changes),
    )


def _end_at(ctx: LoadContext, stop: Event) -> None:
    """Closed loop ends by the clock; open loop ends with its schedule (this is its backstop)."""
    stop.wait(max(0.0, ctx.end_t - time.monotonic()) + (BACKSTOP_S if ctx.dispatcher is not None else 0.0))
    ctx.done.set()


def drain(ctx: LoadContext, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while ctx.in_flight > 0 and time.monotonic() < deadline:
        gevent.sleep(0.005)
    return ctx.in_flight == 0


def _offered_rps(pattern: Any, duration: float) -> float:
    if not isinstance(pattern, OpenLoop) or duration <= 0:
        return 0.0
    return profile_of(pattern).count_by(duration) / duration


def self_check(ctx: LoadContext, scenario: Scenario, cpu: float) -> SelfCheck:
    """The generator's own health: could it keep its schedule? Every output carries this."""
    figures = ctx.recorder.cumulative
    dispatcher = ctx.dispatcher
    return SelfCheck(
        lag_ms=figures.percentiles_ms("lag"),
        dropped=figures.dropped,
        unsent=figures.unsent,
        handover_unsent=ctx.handover_unsent,
        cpu_fraction=cpu,
        peak_in_flight=ctx.peak_dispatched if dispatcher else ctx.peak_in_flight,
        max_in_flight=dispatcher.max_in_flight if dispatcher else None,
        max_lag_ms=scenario.output.max_lag_ms,
        fd_note=ctx.fd_note,
    )
