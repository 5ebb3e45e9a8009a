"""Scale-out: the highest healthy open-loop rate of `loadgen run --processes 1` against `--processes 2`.

Place in the flow: the Driver stage of DESIGN.md spread over Locust workers (loadgen/driver/master.py):
each worker sends its share of one schedule and ships its histograms to the master, which merges them.
The endpoint is the calibration server with zero delay, so the generator falls behind first.

This machine has two cores, and the server needs one of them, so "twice the cores" cannot be had
without sharing. Four layouts climb the same ladder of rates, interleaved (each rate is run by every
layout still climbing before the next rate, so they meet the same host), each until its first
unhealthy step, then bisect once:
  single process      `loadgen run` without --processes on core 0: what the distributed mode adds
  1 worker            --processes 1: master and worker on core 0, server alone on core 1 (the baseline)
  2 workers, 1 core   --processes 2: master and both workers on core 0, server alone on core 1: the
                      same CPU as the baseline, so this ratio is what two processes on one core cost
  2 workers, 2 cores  --processes 2: master and worker 0 on core 0, worker 1 on core 1 BESIDE THE
                      SERVER: twice the generator CPU, but the server shares a core with a worker
A step is healthy when nothing is dropped, nothing fails, the merged schedule lag p99 is under 1 ms
and the achieved rate is within 1 % of the rate asked for. An unhealthy step is run once more and
counts as unhealthy only if it fails again (a host that takes a core away for a few milliseconds
fails a step now and then whatever the generator does).

    flock /tmp/bench.lock .venv/bin/python bench/scale_out.py           # 3-6 minutes
    flock /tmp/bench.lock .venv/bin/python bench/scale_out.py --quick   # 3 s steps

Needs Linux and two cores. The table is also written to bench/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _server_bench import busy_host_note, git_state, write_json  # the bench folder's own helpers
from generator_capacity import Server, server_answered, start_server, stop_server

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LADDER = (1000, 2000, 3000, 4500, 6000, 8000, 10000, 12000)
MAX_LAG_P99_MS = 1.0
RATE_TOLERANCE = 0.01
GENERATOR_CORE, SERVER_CORE = 0, 1


@dataclass(frozen=True)
class Layout:
    name: str
    processes: int  # 0: a plain single-process run
    worker_cores: tuple[int, ...]  # worker i is pinned to worker_cores[i]


LAYOUTS = (
    Layout("single process", 0, ()),
    Layout("1 worker", 1, (GENERATOR_CORE,)),
    Layout("2 workers, 1 core", 2, (GENERATOR_CORE, GENERATOR_CORE)),
    Layout("2 workers, 2 cores", 2, (GENERATOR_CORE, SERVER_CORE)),
)


@dataclass
class Step:
    layout: str
    rate: float
    achieved_rps: float
    sent: int
    dropped: int
    errors: int
    lag_p99_ms: float
    worker_cpu: list[float]
    worker_lag_p99_ms: list[float]  # each worker's own, ordered by the core it was pinned to
    server_answered: int
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def _pin_workers(master: subprocess.Popen, cores: tuple[int, ...], done: threading.Event,
                 pinned: list[int]) -> None:
    """Pin the master's worker processes (its children) to `cores`, in the order they appear (`pinned`)."""
    path = Path(f"/proc/{master.pid}/task/{master.pid}/children")
    while not done.is_set() and len(pinned) < len(cores):
        try:
            children = [int(pid) for pid in path.read_text().split()]
        except OSError:
            return
        for pid in children:
            if pid not in pinned:
                os.sched_setaffinity(pid, {cores[len(pinned)]})
                pinned.append(pid)
                if len(pinned) == len(cores):
                    break
        time.sleep(0.005)


def _lag_by_core(summary: dict, pinned: list[int], layout: Layout) -> list[float]:
    """Each worker's own lag p99, ordered by the core it was pinned to."""
    if not layout.processes:
        return []
    lag = {w["pid"]: (w["generator"] or {}).get("lag_ms", {}).get("p99", 0.0)
           for w in summary["distributed"]["workers"]}
    return [lag.get(pid, float("nan")) for _, pid in sorted(zip(layout.worker_cores, pinned, strict=False))]


