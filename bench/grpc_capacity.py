"""gRPC generator capacity: the highest healthy open-loop rate of `loadgen run --protocol kserve-grpc`
against the identity model, beside NVIDIA perf_analyzer's request-rate mode over gRPC on the same server.

Generator (either tool) pinned to one core, the Triton-compatible server (built-in models, gRPC on
grpc.aio) to the other. Both climb the same ladder of rates, 5 s a step, until their first unhealthy
step. A step is healthy when
    loadgen:        no errors, nothing dropped, lag p99 < 1 ms, achieved within 1 % of the rate, and
                    loadgen does not call itself GENERATOR-BOUND;
    perf_analyzer:  exit 0 and throughput within 1 % of the rate (it reports no schedule lag).
The server's own CPU is traced too: when it is at a full core, the step measures the server, and the
table says so (then the ratio compares two clients of the same saturated server, not two generators).

    .venv/bin/python bench/grpc_capacity.py          # ~3 minutes; run alone (flock /tmp/bench.lock)

Writes bench/results/grpc_capacity.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server_bench import (  # the bench folder's own helpers
    BIN,
    busy_host_note,
    git_state,
    perf_analyzer_binary,
    pick_cores,
    run_child,
    start_triton,
    write_json,
)

LADDER = (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000)


@dataclass
class Step:
    tool: str
    rate: int
    achieved: float
    healthy: bool
    server_cpu: float
    client_cpu: float
    why: str = ""


def loadgen_step(server, core: int, rate: int, seconds: float, work: Path) -> Step:
    out = work / f"lg-{rate}"
    cmd = [str(BIN / "loadgen"), "run", "--protocol", "kserve-grpc", "--target", f"grpc://{server.grpc}",
           "--model", "identity", "--shape", "INPUT0:1,16", "--rate", str(rate), "--duration", f"{seconds:g}s",
           "--out", str(out), "-q"]
    _, trace = run_child(cmd, core, seconds + 60, work / f"lg-{rate}.log", server)
    summary = json.loads((out / "summary.json").read_text())
    start = summary["clock"]["start_epoch_s"]
    server_cpu, client_cpu = trace.fractions(start, start + summary["duration_s"])
    problems = []
    if summary["errors"]:
        problems.append(f"errors {summary['errors']}")
    if summary["dropped"]:
        problems.append(f"dropped {summary['dropped']}")
    if summary["lag_ms"]["p99"] >= 1.0:
        problems.append(f"lag p99 {summary['lag_ms']['p99']:.2f} ms")
    if abs(summary["achieved_rps"] / rate - 1) > 0.01:
        problems.append(f"achieved {summary['achieved_rps']:.0f}")
    if summary["generator_bound"]:
        problems.append("GENERATOR-BOUND")
    return Step("loadgen", rate, summary["achieved_rps"], not problems, server_cpu, client_cpu, "; ".join(problems))


def perf_analyzer_step(binary: str, server, core: int, rate: int, seconds: float, work: Path) -> Step:
    report = work / f"pa-{rate}.csv"
    cmd = [binary, "-m", "identity", "-u", server.grpc, "-i", "grpc", "--shape", "INPUT0:16",
           "--request-rate-range", str(rate), "--measurement-interval", str(int(seconds * 1000 / 3)),
           "--stability-percentage", "1000", "--max-trials", "3", "-f", str(report)]
    code, trace = run_child(cmd, core, seconds * 4 + 60, work / f"pa-{rate}.log", server, ok=(0, 2))
    if code != 0 or not report.is_file():
        return Step("perf_analyzer", rate, 0.0, False, 0.0, 0.0, f"exit {code}")
    with open(report, newline="") as rows:
        (row,) = list(csv.DictReader(rows))
    achieved = float(row["Inferences/Second"])
    samples = trace.samples  # the whole run: perf_analyzer's windows are most of it
    server_cpu, client_cpu = trace.fractions(samples[0][0], samples[-1][0]) if len(samples) > 1 else (0.0, 0.0)
    healthy = abs(achieved / rate - 1) <= 0.01
    return Step("perf_analyzer", rate, achieved, healthy, server_cpu, client_cpu,
                "" if healthy else f"achieved {achieved:.0f}")


def climb(run, ladder: tuple[int, ...]) -> list[Step]:
    steps = []
    for rate in ladder:
        step = run(rate)
        steps.append(step)
        mark = "healthy" if step.healthy else f"UNHEALTHY ({step.why})"
        print(f"{step.tool:14s} {rate:6d}/s  achieved {step.achieved:8.1f}/s  server CPU {step.server_cpu:4.0%}  "
              f"client CPU {step.client_cpu:4.0%}  {mark}", flush=True)
        if not step.healthy:
            break
    return steps


def best(steps: list[Step]) -> Step | None:
    healthy = [step for step in steps if step.healthy]
    return max(healthy, key=lambda step: step.rate) if healthy else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each step (default 5)")
    parser.add_argument("--generator-core", type=int)
    parser.add_argument("--server-core", type=int)
    args = parser.parse_args()
    generator_core, server_core = pick_cores(args.generator_core, args.server_core)
    binary = perf_analyzer_binary()
    note = busy_host_note()
    if note:
        print(note, flush=True)
    server = start_triton(server_core)
    try:
        with tempfile.TemporaryDirectory(prefix="grpc-capacity-") as folder:
            work = Path(folder)
            ours = climb(lambda r: loadgen_step(server, generator_core, r, args.seconds, work), LADDER)
            theirs = climb(lambda r: perf_analyzer_step(binary, server, generator_core, r, args.seconds, work),
                           LADDER)
    finally:
        server.stop()
    top_ours, top_theirs = best(ours), best(theirs)
    ratio = top_ours.rate / top_theirs.rate if top_ours and top_theirs else None
    print()
    print(f"highest healthy rate, loadgen kserve-grpc: {top_ours.rate if top_ours else 0}/s")
    print(f"highest healthy rate, perf_analyzer grpc:   {top_theirs.rate if top_theirs else 0}/s")
    print(f"ratio loadgen / perf_analyzer: {ratio:.2f}" if ratio else "ratio: n/a")
    first_bad = [step for step in ours + theirs if not step.healthy]
    if any(step.server_cpu > 0.95 for step in first_bad):
        print("note: the server was at a full core at the first unhealthy step: these figures are the "
              "server's gRPC capacity, not the generators'")
    path = write_json("grpc_capacity", {"loadgen": [asdict(s) for s in ours],
                                        "perf_analyzer": [asdict(s) for s in theirs], "ratio": ratio,
                                        "busy_host": note, "git": git_state()})
    print(f"results in {path}")


if __name__ == "__main__":
    main()
