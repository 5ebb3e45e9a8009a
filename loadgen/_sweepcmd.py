"""What `loadgen sweep` does: run the scenario at each load a plan picks, then write the curve and verdict.

Place in the flow: scenario -> plan (loadgen.sweep.plan) -> one `execute()` per step, one after
another in this process -> step figures (loadgen.sweep.step) -> verdict (loadgen.sweep.verdict) ->
DIR/sweep.json, DIR/curve.csv and DIR/steps/NN-<load>/{summary.json,latency.hlog}.

Imported only by the sweep verb: importing locust monkey-patches the process with gevent.

Live figures (--metrics-port): the sweep holds the port from its first step to its end (a
MetricsListener, loadgen/driver/exporter.py) and serves a SweepCollector (loadgen/sinks/prometheus.py)
on it: the step running now, each completed step's throughput, percentiles and error ratio, and the
verdict of the steps so far. Each step's run joins the same port with its own live families while it
runs. After the last step, once the files are written, the port stays open until one more scrape (at
most LINGER_S) when something has been scraping, so the final verdict reaches that Prometheus; not
after an interrupted sweep.

Live console (--web-port): the console of `loadgen run --web-port` (loadgen/driver/console.py) is up from
the first step to the end and after it (until its quit, Ctrl-C or --web-autoquit): each probe run and
each step is one of its runs, shown live as it goes, and its SweepBoard (loadgen/driver/sweepboard.py) is
told what the SweepCollector is told, with the same StepResults and verdicts that sweep.json is written
from. Its stop ends the sweep as Ctrl-C does (the step going is interrupted, what was measured is
written, no further step starts); once sweep.json and curve.csv are written they are its downloads.

Distributed (--processes / --master): one Cluster of Locust workers serves every step in turn, each
step's figures merged on the master (loadgen/driver/master.py); a step where any worker was
generator-bound, or lost, is marked generator-bound.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import gevent
import locust  # noqa: F401  (gevent monkey-patching must come before the other imports)

from loadgen._runcmd import WORKER_LOST_EXIT, write_outputs
from loadgen.driver.console import LiveConsole, WebOptions
from loadgen.driver.distributed import DistributedOptions
from loadgen.driver.exporter import MetricsListener
from loadgen.driver.master import Cluster, open_cluster
from loadgen.driver.run import RunResult, execute
from loadgen.driver.runbook import FinishedRun
from loadgen.driver.sweepboard import SweepBoard
from loadgen.errors import LoadgenError, ScenarioError, redact_url
from loadgen.files import atomic_writer, write_text_atomic
from loadgen.scenario import ClosedLoop, OpenLoop, Scenario, load_scenario, read_scenario_file
from loadgen.serverside import ServerMetrics, server_figures
from loadgen.sinks.prometheus import SweepCollector
from loadgen.slo import Objective, parse_slo
from loadgen.sweep.plan import (
    Plan,
    adaptive,
    adaptive_bound,
    adaptive_users,
    adaptive_users_bound,
    geometric,
    ladder,
    linear,
)
from loadgen.sweep.step import (
    StepResult,
    measured_generator,
    measured_recorder,
    stability,
    step_result,
    windows_of,
)
from loadgen.sweep.verdict import verdict

__all__ = ["LINGER_S", "Probe", "SweepSpec", "run_sweep", "step_pattern"]

LINGER_S = 15.0
"""Longest wait, after the last step, for one more scrape of the sweep's /metrics (Prometheus's default
scrape interval); only when something scraped it during the sweep."""

CURVE_COLUMNS = ("step", "offered_rps", "achieved_rps", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms",
                 "errors", "dropped", "generator_bound", "slo_met", "stable",
                 "goodput_rps", "goodput_share", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "tpot_p99_ms",
                 "output_tokens_per_s",
                 "server_queue_ms", "server_compute_ms", "server_batch_size", "gpu_utilization", "gpu_power_w",
                 "energy_j_per_inference", "usd_per_million_inferences")
_SERVER_COLUMNS = {"server_queue_ms": "queue_ms_per_request", "server_compute_ms": "compute_ms_per_request",
                   "server_batch_size": "mean_batch_size", "gpu_utilization": "gpu_utilization",
                   "gpu_power_w": "mean_power_w", "energy_j_per_inference": "energy_j_per_inference",
                   "usd_per_million_inferences": "usd_per_million_inferences"}


@dataclass(frozen=True)
class SweepSpec:
    """How the loads are chosen and how long each step runs (the sweep verb's flags)."""

    rates: tuple[float, ...] = ()
    users: tuple[int, ...] = ()
    users_range: tuple[int, int] | None = None
    """(lowest, highest) user count of an adaptive closed-loop search (--users 1..64)."""
    start: float | None = None
    max: float | None = None
    factor: float = 1.5
    increment: float | None = None
    fixed: bool = False
    step_duration_s: float = 10.0
    warmup_s: float = 2.0
    stable_within: float = 0.10
    tolerance: float = 0.05
    server_metrics: str | None = None
    """The target's Prometheus metrics URL (e.g. Triton's http://host:8002/metrics), scraped around each step."""
    cost_per_hour: float | None = None
    """Price of the server per hour, for $ per million inferences."""

    @property
    def given(self) -> bool:
        """Whether the flags name a plan (else the sweep probes the target and plans from that)."""
        return bool(self.rates or self.users or self.users_range or self.start is not None
                    or self.max is not None)

    def plan(self) -> tuple[Plan, int | None, str]:
        """(the plan, its step count or upper bound, a short description)."""
        if self.rates:
            return ladder(self.rates), len(self.rates), "rates " + ", ".join(f"{r:g}" for r in self.rates)
        if self.users:
            return ladder(self.users), len(self.users), "users " + ", ".join(str(u) for u in self.users)
        if self.users_range:
            low, high = self.users_range
            return (adaptive_users(low, high, self.factor, self.tolerance),
                    adaptive_users_bound(low, high, self.factor, self.tolerance),
                    f"adaptive users from {low} x{self.factor:g} up to {high}, bisect to the knee")
        start, stop = self.start, self.max
        if self.increment is not None:
            values = linear(start, stop, self.increment)
            return ladder(values), len(values), f"linear {start:g}..{stop:g} by {self.increment:g}"
        if self.fixed:
            values = geometric(start, stop, self.factor)
            return ladder(values), len(values), f"geometric {start:g}..{stop:g} x{self.factor:g}"
        bound = adaptive_bound(start, stop, self.factor, self.tolerance)
        return (adaptive(start, stop, self.factor, self.tolerance), bound,
                f"adaptive from {start:g} x{self.factor:g} up to {stop:g}, bisect to {self.tolerance:.0%}")

    def check(self) -> None:
        """Raise ScenarioError (exit 2) naming every problem with the sweep flags."""
        problems = []
        given = [bool(self.rates), bool(self.users) or self.users_range is not None,
                 self.start is not None or self.max is not None]
        if sum(given) > 1:
            problems.append("give one of --rates, --start/--max or --users (or none: the sweep probes the target)")
        elif self.users_range is not None and not 0 < self.users_range[0] <= self.users_range[1]:
            problems.append(f"--users {self.users_range[0]}..{self.users_range[1]}: need 0 < lowest <= highest")
        elif self.users_range is not None and (self.increment is not None or self.fixed):
            problems.append("--users LOW..HIGH is an adaptive search: --increment and --fixed do not apply")
        elif not any(given) and (self.increment is not None or self.fixed):
            problems.append("--increment and --fixed need --start/--max")
        elif given[2] and (self.start is None or self.max is None):
            problems.append("--start and --max go together")
        elif given[2] and not 0 < self.start <= self.max:
            problems.append("need 0 < --start <= --max")
        if any(r <= 0 for r in self.rates) or any(u <= 0 for u in self.users):
            problems.append("every rate and user count must be > 0")
        if self.factor <= 1:
            problems.append("--factor must be > 1, e.g. 1.5")
        if self.increment is not None and self.increment <= 0:
            problems.append("--increment must be > 0")
        if self.step_duration_s <= 0 or self.warmup_s < 0:
            problems.append("--step-duration must be > 0 and --warmup >= 0")
        if self.server_metrics is not None and not self.server_metrics.startswith(("http://", "https://")):
            problems.append(f"--server-metrics must be an http(s) URL, got {self.server_metrics!r}")
        if self.cost_per_hour is not None and (self.cost_per_hour <= 0 or self.server_metrics is None):
            problems.append("--cost-per-hour must be > 0 and needs --server-metrics")
        if problems:
            raise ScenarioError(problems, "sweep flags")


def _at_load(base: Scenario, load: float, run_s: float) -> Scenario:
    """The base scenario at one step's load, running warm-up + step duration."""
    if isinstance(base.pattern, OpenLoop):
        pattern = base.pattern.model_copy(update={"rate": load, "duration": run_s, "stages": []})
        return base.model_copy(update={"open_loop": pattern})
    pattern = base.pattern.model_copy(update={"users": int(load), "duration": run_s})
    return base.model_copy(update={"closed_loop": pattern})


def _step_dir(out: Path, index: int, load: float, closed: bool) -> Path:
    return out / "steps" / f"{index:02d}-{load:g}{'users' if closed else 'rps'}"


def _open_listener(base: Scenario, live: SweepCollector) -> tuple[Scenario, MetricsListener | None]:
    """With output.metrics_port, open the sweep's /metrics (serving `live`) and point the steps at it."""
    output = base.output
    if output.metrics_port is None:
        return base, None
    listener = MetricsListener(output.metrics_host, output.metrics_port, [live]).start()
    print(f"sweep metrics on {listener.url}", file=sys.stderr, flush=True)
    return base.model_copy(update={"output": output.model_copy(update={"metrics_port": listener.port})}), listener


def _run_step(base: Scenario, spec: SweepSpec, index: int, load: float, out: Path,
              objectives: list[Objective] | None,
              metrics: ServerMetrics | None = None,
              cluster: Cluster | None = None,
              console: LiveConsole | None = None) -> tuple[StepResult, RunResult]:
    """Run one step, cut its warm-up, write its own summary.json and latency.hlog.

    With `metrics`, the target's metrics are scraped just before and after the step (outside the
    run): the server figures cover the whole step, warm-up included, at the same load. With `console`,
    the step is one of its runs (_shown).
    """
    interval = base.output.interval
    warmup = math.ceil(spec.warmup_s / interval - 1e-9) * interval  # whole intervals only
    before = metrics.sample() if metrics else None
    result = _shown(_at_load(base, load, warmup + spec.step_duration_s), cluster, console)
    server = server_figures(before, metrics.sample(), spec.cost_per_hour) if metrics else None
    recorder = measured_recorder(result.recorder, warmup)
    measured = dataclasses.replace(
        result,
        recorder=recorder,
        generator=measured_generator(result.generator, recorder),
        duration_s=max(result.duration_s - warmup, 1e-9),
        start_epoch_s=result.start_epoch_s + warmup,
    )
    step_dir = _step_dir(out, index, load, not isinstance(base.pattern, OpenLoop))
    summary = write_outputs(measured, step_dir, objectives, server=server)
    _shown_written(console, step_dir, summary, result.interrupted)
    judged = stability(windows_of(measured.recorder), spec.stable_within)
    step = step_result(index, load, summary, judged, str(step_dir.relative_to(out)))
    step.server = server
    return step, result


def _shown(scenario: Scenario, cluster: Cluster | None, console: LiveConsole | None) -> RunResult:
    """execute(scenario), as the console's next run when there is a console (one it says has failed, when
    the target refuses it)."""
    if console is None:
        return execute(scenario, cluster)
    number = console.runs.book(scenario)
    try:
        return execute(scenario, cluster, console)
    except LoadgenError as exc:
        console.runs.fail(number, redact_url(str(exc)))
        raise


def _shown_written(console: LiveConsole | None, out_dir: Path, summary: dict[str, Any], interrupted: bool) -> None:
    """The console's run just sent has its files in `out_dir`: they are its downloads from now on."""
    if console is not None:
        missed = "slo" in summary and not summary["slo"]["met"]
        code = 130 if interrupted else 1 if missed else 0
        console.finished(FinishedRun(console.runs.number, out_dir, code, summary))


def _progress(step: StepResult, total: int | None, closed: bool) -> str:
    of = f"/{total}" if total else ""
    load = f"users {step.load:g}" if closed else f"offered {step.offered_rps:8.1f} req/s"
    slo = {None: "", True: "  SLO met", False: "  SLO MISSED"}[step.slo_met]
    flags = ("  stable" if step.stable else "  unstable") + ("  GENERATOR-BOUND" if step.generator_bound else "")
    server = ""
    if step.server:
        batch, queue = step.server.get("mean_batch_size"), step.server.get("queue_ms_per_request")
        server = "  server:" + (f" batch {batch:.1f}" if batch else "") + (f" queue {queue:.2f} ms" if queue else "")
        if step.server.get("gpu_utilization") is not None:
            server += f" gpu {100 * step.server['gpu_utilization']:.0f}%"
    good = "" if step.goodput is None else (f"  goodput {step.goodput_rps:8.1f} req/s "
                                             f"({100 * (step.goodput_share or 0.0):.1f} % good)")
    return (f"step {step.index}{of}  {load}  achieved {step.achieved_rps:8.1f} req/s  "
            f"p99 {step.latency_ms['p99']:9.3f} ms{good}{slo}{flags}{server}")


def _curve_row(step: StepResult) -> dict[str, Any]:
    lat = step.latency_ms
    return {"step": step.index, "offered_rps": round(step.offered_rps, 3),
            "achieved_rps": round(step.achieved_rps, 3), "p50_ms": lat["p50"], "p90_ms": lat["p90"],
            "p99_ms": lat["p99"], "p99_9_ms": lat["p99_9"], "errors": step.errors, "dropped": step.dropped,
            "generator_bound": step.generator_bound, "slo_met": "" if step.slo_met is None else step.slo_met,
            "stable": step.stable, **_llm_columns(step),
            **{column: _blank((step.server or {}).get(key)) for column, key in _SERVER_COLUMNS.items()}}


def _llm_columns(step: StepResult) -> dict[str, Any]:
    """goodput_rps and goodput_share (with --goodput) and the token figures of a streamed step; blank else."""
    llm = step.llm or {}
    ttft, itl, tpot = (llm.get(key) or {} for key in ("ttft_ms", "itl_ms", "tpot_ms"))
    return {"goodput_rps": _blank(step.goodput_rps), "goodput_share": _blank(step.goodput_share),
            "ttft_p50_ms": _blank(ttft.get("p50")), "ttft_p99_ms": _blank(ttft.get("p99")),
            "itl_p99_ms": _blank(itl.get("p99")), "tpot_p99_ms": _blank(tpot.get("p99")),
            "output_tokens_per_s": _blank(llm.get("output_tokens_per_s"))}


def _blank(value: Any) -> Any:
    return "" if value is None else value


def write_sweep(out: Path, steps: list[StepResult], judged: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """DIR/sweep.json (verdict, then the steps) and DIR/curve.csv (one row per step); returns sweep.json's
    contents."""
    out.mkdir(parents=True, exist_ok=True)
    document = {**judged, **meta, "steps": [step.as_json() for step in steps]}
    write_text_atomic(out / "sweep.json", json.dumps(document, indent=2) + "\n")
    with atomic_writer(out / "curve.csv", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(_curve_row(step) for step in sorted(steps, key=lambda s: s.load))
    return document


def _print_verdict(judged: dict[str, Any], has_slo: bool, closed: bool = False) -> None:
    sat = judged["saturation_rps"]
    bound = "" if judged["saturated"] else " (lower bound: not saturated)"
    print(f"saturation: {sat:.1f} req/s{bound}" if sat is not None else "saturation: unknown")
    if judged["knee"]:
        knee = judged["knee"]
        users = f"{knee['load']:g} users, " if closed else ""
        print(f"knee: {users}{knee['achieved_rps']:.1f} req/s (p99 {knee['p99_ms']} ms)")
    if has_slo:
        best = judged["max_rps_meeting_slo"]
        print(f"max rate meeting the SLO: {best:.1f} req/s" if best is not None else "no step met the SLO")
    if judged.get("goodput"):
        print(_goodput_verdict(judged["goodput"], closed))
    for note in judged["notes"]:
        print(f"note: {note}")


def _goodput_verdict(goodput: dict[str, Any], closed: bool) -> str:
    best, knee = goodput["best"], goodput["knee"]
    unit = "users" if closed else "req/s offered"
    text = (f"goodput: best {best['goodput_rps']:.1f} good req/s at step {best['step']} ({best['load']:g} {unit}, "
            f"{100 * best['share']:.1f} % good)" if best else "goodput: no healthy step")
    floor = f"{100 * goodput['share_floor']:.0f} %"
    if knee:
        text += f"; knee: {knee['load']:g} {unit}, the highest load that kept >= {floor} good"
    else:
        text += f"; no step kept >= {floor} good"
    return text


PROBE_S = 2.0
"""Length of each closed-loop probe run of a sweep without a plan."""
PROBE_MAX_USERS = 1024
PROBE_GROWTH = 1.1
"""The probe doubles its users while throughput still grows by at least this factor."""
PROBE_HEADROOM = 4.0
"""The planned search may go up to this many times the probe's capacity estimate (a closed loop can
underestimate an endpoint that needs more concurrency than the probe reached)."""
AUTO_MAX_USERS = 1024
"""Highest user count of the adaptive search of a closed-loop scenario swept without a plan."""


@dataclass
class Probe:
    """What a sweep without a plan measured before planning: closed-loop runs at 1, 2, 4, ... users."""

    steps: list[dict[str, Any]]
    service_time_ms: float | None
    """Mean latency with one user: the endpoint's service time, as seen from here."""
    capacity_rps: float | None
    """The highest throughput of a healthy probe step: the first capacity estimate."""

    def as_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "service_time_ms": self.service_time_ms, "capacity_estimate_rps":
                self.capacity_rps, "step_s": PROBE_S}


def _closed(base: Scenario, users: int, duration_s: float) -> Scenario:
    """`base` as a closed loop of `users` users without think time, for `duration_s`."""
    seed = base.pattern.seed
    return base.model_copy(update={"open_loop": None, "closed_loop": ClosedLoop(
        users=users, duration=duration_s, seed=seed)})


def probe(base: Scenario, out: Path, cluster: Cluster | None = None,
          console: LiveConsole | None = None) -> tuple[Probe, bool]:
    """Closed-loop runs at 1, 2, 4, ... users (PROBE_S each, no think time) until throughput stops
    growing by PROBE_GROWTH, a step fails or the generator is bound; returns the Probe and whether the
    sweep was interrupted meanwhile. Each probe run's files go to OUT/probe/NN-<users>users/. With
    `console`, each probe run is one of its runs (and its stop or quit interrupts the probe)."""
    steps: list[dict[str, Any]] = []
    users, best, service_ms = 1, None, None
    while users <= PROBE_MAX_USERS:
        if console is not None:
            if console.halted:
                return Probe(steps, service_ms, best), True
            console.sweep.begin_probe(users)
        result = _shown(_closed(base, users, PROBE_S), cluster, console)
        probe_dir = out / "probe" / f"{len(steps) + 1:02d}-{users}users"
        summary = write_outputs(result, probe_dir)
        _shown_written(console, probe_dir, summary, result.interrupted)
        errors = sum(summary.get("errors", {}).values())
        step = {"users": users, "achieved_rps": round(summary["achieved_rps"], 3),
                "mean_ms": summary["latency_ms"]["mean"], "p99_ms": summary["latency_ms"]["p99"],
                "errors": errors, "generator_bound": bool(summary["generator_bound"])}
        steps.append(step)
        print(f"probe: {users} users  achieved {step['achieved_rps']:8.1f} req/s  mean {step['mean_ms']:.3f} ms"
              + ("  GENERATOR-BOUND" if step["generator_bound"] else ""), flush=True)
        if result.interrupted:
            return Probe(steps, service_ms, best), True
        if errors or step["generator_bound"] or summary["requests"] == 0:
            break
        if users == 1:
            service_ms = step["mean_ms"]
        if best is not None and step["achieved_rps"] < PROBE_GROWTH * best:
            best = max(best, step["achieved_rps"])
            break
        best = max(best or 0.0, step["achieved_rps"])
        users *= 2
    return Probe(steps, service_ms, best), False


def _default_out(base: Scenario) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{base.target.model}-sweep"


def step_pattern(path: Path | None, spec: SweepSpec) -> dict[tuple[str, str], Any]:
    """The pattern keys that make a sweep's base scenario valid before any load is chosen: one user or
    1 req/s (each step sets its own), with the step's duration."""
    file_closed = path is not None and "closed_loop" in read_scenario_file(path)
    closed_plan = bool(spec.users or spec.users_range) or (not spec.given and file_closed)
    key = ("closed_loop", "users") if closed_plan else ("open_loop", "rate")
    return {key: 1, ("open_loop", "duration"): spec.step_duration_s}


def run_sweep(path: Path | None, overrides: dict[Any, Any], spec: SweepSpec, *,
              distributed: DistributedOptions | None = None, web: WebOptions | None = None) -> int:
    """Run the sweep, write its files, print a line per step and the verdict. Returns the exit code.

    Without a plan in `spec`, an open-loop scenario is probed first (`probe`) and searched adaptively
    from half the capacity estimate up to PROBE_HEADROOM times it; a closed-loop one is searched over
    1..AUTO_MAX_USERS users. With `web`, the live console shows the sweep (module docstring) and stays up
    after it until its quit, Ctrl-C or --web-autoquit; the exit code is the sweep's."""
    spec.check()
    base = load_scenario(path, {**overrides, **step_pattern(path, spec)})
    out = Path(base.output.dir) if base.output.dir else _default_out(base)
    closed = not isinstance(base.pattern, OpenLoop)
    if web is None:
        return _sweep(base, spec, out, closed, distributed)
    console = LiveConsole(web, None, base, SweepBoard(closed_loop=closed)).start()
    try:
        console.announce()
        code = _sweep(base, spec, out, closed, distributed, console)
        console.next_start()  # a sweep's console starts no run from its page: this waits for its quit
    finally:
        console.stop()
    return code


def _sweep(base: Scenario, spec: SweepSpec, out: Path, closed: bool, distributed: DistributedOptions | None,
           console: LiveConsole | None = None) -> int:
    """The sweep of run_sweep, shown in `console` when there is one; returns the exit code."""
    objectives = parse_slo(base.slo) if base.slo else None
    metrics = ServerMetrics(spec.server_metrics, base.target.model) if spec.server_metrics else None
    live = SweepCollector(closed_loop=closed, pause=gevent.idle)
    board = console.sweep if console is not None else None
    base, listener = _open_listener(base, live)
    steps: list[StepResult] = []
    interrupted = worker_lost = False
    found: Probe | None = None
    try:
        with open_cluster(distributed) if distributed else nullcontext() as cluster:
            if spec.given:
                plan, total, described = spec.plan()
            elif closed:
                plan, total, described = dataclasses.replace(spec, users_range=(1, AUTO_MAX_USERS)).plan()
            else:
                print(f"sweep: no plan given: probing {redact_url(base.target.url)} with a closed loop of 1, 2, 4, ... users",
                      flush=True)
                found, interrupted = probe(base, out, cluster, console)
                plan, total, described = _planned(found, spec)
            print(f"sweep: {described}; {spec.warmup_s:g} s warm-up + {spec.step_duration_s:g} s a step",
                  flush=True)
            if board is not None:
                board.planned(described, total)
            load = next(plan) if plan is not None and not interrupted else None
            while load is not None:
                if console is not None and console.halted:  # the page's stop (or quit) came between two steps
                    interrupted = True
                    break
                index = len(steps) + 1
                live.begin_step(index, load)
                if board is not None:
                    board.begin_step(index, load)
                step, raw = _run_step(base, spec, index, load, out, objectives, metrics, cluster, console)
                steps.append(step)
                so_far = verdict(steps, has_slo=objectives is not None, tolerance=spec.tolerance)
                live.end_step(step)
                live.judge(so_far)
                if board is not None:
                    board.end_step(step)
                    board.judge(so_far)
                print(_progress(step, total, closed), flush=True)
                if raw.interrupted:
                    interrupted = True
                    worker_lost = bool((raw.distributed or {}).get("stopped_on_worker_loss"))
                    break
                try:
                    load = plan.send(step)
                except StopIteration:
                    break
    except BaseException:
        if listener is not None:
            listener.stop()
        raise
    judged = verdict(steps, has_slo=objectives is not None, tolerance=spec.tolerance)
    if metrics is not None and metrics.error:
        judged["notes"].append(f"server-side figures incomplete: {metrics.error}")
    live.judge(judged, finished=True)
    meta = {"plan": described, "slo": base.slo, "goodput_terms": base.goodput, "warmup_s": spec.warmup_s,
            "step_duration_s": spec.step_duration_s, "interrupted": interrupted,
            "target": {"url": redact_url(base.target.url), "model": base.target.model},
            "server_metrics": spec.server_metrics, "cost_per_hour": spec.cost_per_hour}
    if found is not None:
        meta["probe"] = found.as_json()
    write_sweep(out, steps, judged, meta)
    code = WORKER_LOST_EXIT if worker_lost else 130 if interrupted else 0 if judged["slo_met"] else 1
    if board is not None:  # sweep.json holds `judged` itself: the console's verdict is the file's
        board.finish(judged, out, code, interrupted=interrupted)
    _print_verdict(judged, objectives is not None, closed)
    print(f"results in {out}/ (sweep.json, curve.csv, steps/)", file=sys.stderr, flush=True)
    if listener is not None:  # the files are written: now let the watching Prometheus see the verdict
        sys.stdout.flush()
        listener.stop(linger_s=0.0 if interrupted else LINGER_S)
    return code


def _planned(found: Probe, spec: SweepSpec) -> tuple[Plan | None, int | None, str]:
    """The adaptive open-loop search the probe suggests (None when it measured no capacity)."""
    if not found.capacity_rps:
        return None, 0, "none: the probe measured no throughput"
    start = round(found.capacity_rps / 2, 3)
    stop = round(found.capacity_rps * PROBE_HEADROOM, 3)
    chosen = dataclasses.replace(spec, start=start, max=stop)
    plan, total, described = chosen.plan()
    service = f"service time {found.service_time_ms:.3f} ms, " if found.service_time_ms else ""
    return plan, total, f"probe: {service}capacity estimate {found.capacity_rps:.1f} req/s; {described}"