def run_step(server: Server, layout: Layout, rate: float, duration_s: float, work: Path) -> Step:
    out = work / f"{layout.processes}-{'-'.join(map(str, layout.worker_cores))}-{rate:g}"
    cmd = [sys.executable, "-m", "loadgen", "run", "--target", server.url, "--model", "identity",
           "--rate", f"{rate:g}", "--duration", f"{duration_s:g}s", "--out", str(out), "-q"]
    if layout.processes:
        cmd += ["--processes", str(layout.processes)]
    answered = server_answered(server)
    log = work / f"{out.name}.log"
    with open(log, "w") as sink:
        master = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        os.sched_setaffinity(master.pid, {GENERATOR_CORE})
        done = threading.Event()
        pinned: list[int] = []
        pinner = threading.Thread(target=_pin_workers, args=(master, layout.worker_cores, done, pinned),
                                  daemon=True)
        pinner.start()
        try:
            code = master.wait(duration_s + 90)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
            raise SystemExit(f"loadgen ran past its time:\n{log.read_text()[-2000:]}") from None
        finally:
            done.set()
    if code != 0:
        raise SystemExit(f"loadgen exited with {code}:\n{log.read_text()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    errors = sum(summary["errors"].values())
    step = Step(
        layout=layout.name, rate=rate, achieved_rps=summary["achieved_rps"], sent=summary["sent"],
        dropped=summary["dropped"], errors=errors, lag_p99_ms=summary["lag_ms"]["p99"],
        worker_cpu=[(w["generator"] or {}).get("cpu_fraction", 0.0) for w in summary["distributed"]["workers"]]
        if layout.processes else [summary["generator"]["cpu_fraction"]],
        worker_lag_p99_ms=_lag_by_core(summary, pinned, layout),
        server_answered=server_answered(server) - answered,
    )
    if abs(step.achieved_rps - rate) > RATE_TOLERANCE * rate:
        step.problems.append(f"achieved {step.achieved_rps:.0f}/s, off by more than {RATE_TOLERANCE:.0%}")
    if step.dropped:
        step.problems.append(f"{step.dropped} dropped")
    if errors:
        step.problems.append(f"{errors} errors")
    if step.lag_p99_ms >= MAX_LAG_P99_MS:
        step.problems.append(f"lag p99 {step.lag_p99_ms:.2f} ms >= {MAX_LAG_P99_MS:g} ms")
    return step


def judged_step(server: Server, layout: Layout, rate: float, duration_s: float, work: Path,
                steps: list[Step]) -> bool:
    """Run a step (again if it failed); True when healthy."""
    for _ in range(2):
        step = run_step(server, layout, rate, duration_s, work)
        steps.append(step)
        _show(step)
        if step.healthy:
            return True
    return False


def climb(server: Server, ladder: tuple[int, ...], duration_s: float, work: Path) -> tuple[dict, list[Step]]:
    """Every layout climbs `ladder`, interleaved, to its first unhealthy rate, then bisects once."""
    steps: list[Step] = []
    best = {layout.name: 0.0 for layout in LAYOUTS}
    failed: dict[str, float] = {}
    for rate in ladder:
        for layout in LAYOUTS:
            if layout.name in failed:
                continue
            if judged_step(server, layout, rate, duration_s, work, steps):
                best[layout.name] = rate
            else:
                failed[layout.name] = rate
        if len(failed) == len(LAYOUTS):
            break
    for layout in LAYOUTS:
        low, high = best[layout.name], failed.get(layout.name)
        middle = round((low + high) / 2, -2) if high and low else 0
        if low < middle < (high or 0) and judged_step(server, layout, middle, duration_s, work, steps):
            best[layout.name] = middle
    return best, steps


def _show(step: Step) -> None:
    verdict = "healthy" if step.healthy else "UNHEALTHY: " + "; ".join(step.problems)
    cpu = "/".join(f"{c:.0%}" for c in step.worker_cpu)
    each = "/".join(f"{lag:.2f}" for lag in step.worker_lag_p99_ms) if len(step.worker_lag_p99_ms) > 1 else ""
    print(f"  {step.layout:20s} {step.rate:7.0f}/s  achieved {step.achieved_rps:8.1f}/s  "
          f"lag p99 {step.lag_p99_ms:6.3f} ms {f'({each})':13s} worker CPU {cpu:10s} {verdict}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s steps instead of 5 s")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores: one for the server, one (or two) for the generator")
    duration_s = 3.0 if args.quick else 5.0
    settings = {"duration_s": duration_s, "generator_core": GENERATOR_CORE, "server_core": SERVER_CORE,
                "max_lag_p99_ms": MAX_LAG_P99_MS, "rate_tolerance": RATE_TOLERANCE, **git_state()}
    server = start_server(SERVER_CORE)
    try:
        with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
            best, steps = climb(server, LADDER, duration_s, Path(tmp))
    finally:
        stop_server(server)
    base = best[LAYOUTS[1].name]
    ratios = {name: round(rate / base, 3) if base else None for name, rate in best.items()}
    print("\nhighest healthy open-loop rate (calibration server, zero delay, on core 1), and the CPU of each "
          "worker there (of one core):")
    cpu_at_best = {}
    for layout in LAYOUTS:
        there = [s for s in steps if s.layout == layout.name and s.rate == best[layout.name] and s.healthy]
        cpu_at_best[layout.name] = there[-1].worker_cpu if there else []
        cpu = "/".join(f"{c:.0%}" for c in cpu_at_best[layout.name])
        print(f"  {layout.name:20s} {best[layout.name]:7.0f} req/s   x{ratios[layout.name]:<6}  worker CPU {cpu}")
    print(f"scaling ratio, --processes 2 over --processes 1: {ratios[LAYOUTS[3].name]} on two cores "
          f"(one shared with the server), {ratios[LAYOUTS[2].name]} on the same core; "
          f"--processes 1 over a single process: {round(base / best[LAYOUTS[0].name], 3) if best[LAYOUTS[0].name] else None}")
    note = busy_host_note(2)
    if note:
        print(note)
    results = {"highest_healthy_rps": best, "ratio_over_one_worker": ratios, "worker_cpu_at_best": cpu_at_best,
               "settings": {**settings, "ladder": LADDER},
               "busy_host": note or None, "steps": [{**asdict(s), "healthy": s.healthy} for s in steps]}
    print(f"written to {write_json('scale_out', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
