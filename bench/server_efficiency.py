"""Server efficiency: the mlp's saturation throughput through the Triton-compatible server, against the
same model run in-process on the same core.

Place in the flow: the server (servers/triton) is the system under test of every demo and most
integration tests; a server that spends most of its core on HTTP, gRPC and tensor codecs measures
itself, not the model. The in-process figure is the model's ceiling on that core: MLP.infer
(servers/models/builtin.py, the server's default weights) called in a loop on one thread, best of five
timed repeats, at every batch size 1..32. The server figure is the best over a few load levels of
  perf_analyzer  (C++, binary tensors) over HTTP and gRPC, concurrency 1, 2, 4, 8, at batch 1 and at
                 the model's max batch (32 rows per request);
  loadgen        closed loop (`loadgen run --users N --think none`, binary tensors over HTTP), N as above.
Each server figure is divided by the in-process figure at the batch size the server actually ran (its
own statistics: inference_count / execution_count over the run; batch 1 per request until dynamic
batching lands) and by the in-process best. Target: >= 0.8 of the in-process figure at the batch size
the server runs. Server and clients are each pinned to a core of their own; the in-process loop runs on
the server's core before the server starts. Each step also reads the server's CPU use and its own
per-stage times, so the table shows where a request's time goes: decode, model, encode, and the rest
(event loop, HTTP/gRPC framing, routing).

Second table: dynamic batching, as a serving engineer measures a server. The model is the make-repo
`mlp` (TorchScript, max_batch_size 32, dynamic_batching with preferred sizes 8, 16, 32 and a 500 us
queue delay; `python -m servers make-repo DIR --mlp-hidden H`) at a few sizes: 16 -> H -> 10 for each
--sizes hidden H, and MLPs of other layer widths written the same way (784 -> 512 -> 512 -> 10 is the
MLP of the TorchServe captures, ../shared/torchserve-captures/models/make_models.py). Every config gets
INTRA_OP_THREAD_COUNT=1 and the in-process loop runs torch.set_num_threads(1): one thread of torch
each side ("same threads"), the server on one core, the in-process loop on the same core. In-process:
the TorchScript module itself (torch.jit.load, inference_mode, numpy in and out) at batch 1, 2, 4 ..
32, best of seven loops with the batch sizes taking turns; the ceiling is the best inferences/s over
those batch sizes, the most the server's own batcher could ever run. Through the server, in
inferences/s, the best of a few levels (BATCHING_LEVELS): perf_analyzer HTTP and gRPC with ordinary
requests (batch 1, 16 and 64 in flight: the server forms the batches) and with batched requests
(-b 8, -b 32), and loadgen (batch 1: HTTP with binary and with JSON tensors, and gRPC, 16 and 64
users; --batch-size 8 and 32 over HTTP at perf_analyzer's levels); each divided by the ceiling. The table ends with where the ratio crosses TARGET_RATIO: the
smallest model (by in-process microseconds per inference) at which each client reaches it.

    .venv/bin/python bench/server_efficiency.py            # ~9 minutes
    .venv/bin/python bench/server_efficiency.py --quick    # ~4 minutes: fewer levels, 3 s loadgen runs
    .venv/bin/python bench/server_efficiency.py --tables batching --sizes 64,2048

Needs Linux, two cores, taskset and perf_analyzer (../shared/peers/perf_analyzer.sh). Run it under
`flock /tmp/bench.lock` on a shared machine. Results: bench/results/server_efficiency.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
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
from servers.models.make_repo import config_text, make_repo

MODEL = "mlp"
MAX_BATCH = MLP.max_batch_size
LEVELS = (1, 2, 4, 8)
QUICK_LEVELS = (2, 8)
LOADGEN_SECONDS, QUICK_LOADGEN_SECONDS = 4.0, 3.0
IN_PROCESS_REPEATS = 5
IN_PROCESS_REPEAT_S = 0.05
TARGET_RATIO = 0.8
INPUT_SEED = 11

SIZES = ("64", "512", "2048", "784-512-512-10", "784-2048-2048-10")
"""Model sizes of the batching table: a hidden size H (make-repo's 16 -> H -> 10 mlp), or the layer
widths of an MLP written here (784-512-512-10: the TorchServe captures' model; 784-2048-2048-10, about
180 us an inference on one thread, to find where ordinary requests reach the target)."""
BATCHING_LEVELS = {1: (16, 64), 8: (4, 16), MAX_BATCH: (2, 8)}
"""Rows per request -> perf_analyzer concurrencies: enough requests in flight to keep the batcher fed."""
QUICK_BATCHING_LEVELS = {1: (64,), 8: (16,), MAX_BATCH: (8,)}
LOADGEN_USERS, QUICK_LOADGEN_USERS = (16, 64), (64,)
IN_PROCESS_BATCHES = (1, 2, 4, 8, 16, 32)
TORCH_REPEATS, TORCH_REPEAT_S = 7, 0.1
THREAD_PARAMETER = 'parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "1" } }\n'
CAPTURES_SEED = 0


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
    core's time per request (framing, event loop, routing, the hop to the model's thread; idle when the
    server was not saturated). A dynamic batch's execution is shared by its requests: the model time
    is the executions' time over the requests (a request's compute_infer counts the whole execution
    it was part of); the queue is a wait, not CPU time, and is left out of the sum."""
    count = max(step.server["success"]["count"], 1)
    stages = {stage: step.server[stage]["ns"] / count / 1000
              for stage in ("queue", "compute_input", "compute_infer", "compute_output")}
    stages["compute_infer"] = step.server["execution_infer_ns"] / count / 1000
    cpu_per_request = step.server_cpu_us_per_request
    busy = stages["compute_input"] + stages["compute_infer"] + stages["compute_output"]
    return {**stages, "rest": cpu_per_request - busy, "cpu": cpu_per_request}


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


# -- dynamic batching: the repository mlp at several sizes -----------------------------------------
@dataclass(frozen=True)
class Size:
    """One model of the batching table: its label and layer widths (inputs first, outputs last)."""

    label: str
    widths: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Size:
        """"H" (make-repo's mlp, 16 -> H -> 10) or "A-B-...-Z" (an MLP of those layer widths)."""
        parts = text.split("-")
        if not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(f"a size is a hidden width H or layer widths A-B-..-Z, "
                                             f"got {text!r}")
        if len(parts) == 1:
            return cls(f"16-{text}-10", (MLP.in_features, int(text), MLP.out_features))
        return cls(text, tuple(map(int, parts)))

    @property
    def make_repo_hidden(self) -> int | None:
        """The --mlp-hidden of make-repo when this is its mlp, else None."""
        widths = self.widths
        if len(widths) == 3 and (widths[0], widths[2]) == (MLP.in_features, MLP.out_features):
            return widths[1]
        return None


def write_repository(size: Size, scratch: Path) -> Path:
    """A repository holding one model, `mlp`, of `size`, with INTRA_OP_THREAD_COUNT=1; returns it.

    make-repo's mlp when the size is one (its config and weights as `make-repo --mlp-hidden H` writes
    them); otherwise a TorchScript Linear-ReLU stack of the given widths with make-repo's config."""
    repository = scratch / f"repo-{size.label}"
    if repository.exists():
        shutil.rmtree(repository)
    repository.mkdir(parents=True)
    if size.make_repo_hidden is not None:
        made = scratch / f"make-repo-{size.label}"
        make_repo(made, mlp_hidden=size.make_repo_hidden, digits=False)
        shutil.copytree(made / MODEL, repository / MODEL)
        shutil.rmtree(made)
    else:
        _write_stack(size.widths, repository / MODEL)
    config = repository / MODEL / "config.pbtxt"
    config.write_text(config.read_text() + THREAD_PARAMETER)
    return repository


def _write_stack(widths: tuple[int, ...], folder: Path) -> None:
    import torch

    torch.manual_seed(CAPTURES_SEED)
    layers: list[torch.nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers += [torch.nn.Linear(fan_in, fan_out)] + ([torch.nn.ReLU()] if index < len(widths) - 2 else [])
    (folder / "1").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, still Triton's format
        torch.jit.save(torch.jit.script(torch.nn.Sequential(*layers).eval()), str(folder / "1" / "model.pt"))
    batching = ("dynamic_batching { preferred_batch_size: [ 8, 16, 32 ] max_queue_delay_microseconds: 500 }")
    (folder / "config.pbtxt").write_text(config_text(
        MODEL, 'platform: "pytorch_libtorch"', MAX_BATCH, [("INPUT0", "TYPE_FP32", (widths[0],))],
        [("OUTPUT0", "TYPE_FP32", (widths[-1],))], batching=batching))


def torch_in_process(model_file: Path, in_features: int, core: int) -> dict[int, float]:
    """Inferences per second of the TorchScript module at each of IN_PROCESS_BATCHES, one torch thread,
    on `core`: numpy in, the module under inference_mode, numpy out, as a backend instance does it.

    Best of TORCH_REPEATS loops of about TORCH_REPEAT_S per batch size, the batch sizes
    taking turns loop by loop: a burst of other work on a shared host then spoils one loop of each
    size rather than every loop of one (a large model's loops are few calls, easily all disturbed)."""
    import torch

    threads = torch.get_num_threads()
    allowed = os.sched_getaffinity(0)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {core})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(model_file)).eval()
        rng = np.random.default_rng(INPUT_SEED)

        def call(data: np.ndarray) -> None:
            with torch.inference_mode():
                module(torch.from_numpy(data)).numpy()

        inputs = {batch: rng.standard_normal((batch, in_features)).astype(np.float32)
                  for batch in IN_PROCESS_BATCHES}
        calls = {batch: _calls_per_loop(call, data) for batch, data in inputs.items()}
        best = dict.fromkeys(IN_PROCESS_BATCHES, 0.0)
        for _ in range(TORCH_REPEATS):
            for batch, data in inputs.items():
                started = time.perf_counter()
                for _ in range(calls[batch]):
                    call(data)
                best[batch] = max(best[batch], batch * calls[batch] / (time.perf_counter() - started))
        return best
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def _calls_per_loop(call, data: np.ndarray) -> int:
    """How many calls of call(data) take about TORCH_REPEAT_S, after a warm-up."""
    for _ in range(20):
        call(data)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < TORCH_REPEAT_S:
        call(data)
        calls += 1
    return calls


