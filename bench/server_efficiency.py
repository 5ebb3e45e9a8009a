"""Server efficiency: the mlp's saturation throughput through the Triton-compatible server, against the
same model run in-process on the same core.

Place in the flow: the server (servers/triton) is the system under test of every demo and most
integration tests; a server that spends most of its core on HTTP, gRPC and tensor codecs measures
itself, not the model. The in-process figure is the model's ceiling on that core: MLP.infer
(servers/models/builtin.py, the server's default weights) called in a loop on one thread, best of five
timed repeats, at every batch size 1..32. The server figure is the best over a few load levels of
  perf_analyzer  (C++, binary tensors) over HTTP and gRPC, concurrency 1, 2, 4, 8, at batch 1 and at
                 the model's max batch (32 rows per request);
  loadgen        closed loop (`loadgen run --users N --think none`, JSON tensors over HTTP), N as above.
Each server figure is divided by the in-process figure at the batch size the server actually ran (its
own statistics: inference_count / execution_count over the run; batch 1 per request until dynamic
batching lands) and by the in-process best. Target: >= 0.8 of the in-process figure at the batch size
the server runs. Server and clients are each pinned to a core of their own; the in-process loop runs on
the server's core before the server starts. Each step also reads the server's CPU use and its own
per-stage times, so the table shows where a request's time goes: decode, model, encode, and the rest
(event loop, HTTP/gRPC framing, routing).

    .venv/bin/python bench/server_efficiency.py            # ~2 minutes
    .venv/bin/python bench/server_efficiency.py --quick    # ~1 minute: levels 2 and 8, 3 s loadgen runs

Needs Linux, two cores, taskset and perf_analyzer (../shared/peers/perf_analyzer.sh). Run it under
`flock /tmp/bench.lock` on a shared machine. Results: bench/results/server_efficiency.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from _server_bench import (
    ROOT,
    Clients,
    Measured,
    ServerProcess,
    busy_host_note,
    git_state,
    perf_analyzer_binary,
    pick_cores,
    start_triton,
    write_json,
)

from servers.models.builtin import MLP

MODEL = "mlp"
MAX_BATCH = MLP.max_batch_size
LEVELS = (1, 2, 4, 8)
QUICK_LEVELS = (2, 8)
LOADGEN_SECONDS, QUICK_LOADGEN_SECONDS = 4.0, 3.0
IN_PROCESS_REPEATS = 5
IN_PROCESS_REPEAT_S = 0.05
TARGET_RATIO = 0.8
INPUT_SEED = 11


# -- in-process -----------------------------------------------------------------------------------
def in_process(core: int) -> dict[int, float]:
    """Requests (infer calls) per second of MLP.infer at each batch size 1..MAX_BATCH, on `core`.

    Each batch size: best of IN_PROCESS_REPEATS timed loops of about IN_PROCESS_REPEAT_S (timeit's
    rule: the least disturbed repeat is the closest to what the code costs)."""
    model = MLP()  # the server's default: hidden 64, seed 0
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        rng = np.random.default_rng(INPUT_SEED)
        return {batch: _calls_per_s(model, rng.standard_normal((batch, MLP.in_features)).astype(np.float32))
                for batch in range(1, MAX_BATCH + 1)}
    finally:
        os.sched_setaffinity(0, allowed)


def _calls_per_s(model: MLP, data: np.ndarray) -> float:
    inputs = {"INPUT0": data}
    for _ in range(200):  # warm caches and the allocator
        model.infer(inputs)
    calls, started = 0, time.perf_counter()  # size a repeat from a first rough pass
    while time.perf_counter() - started < IN_PROCESS_REPEAT_S:
        model.infer(inputs)
        calls += 1
    best = 0.0
    for _ in range(IN_PROCESS_REPEATS):
        started = time.perf_counter()
        for _ in range(calls):
            model.infer(inputs)
        best = max(best, calls / (time.perf_counter() - started))
    return best


# -- through the server ---------------------------------------------------------------------------
def measure_server(clients: Clients, server: ServerProcess, levels: tuple[int, ...],
                   loadgen_s: float) -> list[Measured]:
    """Every client, protocol and batch size at every level, interleaved level by level."""
    steps: list[Measured] = []
    for level in levels:
        for protocol in ("http", "grpc"):
            for batch in (1, MAX_BATCH):
                step = clients.perf_analyzer_run(server, MODEL, protocol, level, batch, stats_model=MODEL)
                if step is not None:
                    steps.append(announce(step))
        steps.append(announce(clients.loadgen_run(server, MODEL, level, loadgen_s, stats_model=MODEL)))
    return steps


def server_batch(step: Measured) -> float:
    """The mean batch size the server ran over the step (inferences per model execution)."""
    return step.server["inference_count"] / max(step.server["execution_count"], 1)


def per_request_us(step: Measured) -> dict[str, float]:
    """Where one request's server time went: the stages the server times itself, and the rest of a
    core's time per request (framing, event loop, routing; idle when the server was not saturated)."""
    count = max(step.server["success"]["count"], 1)
    stages = {stage: step.server[stage]["ns"] / count / 1000
              for stage in ("queue", "compute_input", "compute_infer", "compute_output")}
    cpu_per_request = step.server_cpu_us_per_request
    return {**stages, "rest": cpu_per_request - sum(stages.values()), "cpu": cpu_per_request}


