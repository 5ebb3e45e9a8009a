"""What the live console shows and steers, apart from how it is served (loadgen/driver/console.py): its
book of runs, the run going (or the latest), that run's figures and health, and the sweep it belongs to.

- `attach(ctx, stop)` shows a run's LoadContext; `stop` ends it (the page's stop, a quit, SIGINT).
- `live()` is /loadgen/live's answer: the console's state (waiting, starting, running, stopping,
  finished, failed), the start form's defaults and the run's figures, read by a RunCollector
  (loadgen/sinks/prometheus.py) from the same closed intervals as the /metrics gauges.
- With a SweepBoard (`loadgen sweep --web-port`) each step of the sweep is a run of the console, and a stop
  ends the whole sweep (`halt()`; `halted` tells the sweep to start no further step).
- A distributed run (`loadgen run --processes N --web-port P`, or --master) is shown by the master: its
  run (loadgen/driver/master.py) is a RunView of the merged recorder like a LoadContext, `live()` adds each
  worker's health (`workers`: the /metrics loadgen_worker_* gauges' values) and its generator check is the
  one summary.json's will be (combined from the workers'); its rate is not changed from the console.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Any, Protocol

import gevent
from gevent.event import Event

from loadgen.driver.context import LoadContext
from loadgen.driver.runbook import FinishedRun, RunBook
from loadgen.driver.selfcheck import SelfCheck
from loadgen.driver.sweepboard import SweepBoard
from loadgen.scenario import OpenLoop, Scenario
from loadgen.sinks.prometheus import RunCollector

__all__ = ["ConsoleState", "DistributedView"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class DistributedView(Protocol):
    """What the console reads of a distributed run (the master's, loadgen/driver/master.py), besides what a
    LoadContext has too (a RunView; scenario, pattern, start_t, stopping, done, rate_changes, share,
    change_rate): the generator's check so far, given the master's CPU share."""

    def generator_so_far(self, master_cpu: float) -> SelfCheck: ...


class _Run:
    """The run being sent (or the latest sent): its number, context, stop event and figures."""

    def __init__(self, number: int, ctx: LoadContext | DistributedView | Any, stop: Event) -> None:
        self.number = number
        self.ctx = ctx
        self.stop = stop
        self.collector = RunCollector(ctx, pause=gevent.idle)
        self.cpu0 = (time.monotonic(), _cpu_seconds())


class ConsoleState:
    """The runs of a console (`runs`, from `scenario`, the command line's, until one is booked), the one shown,
    and the sweep they are the steps of (`sweep`; None: runs of `loadgen run`)."""

    def __init__(self, autoquit_s: float | None, scenario: Scenario, sweep: SweepBoard | None = None) -> None:
        self.runs = RunBook(autoquit_s)
        self.runs.scenario = scenario
        self.sweep = sweep
        self._run: _Run | None = None

    def attach(self, ctx: LoadContext | DistributedView | Any, stop: Event) -> None:
        """Show the run of `ctx` (the one booked last: a LoadContext, or a distributed run's master); `stop` ends
        it (the page's stop, a quit)."""
        self._run = _Run(self.runs.number, ctx, stop)
        if self.halted:
            stop.set()  # a quit (or a sweep's stop) came while the run was being prepared

    def finished(self, run: FinishedRun) -> None:
        """The run has ended and its outputs are written: its downloads are served from now on."""
        self.runs.finish(run)

    def quit(self) -> None:
        """Stop the run going, if any, and let the command end (as the page's quit does)."""
        self.runs.quit()
        if self.runs.busy and self.current() is not None:
            self.current().stop.set()

    def halt(self) -> int | None:
        """The page's stop: end the run going (as SIGINT does) and, under a sweep, the sweep (what was measured
        is written; no further step). Returns the run stopped, None when there was nothing to stop."""
        sweep = self.sweep
        if sweep is not None and not sweep.ended:
            sweep.request_stop()
        run = self.going()
        if run is not None:
            run.stop.set()
            return run.number
        return None if sweep is None or sweep.ended else self.runs.number

    @property
    def halted(self) -> bool:
        """A quit, or a sweep's stop, has come: no further run or step starts."""
        return self.runs.quitting or (self.sweep is not None and self.sweep.stop_requested)

    def current(self) -> _Run | None:
        """The attached run when it is the latest booked (not an earlier one)."""
        run = self._run
        return run if run is not None and run.number == self.runs.number else None

    def going(self) -> _Run | None:
        return self.current() if self.runs.busy else None

    # -- figures -----------------------------------------------------------------------------------
    def live(self) -> dict[str, Any]:
        """What /loadgen/live answers: the console's state, the run's settings, figures and generator health."""
        book = self.runs
        found: dict[str, Any] = {"run": book.number, "finished": book.number in book.finished,
                                 "quitting": book.quitting, "form": _form_of(book.scenario),
                                 "sweep": self.sweep is not None}
        done = book.finished.get(book.number)
        if done is not None:
            found.update(exit_code=done.exit_code, out=str(done.out_dir))
        if book.number in book.failed:
            found["error"] = book.failed[book.number]
        run = self.current()
        if run is None:
            found.update(_settings(book.scenario, run=None))
            found["state"] = "waiting" if book.number == 0 else "failed" if book.number in book.failed \
                else "starting"
            return found
        found.update(_settings(run.ctx.scenario, run=run.ctx))
        figures = run.collector.live()
        ctx = run.ctx
        found["state"] = ("finished" if done is not None else "failed" if book.number in book.failed
                          else "starting" if figures is None
                          else "stopping" if ctx.stopping or ctx.done.is_set() else "running")
        # A sweep's step runs at its plan's load: changing it would measure something else.
        found["rate_changeable"] = found["rate_changeable"] and self.sweep is None and \
            found["state"] in ("starting", "running")
        if figures is None:
            return found
        found["t_s"] = done.summary.get("duration_s", 0.0) if done is not None else \
            max(0.0, time.monotonic() - ctx.start_t)
        found.update(figures)
        found["generator"] = done.summary["generator"] if done is not None else self._health(run, figures).as_json()
        workers = ctx.worker_health()
        if workers is not None:
            found["workers"] = [dataclasses.asdict(worker) for worker in workers]
        return found

    @staticmethod
    def _health(run: _Run, figures: dict[str, Any]) -> SelfCheck:
        """The generator's self-check so far, from the snapshot's figures (never from the recorder while it
        closes an interval): lag from the run's lag histogram, CPU since the run was attached."""
        ctx = run.ctx
        counts = figures["counts"]
        wall0, cpu0 = run.cpu0
        wall = time.monotonic() - wall0
        if ctx.worker_health() is not None:  # the master's: merged figures, the workers' own checks
            return ctx.generator_so_far((_cpu_seconds() - cpu0) / wall if wall > 0 else 0.0)
        lag = figures.get("lag_s", {}).get("run", {})
        is_open = isinstance(ctx.pattern, OpenLoop)
        return SelfCheck(
            lag_ms={key: round(value * 1000.0, 3) for key, value in lag.items()},
            dropped=counts["dropped"],
            unsent=counts["unsent"],
            handover_unsent=ctx.handover_unsent,
            cpu_fraction=(_cpu_seconds() - cpu0) / wall if wall > 0 else 0.0,
            peak_in_flight=ctx.peak_dispatched if ctx.dispatcher is not None else ctx.peak_in_flight,
            max_in_flight=ctx.pattern.max_in_flight if is_open else None,
            max_lag_ms=ctx.scenario.output.max_lag_ms,
            fd_note=ctx.fd_note,
        )


def _settings(scenario: Scenario | None, run: LoadContext | None) -> dict[str, Any]:
    """The run's settings /loadgen/live gives in every state (those of `scenario` before its run starts)."""
    if scenario is None:
        return {"t_s": 0.0, "duration_s": 0.0, "loop": None, "users": None, "model": None, "rate_changes": [],
                "rate_changeable": False}
    pattern = scenario.pattern
    is_open = isinstance(pattern, OpenLoop)
    return {
        "t_s": 0.0,
        "duration_s": pattern.total_duration,
        "loop": "open" if is_open else "closed",
        "users": None if is_open else pattern.users,
        "model": scenario.target.model,
        "rate_changes": list(run.rate_changes) if run is not None else [],
        "rate_changeable": run is not None and is_open and pattern.trace is None and run.share == (0, 1),
    }


def _form_of(scenario: Scenario | None) -> dict[str, Any]:
    """The start form's defaults: the load of `scenario` (the latest run's, or the command line's)."""
    if scenario is None:
        return {"loop": "open", "rate": None, "arrival": "constant", "users": None, "duration": None,
                "think_time": None, "seed": None, "max_in_flight": None}
    pattern = scenario.pattern
    duration = f"{pattern.total_duration:g}s"
    if isinstance(pattern, OpenLoop):
        return {"loop": "open", "rate": pattern.rate, "arrival": pattern.arrival, "users": None,
                "duration": duration, "think_time": None, "seed": pattern.seed,
                "max_in_flight": pattern.max_in_flight}
    return {"loop": "closed", "rate": None, "arrival": None, "users": pattern.users, "duration": duration,
            "think_time": f"{pattern.think_time:g}s", "seed": pattern.seed, "max_in_flight": None}