def measure_batching(clients: Clients, server: ServerProcess, levels: dict[int, tuple[int, ...]],
                     users: tuple[int, ...], loadgen_s: float) -> list[Measured]:
    """perf_analyzer at every batch size sent and level, both protocols, then loadgen (batch 1 over
    HTTP binary, HTTP JSON and gRPC; the larger batches over HTTP binary, at perf_analyzer's levels)."""
    steps: list[Measured] = []
    for batch, concurrencies in levels.items():
        for level in concurrencies:
            for protocol in ("http", "grpc"):
                step = clients.perf_analyzer_run(server, MODEL, protocol, level, batch, stats_model=MODEL)
                if step is not None:
                    steps.append(announce(step))
            if batch > 1:
                steps.append(announce(clients.loadgen_run(server, MODEL, level, loadgen_s, stats_model=MODEL,
                                                          batch=batch)))
    for level in users:
        for protocol in ("http", "http-json", "grpc"):
            steps.append(announce(clients.loadgen_run(server, MODEL, level, loadgen_s, stats_model=MODEL,
                                                      protocol=protocol)))
    return steps


def summarize_size(size: Size, steps: list[Measured], reference: dict[int, float]) -> dict:
    """The in-process figures of one size and the best step of each (client, protocol, batch sent)."""
    best_batch = max(reference, key=reference.__getitem__)
    ceiling = reference[best_batch]
    rows = []
    for key in sorted({(s.client, s.protocol, s.batch) for s in steps}, key=_row_order):
        best = max((s for s in steps if (s.client, s.protocol, s.batch) == key),
                   key=lambda s: s.inferences_per_s)
        ran = server_batch(best)
        rows.append({"client": key[0], "protocol": key[1], "batch_sent": key[2], "level": best.level,
                     "inferences_per_s": round(best.inferences_per_s, 1),
                     "requests_per_s": round(best.requests_per_s, 1), "p99_ms": round(best.p99_ms, 3),
                     "server_batch": round(ran, 2), "server_cpu": round(best.server_cpu, 3),
                     "client_cpu": round(best.client_cpu, 3),
                     "server_cpu_us_per_request": round(best.server_cpu_us_per_request, 1),
                     "ratio": round(best.inferences_per_s / ceiling, 3),
                     "ratio_same_batch": round(best.inferences_per_s / _at_batch(reference, ran), 3),
                     "meets_target": best.inferences_per_s / ceiling >= TARGET_RATIO})
    return {"size": size.label, "widths": list(size.widths),
            "in_process_inferences_per_s": {str(b): round(v, 1) for b, v in reference.items()},
            "in_process_best_batch": best_batch, "in_process_best_inferences_per_s": round(ceiling, 1),
            "in_process_us_per_inference": round(1e6 / ceiling, 3), "through_server": rows}