HEADER = (f"{'client':<14} {'proto':<5} {'level':>5} {'batch':>5} {'req/s':>9} {'infer/s':>9} {'p99':>7} "
          f"{'client':>6} {'server':>6} {'server':>6}  server time per request, us\n"
          f"{'':<14} {'':<5} {'':>5} {'':>5} {'':>9} {'':>9} {'ms':>7} "
          f"{'cpu':>6} {'cpu':>6} {'batch':>6}  {'decode':>6} {'model':>6} {'encode':>6} {'rest':>6}")


def announce(step: Measured) -> Measured:
    us = per_request_us(step)
    print(f"{step.client:<14} {step.protocol:<5} {step.level:>5} {step.batch:>5} {step.requests_per_s:>9.0f} "
          f"{step.inferences_per_s:>9.0f} {step.p99_ms:>7.3f} {step.client_cpu:>6.0%} "
          f"{step.server_cpu:>6.0%} {server_batch(step):>6.1f}  "
          f"{us['compute_input']:>6.1f} {us['compute_infer']:>6.1f} {us['compute_output']:>6.1f} "
          f"{us['rest']:>6.1f}", flush=True)
    return step


# -- report ---------------------------------------------------------------------------------------
def summarize(steps: list[Measured], reference: dict[int, float]) -> dict:
    """Best step of each (client, protocol, batch) and its ratios to the in-process figures."""
    best_batch = max(reference, key=lambda b: reference[b] * b)
    ceiling = reference[best_batch] * best_batch
    rows = []
    for key in sorted({(s.client, s.protocol, s.batch) for s in steps}, key=lambda k: (k[2], k[0], k[1])):
        best = max((s for s in steps if (s.client, s.protocol, s.batch) == key),
                   key=lambda s: s.inferences_per_s)
        ran = max(1, min(MAX_BATCH, round(server_batch(best))))
        same = reference[ran] * ran
        rows.append({"client": key[0], "protocol": key[1], "batch_sent": key[2], "level": best.level,
                     "requests_per_s": round(best.requests_per_s, 1),
                     "inferences_per_s": round(best.inferences_per_s, 1),
                     "server_batch": round(server_batch(best), 2), "server_cpu": round(best.server_cpu, 3),
                     "client_cpu": round(best.client_cpu, 3),
                     "in_process_same_batch_inferences_per_s": round(same, 1),
                     "ratio_same_batch": round(best.inferences_per_s / same, 3),
                     "ratio_best_batch": round(best.inferences_per_s / ceiling, 3),
                     "meets_target": best.inferences_per_s / same >= TARGET_RATIO})
    return {
        "in_process": {"batch_1": {"requests_per_s": round(reference[1], 1),
                                   "inferences_per_s": round(reference[1], 1)},
                       "best_batch": best_batch,
                       "best": {"requests_per_s": round(reference[best_batch], 1),
                                "inferences_per_s": round(ceiling, 1)}},
        "through_server": rows,
        "target": f"server inferences/s >= {TARGET_RATIO} x in-process at the batch size the server runs",
    }


