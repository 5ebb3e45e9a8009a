"""Server overhead: what the Triton-compatible server's request path costs beyond the stack it runs on.

Place in the flow: servers/triton answers a request in three layers: the transport (HTTP/1.1 through
servers/core/connection.py and servers/triton/_server.py; gRPC through grpc.aio), then routing, tensor
decode, the model, encode and statistics (_app.py, _grpc.py, _infer.py). This benchmark holds the
transport fixed and takes the rest away: a hello-world server on the same stack (ServerContext and
listen with an App whose handle() returns a fixed Reply; a grpc.aio server with one generic unary
handler per RPC returning fixed bytes) beside the real server, same model (identity, FP32 [16]), same
clients, same core. The hello server's fixed answers are the real server's own bytes: the first
request of each kind is forwarded to the real server once and its reply is kept (this script with
--serve-hello does that), so both send identical responses and clients cannot tell them apart.

Clients, on the other core: perf_analyzer (C++, binary tensors) over HTTP and gRPC at a few
concurrencies, and loadgen closed loop (binary tensors) over HTTP at the same user counts; the two
servers alternate step by step, in two rounds. For each server the best req/s is reported, the ratio
real/hello, and the server's CPU microseconds per request (its CPU time over the client's measurement
window divided by the requests answered in it), whose difference is the overhead per request. One
Python client core cannot always saturate the hello server (its CPU stays under SATURATED); then its
req/s, and the req/s ratio, describe the client, and the ratio of CPU per request (what the req/s
ratio would be with both servers saturated) is the figure to read.

    .venv/bin/python bench/server_overhead.py            # ~2.5 minutes
    .venv/bin/python bench/server_overhead.py --quick    # ~1 minute: one round

Needs Linux, two cores, taskset and perf_analyzer (../shared/peers/perf_analyzer.sh). Run it under
`flock /tmp/bench.lock` on a shared machine. Results: bench/results/server_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import grpc
from _server_bench import (
    ROOT,
    Clients,
    Measured,
    ServerProcess,
    busy_host_note,
    git_state,
    perf_analyzer_binary,
    pick_cores,
    start_server,
    start_triton,
    write_json,
)
from tritonclient.grpc import service_pb2

from servers.core.http1 import Request
from servers.triton._app import Reply
from servers.triton._server import ServerContext, close, listen

MODEL = "identity"
PA_FLAGS = ("--shape", "INPUT0:16", "-x", "1")
"""identity's input is [-1]: perf_analyzer needs a length. The version is named because without one
perf_analyzer looks for the version whose statistics grew, and the hello server's never do."""
LEVELS = (2, 8)
ROUNDS, QUICK_ROUNDS = 2, 1
LOADGEN_SECONDS = 3.0
SATURATED = 0.9
"""A server using at least this fraction of its core over a step is taken as the bottleneck."""
SERVICE = "inference.GRPCInferenceService"