def _at_batch(reference: dict[int, float], batch: float) -> float:
    """In-process inferences/s at a (mean) batch size, interpolated between the measured sizes."""
    sizes = sorted(reference)
    batch = min(max(batch, sizes[0]), sizes[-1])
    return float(np.interp(np.log2(batch), np.log2(sizes), [reference[b] for b in sizes]))


def crossings(sizes: list[dict]) -> list[dict]:
    """For each (client, protocol, batch sent): the smallest model (in-process us per inference) whose
    ratio reaches TARGET_RATIO, or None when no size measured does."""
    ordered = sorted(sizes, key=lambda size: size["in_process_us_per_inference"])
    keys = sorted({(r["client"], r["protocol"], r["batch_sent"]) for size in sizes
                   for r in size["through_server"]}, key=_row_order)
    rows = []
    for key in keys:
        ratios = [(size, row) for size in ordered for row in size["through_server"]
                  if (row["client"], row["protocol"], row["batch_sent"]) == key]
        first = next((size for size, row in ratios if row["meets_target"]), None)
        rows.append({"client": key[0], "protocol": key[1], "batch_sent": key[2],
                     "ratios": {size["size"]: row["ratio"] for size, row in ratios},
                     "first_size_meeting_target": first["size"] if first else None,
                     "its_us_per_inference": first["in_process_us_per_inference"] if first else None})
    return rows