def print_in_process(reference: dict[int, float]) -> None:
    shown = sorted({1, 2, 4, 8, 16, 32, max(reference, key=lambda b: reference[b] * b)})
    print(f"{'batch':>5} {'req/s':>10} {'infer/s':>10}")
    for batch in shown:
        print(f"{batch:>5} {reference[batch]:>10.0f} {reference[batch] * batch:>10.0f}")


def print_table(table: dict, settings: dict) -> None:
    ref = table["in_process"]
    print(f"\n== server efficiency: mlp, server on core {settings['server_core']}, clients on core "
          f"{settings['client_core']} ==")
    print(f"in-process MLP.infer, one thread: batch 1 {ref['batch_1']['requests_per_s']:.0f} req/s "
          f"= {ref['batch_1']['inferences_per_s']:.0f} infer/s; best batch {ref['best_batch']} "
          f"{ref['best']['requests_per_s']:.0f} req/s = {ref['best']['inferences_per_s']:.0f} infer/s")
    print(f"{'through the server (best level)':<34} {'req/s':>8} {'infer/s':>9} {'ran at':>6} "
          f"{'in-proc':>9} {'ratio':>6} {'ratio to':>8}")
    print(f"{'':<34} {'':>8} {'':>9} {'batch':>6} {'same b.':>9} {'':>6} {'best b.':>8}")
    for row in table["through_server"]:
        label = f"{row['client']} {row['protocol']}, batch {row['batch_sent']}, level {row['level']}"
        print(f"{label:<34} {row['requests_per_s']:>8.0f} {row['inferences_per_s']:>9.0f} "
              f"{row['server_batch']:>6.1f} {row['in_process_same_batch_inferences_per_s']:>9.0f} "
              f"{row['ratio_same_batch']:>6.3f} {row['ratio_best_batch']:>8.3f}  "
              f"{'met' if row['meets_target'] else 'MISSED'}")
    print(f"target: {table['target']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="levels 2 and 8 only, 3 s loadgen runs")
    parser.add_argument("--client-core", type=int, help="core for perf_analyzer and loadgen")
    parser.add_argument("--server-core", type=int, help="core for the server and the in-process loop")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    binary = perf_analyzer_binary()
    client_core, server_core = pick_cores(args.client_core, args.server_core)
    levels = QUICK_LEVELS if args.quick else LEVELS
    settings = {"client_core": client_core, "server_core": server_core, "levels": list(levels),
                "loadgen_s": QUICK_LOADGEN_SECONDS if args.quick else LOADGEN_SECONDS,
                "python": platform.python_version(), "machine": platform.machine(), **git_state()}
    print(f"in-process MLP.infer on core {server_core} ...", flush=True)
    reference = in_process(server_core)
    print_in_process(reference)
    server = start_triton(server_core)
    try:
        with tempfile.TemporaryDirectory(prefix="server-efficiency-") as work:
            clients = Clients(binary, client_core, Path(work))
            print(f"\nserver http {server.http} grpc {server.grpc} on core {server_core}; clients on core "
                  f"{client_core}\n{HEADER}", flush=True)
            steps = measure_server(clients, server, levels, settings["loadgen_s"])
    finally:
        server.stop()
    settings["load_average_at_end"] = round(os.getloadavg()[0], 2)
    table = summarize(steps, reference)
    print_table(table, settings)
    if note := busy_host_note():
        print(note)
    path = write_json("server_efficiency", {**table, "settings": settings,
                                             "in_process_requests_per_s": reference,
                                             "steps": [asdict(s) for s in steps]})
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