# -- the hello-world server (a child process) -----------------------------------------------------
class ReplayApp:
    """The App of the hello server: one fixed Reply per kind of request (method, path, binary or JSON
    body), fetched from the real server the first time that kind arrives and kept from then on."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream
        self._replies: dict[tuple[str, str, bool], Reply] = {}

    def handle(self, request: Request) -> Reply:
        key = (request.method, request.target, "inference-header-content-length" in request.headers)
        reply = self._replies.get(key)
        if reply is None:
            reply = self._replies[key] = self._fetch(request)
        return reply

    def _fetch(self, request: Request) -> Reply:
        host, port = self._upstream.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        forwarded = {name: value for name, value in request.headers.items()
                     if name in ("content-type", "inference-header-content-length")}
        connection.request(request.method, request.target, body=request.body or None, headers=forwarded)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        length = response.getheader("Inference-Header-Content-Length")
        extra = f"Inference-Header-Content-Length: {length}\r\n" if length is not None else ""
        return Reply(response.status, body, response.getheader("Content-Type", "application/json"), extra)


def replay_handlers(upstream: str) -> grpc.GenericRpcHandler:
    """One raw-bytes unary handler per unary RPC of the inference service; each answers the bytes the
    real server answered to its first call."""
    channel = grpc.aio.insecure_channel(upstream)
    methods = {}
    for method in service_pb2.DESCRIPTOR.services_by_name[SERVICE.split(".")[1]].methods:
        if not (method.client_streaming or method.server_streaming):
            methods[method.name] = grpc.unary_unary_rpc_method_handler(
                _replay(channel.unary_unary(f"/{SERVICE}/{method.name}")))
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _replay(forward: Callable[[bytes], Awaitable[bytes]]) -> Callable[[bytes, object], Awaitable[bytes]]:
    kept: list[bytes] = []

    async def answer(request: bytes, context: object) -> bytes:
        if not kept:
            kept.append(await forward(request))
        return kept[0]

    return answer


async def _serve_hello(upstream_http: str, upstream_grpc: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((replay_handlers(upstream_grpc),))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    print(f"grpc listening on 127.0.0.1:{grpc_port}", flush=True)
    with ThreadPoolExecutor(1) as executor:  # never used: every reply is ready at once
        context = ServerContext(ReplayApp(upstream_http), executor)
        server = await listen(context, "127.0.0.1", 0)
        print(f"listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()
        await close(server, context)
    await grpc_server.stop(None)


def serve_hello(upstream_http: str, upstream_grpc: str) -> None:
    """Run the hello server as the real one runs: uvloop when installed, a frozen heap."""
    gc.collect()
    gc.freeze()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_hello(upstream_http, upstream_grpc))
    else:
        uvloop.run(_serve_hello(upstream_http, upstream_grpc))


# -- the measurement ------------------------------------------------------------------------------
def measure(clients: Clients, servers: dict[str, ServerProcess], rounds: int) -> dict[str, list[Measured]]:
    """Each client, protocol and level against each server, the servers alternating step by step."""
    steps: dict[str, list[Measured]] = {name: [] for name in servers}
    for _ in range(rounds):
        for level in LEVELS:
            for protocol in ("http", "grpc"):
                for name, server in servers.items():
                    step = clients.perf_analyzer_run(server, MODEL, protocol, level, extra=PA_FLAGS)
                    if step is not None:
                        steps[name].append(announce(name, step))
            for name, server in servers.items():
                steps[name].append(announce(name, clients.loadgen_run(server, MODEL, level, LOADGEN_SECONDS)))
    return steps


HEADER = (f"{'server':<7} {'client':<14} {'proto':<5} {'level':>5} {'req/s':>9} {'p99 ms':>8} {'client':>6} "
          f"{'server':>6} {'server us':>9}\n"
          f"{'':<7} {'':<14} {'':<5} {'':>5} {'':>9} {'':>8} {'cpu':>6} {'cpu':>6} {'cpu / req':>9}")


def announce(server: str, step: Measured) -> Measured:
    print(f"{server:<7} {step.client:<14} {step.protocol:<5} {step.level:>5} {step.requests_per_s:>9.0f} "
          f"{step.p99_ms:>8.3f} {step.client_cpu:>6.0%} {step.server_cpu:>6.0%} "
          f"{step.server_cpu_us_per_request:>9.1f}", flush=True)
    return step


def summarize(steps: dict[str, list[Measured]]) -> list[dict]:
    """Per (client, protocol): each server's best req/s (and its CPU per request), and the ratio."""
    rows = []
    for client, protocol in (("perf_analyzer", "http"), ("perf_analyzer", "grpc"), ("loadgen", "http")):
        best = {name: max((s for s in server_steps if (s.client, s.protocol) == (client, protocol)),
                          key=lambda s: s.requests_per_s, default=None)
                for name, server_steps in steps.items()}
        real, hello = best["triton"], best["hello"]
        if real is None or hello is None:
            continue  # every step of one side was left out (no stable measurement)
        real_us, hello_us = real.server_cpu_us_per_request, hello.server_cpu_us_per_request
        rows.append({"client": client, "protocol": protocol,
                     "triton_rps": round(real.requests_per_s, 1), "hello_rps": round(hello.requests_per_s, 1),
                     "ratio_triton_over_hello": round(real.requests_per_s / hello.requests_per_s, 3),
                     "ratio_by_cpu_per_request": round(hello_us / real_us, 3),
                     "both_saturated": min(real.server_cpu, hello.server_cpu) >= SATURATED,
                     "triton_level": real.level, "hello_level": hello.level,
                     "triton_cpu": round(real.server_cpu, 3), "hello_cpu": round(hello.server_cpu, 3),
                     "triton_cpu_us_per_request": round(real_us, 1),
                     "hello_cpu_us_per_request": round(hello_us, 1),
                     "overhead_cpu_us_per_request": round(real_us - hello_us, 1)})
    return rows