def _row_order(key: tuple[str, str, int]) -> tuple[bool, int, str]:
    """perf_analyzer rows first, then by rows per request, HTTP before gRPC."""
    client, protocol, batch = key
    return client != "perf_analyzer", batch, protocol


def print_size(table: dict) -> None:
    per_batch = table["in_process_inferences_per_s"]
    print(f"\n-- mlp {table['size']}: in-process (1 thread) infer/s by batch: "
          + ", ".join(f"{b}: {v:.0f}" for b, v in per_batch.items())
          + f"; best batch {table['in_process_best_batch']}, {table['in_process_us_per_inference']:.2f} us "
            "per inference")
    print(f"{'through the server (best level)':<36} {'infer/s':>9} {'req/s':>8} {'p99 ms':>7} {'ran at':>6} "
          f"{'srv us':>7} {'ratio':>6} {'ratio to':>8}")
    print(f"{'':<36} {'':>9} {'':>8} {'':>7} {'batch':>6} {'/ req':>7} {'':>6} {'same b.':>8}")
    for row in table["through_server"]:
        label = f"{row['client']} {row['protocol']}, -b {row['batch_sent']}, level {row['level']}"
        print(f"{label:<36} {row['inferences_per_s']:>9.0f} {row['requests_per_s']:>8.0f} "
              f"{row['p99_ms']:>7.2f} {row['server_batch']:>6.1f} {row['server_cpu_us_per_request']:>7.1f} "
              f"{row['ratio']:>6.3f} {row['ratio_same_batch']:>8.3f}  "
              f"{'met' if row['meets_target'] else 'MISSED'}")


def print_crossings(rows: list[dict], sizes: list[dict]) -> None:
    ordered = sorted(sizes, key=lambda size: size["in_process_us_per_inference"])
    print(f"\n== dynamic batching: inferences/s through the server / in-process best (1 thread), target "
          f"{TARGET_RATIO} ==")
    print(f"{'model (in-process us / inference)':<34} " + " ".join(f"{s['size']:>15}" for s in ordered))
    print(f"{'':<34} " + " ".join(f"{s['in_process_us_per_inference']:>15.2f}" for s in ordered))
    for row in rows:
        label = f"{row['client']} {row['protocol']} -b {row['batch_sent']}"
        cells = " ".join(f"{row['ratios'].get(s['size'], float('nan')):>15.3f}" for s in ordered)
        first = row["first_size_meeting_target"]
        where = f"reaches {TARGET_RATIO} at {first}" if first else f"below {TARGET_RATIO} at every size"
        print(f"{label:<34} {cells}   {where}")


def run_batching(args: argparse.Namespace, clients_core: int, server_core: int, binary: str,
                 settings: dict) -> dict:
    """The batching table for every size in args.sizes."""
    levels = QUICK_BATCHING_LEVELS if args.quick else BATCHING_LEVELS
    users = QUICK_LOADGEN_USERS if args.quick else LOADGEN_USERS
    settings.update({"batching_levels": {str(b): list(v) for b, v in levels.items()},
                     "loadgen_users": list(users), "sizes": [size.label for size in args.sizes]})
    tables = []
    with tempfile.TemporaryDirectory(prefix="server-efficiency-batching-") as work:
        for size in args.sizes:
            repository = write_repository(size, Path(work))
            print(f"\nmlp {size.label}: in-process on core {server_core} ...", flush=True)
            reference = torch_in_process(repository / MODEL / "1" / "model.pt", size.widths[0], server_core)
            server = start_triton(server_core, repository)
            try:
                clients = Clients(binary, clients_core, Path(work))
                print(f"server http {server.http} grpc {server.grpc} on core {server_core}\n{HEADER}",
                      flush=True)
                steps = measure_batching(clients, server, levels, users, settings["loadgen_s"])
            finally:
                server.stop()
            table = summarize_size(size, steps, reference)
            table["steps"] = [asdict(s) for s in steps]
            print_size(table)
            tables.append(table)
    return {"sizes": tables, "crossings": crossings(tables),
            "target": f"server inferences/s >= {TARGET_RATIO} x in-process at its best batch size (<= "
                      f"{MAX_BATCH}), one torch thread each side"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer levels, 3 s loadgen runs")
    parser.add_argument("--client-core", type=int, help="core for perf_analyzer and loadgen")
    parser.add_argument("--server-core", type=int, help="core for the server and the in-process loop")
    parser.add_argument("--tables", default="builtin,batching",
                        help="builtin (the built-in numpy mlp, batch as sent), batching (the repository mlp "
                             "with dynamic batching at --sizes), or both (default)")
    parser.add_argument("--sizes", type=lambda text: [Size.parse(part) for part in text.split(",")],
                        default=[Size.parse(size) for size in SIZES],
                        help=f"models of the batching table, comma-separated (default {','.join(SIZES)})")
    args = parser.parse_args()
    args.tables = set(args.tables.split(","))
    if not args.tables or not args.tables <= {"builtin", "batching"}:
        parser.error("--tables takes builtin, batching or both")
    return args


def main() -> None:
    args = parse_args()
    binary = perf_analyzer_binary()
    client_core, server_core = pick_cores(args.client_core, args.server_core)
    levels = QUICK_LEVELS if args.quick else LEVELS
    settings = {"client_core": client_core, "server_core": server_core, "levels": list(levels),
                "loadgen_s": QUICK_LOADGEN_SECONDS if args.quick else LOADGEN_SECONDS,
                "python": platform.python_version(), "machine": platform.machine(), **git_state()}
    results: dict = {}
    if "builtin" in args.tables:
        results = run_builtin(args, client_core, server_core, binary, settings, levels)
    if "batching" in args.tables:
        results["dynamic_batching"] = run_batching(args, client_core, server_core, binary, settings)
        print_crossings(results["dynamic_batching"]["crossings"], results["dynamic_batching"]["sizes"])
    settings["load_average_at_end"] = round(os.getloadavg()[0], 2)
    if note := busy_host_note():
        print(note)
    path = write_json("server_efficiency", {**results, "settings": settings})
    print(f"\nwritten to {path.relative_to(ROOT)}")


def run_builtin(args: argparse.Namespace, client_core: int, server_core: int, binary: str, settings: dict,
                levels: tuple[int, ...]) -> dict:
    """The first table: the built-in numpy mlp at the batch each client sends."""
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
    table = summarize(steps, reference)
    print_table(table, settings)
    return {**table, "in_process_requests_per_s": reference, "steps": [asdict(s) for s in steps]}


if __name__ == "__main__":
    main()