def print_table(rows: list[dict], settings: dict) -> None:
    print(f"\n== server overhead: {MODEL}, servers on core {settings['server_core']}, clients on core "
          f"{settings['client_core']}, best of levels {', '.join(map(str, LEVELS))} x {settings['rounds']} "
          f"round(s) ==")
    print(f"{'':<20} {'triton':>8} {'hello':>8} {'ratio':>6}   {'server CPU us / request':>26} {'ratio':>6}")
    print(f"{'':<20} {'req/s':>8} {'req/s':>8} {'':>6}   {'triton':>8} {'hello':>8} {'extra':>8} "
          f"{'by CPU':>6}  server CPU triton / hello")
    for row in rows:
        label = f"{row['client']} {row['protocol']}"
        note = "" if row["both_saturated"] else "  (not both saturated: read the ratio by CPU)"
        print(f"{label:<20} {row['triton_rps']:>8.0f} {row['hello_rps']:>8.0f} "
              f"{row['ratio_triton_over_hello']:>6.3f}   {row['triton_cpu_us_per_request']:>8.1f} "
              f"{row['hello_cpu_us_per_request']:>8.1f} {row['overhead_cpu_us_per_request']:>8.1f} "
              f"{row['ratio_by_cpu_per_request']:>6.3f}  {row['triton_cpu']:.0%} / {row['hello_cpu']:.0%}"
              f"{note}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of two")
    parser.add_argument("--client-core", type=int, help="core for perf_analyzer and loadgen")
    parser.add_argument("--server-core", type=int, help="core for both servers")
    parser.add_argument("--serve-hello", nargs=2, metavar=("HTTP", "GRPC"),
                        help="run the hello server, replaying the real server at HOST:PORT (HTTP) and "
                             "HOST:PORT (gRPC); this script starts it itself")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve_hello:
        serve_hello(*args.serve_hello)
        return
    binary = perf_analyzer_binary()
    client_core, server_core = pick_cores(args.client_core, args.server_core)
    settings = {"client_core": client_core, "server_core": server_core, "levels": list(LEVELS),
                "rounds": QUICK_ROUNDS if args.quick else ROUNDS, "loadgen_s": LOADGEN_SECONDS,
                "python": platform.python_version(), "machine": platform.machine(), **git_state()}
    servers: dict[str, ServerProcess] = {}
    try:
        servers["triton"] = start_triton(server_core)
        servers["hello"] = start_server([sys.executable, __file__, "--serve-hello", servers["triton"].http,
                                         servers["triton"].grpc], server_core)
        with tempfile.TemporaryDirectory(prefix="server-overhead-") as work:
            clients = Clients(binary, client_core, Path(work))
            print(f"triton http {servers['triton'].http} grpc {servers['triton'].grpc}; hello http "
                  f"{servers['hello'].http} grpc {servers['hello'].grpc}; servers on core {server_core}, "
                  f"clients on core {client_core}\n{HEADER}", flush=True)
            steps = measure(clients, servers, settings["rounds"])
    finally:
        for server in servers.values():
            server.stop()
    settings["load_average_at_end"] = round(os.getloadavg()[0], 2)
    rows = summarize(steps)
    print_table(rows, settings)
    if note := busy_host_note():
        print(note)
    path = write_json("server_overhead", {"rows": rows, "settings": settings,
                                          "steps": {name: [asdict(s) for s in server_steps]
                                                    for name, server_steps in steps.items()}})
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
