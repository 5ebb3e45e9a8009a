"""Command line of the Triton-compatible server; its flags mirror tritonserver's.

    python -m servers.triton --http-port 0
    python -m servers.triton --http-port 0 --grpc-port 0
    python -m servers.triton --http-port 8000 --grpc-port 8001 --mlp-hidden 256
    python -m servers.triton --model-repository ./models --http-port 8000 --grpc-port 8001 --metrics-port 8002
    python -m servers.triton --grpc-port 8001 --grpc-use-ssl --grpc-server-cert cert.pem \
        --grpc-server-key key.pem

Without --model-repository it serves the built-in models (servers/models/builtin.py); with it, the
models of that Triton model repository (`python -m servers make-repo DIR` writes one), each loaded
before the server listens (--model-control-mode none, the default) or only those named by
--load-model (explicit mode, which also accepts load/unload requests). A model that fails to load is
reported on stderr and in the repository index, and the others serve. Python backend models (code in
their model.py, from the folder or from a load request's files) load only with --allow-python-backend:
without it, pointing the server at a folder or sending it a load request never runs code on it.

HTTP is always served; gRPC only with --grpc-port, Prometheus metrics only with --metrics-port. gRPC
speaks TLS with --grpc-use-ssl (tritonserver's flags: --grpc-server-cert, --grpc-server-key, and
--grpc-root-cert with --grpc-use-ssl-mutual, which asks clients for a certificate). All
front ends run on one asyncio loop and share the models and their statistics. Once a front end listens
it prints one line and flushes: `grpc listening on HOST:PORT` and `metrics listening on
http://HOST:PORT` first (when served), then `listening on http://HOST:PORT` last, so a reader that waits
for the http line (tests, the demo) finds every front end ready. SIGTERM or SIGINT stops it with exit
code 0; bad flags exit with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core.connection import (
    IDLE_TIMEOUT_S,
    READ_TIMEOUT_S,
    add_max_connections_flag,
    max_connections_problems,
)
from servers.core.model import Model
from servers.models.builtin import builtin_models
from servers.triton._app import TritonApp, connections
from servers.triton._host import ModelHost
from servers.triton._metrics import MetricsApp, build_registry
from servers.triton._server import ServerContext, close, listen, run_server

if TYPE_CHECKING:
    from servers.triton._grpc import GrpcTls

ReadyCallback = Callable[[str, int], None]
FrontReadyCallback = Callable[[str, str, int], None]
"""Called as (front end, host, bound port) when a front end other than HTTP listens: "grpc", "metrics"."""


def serve(models: dict[str, Model] | ModelHost, host: str = "127.0.0.1", port: int = 8000,
          ready_callback: ReadyCallback | None = None, workers: int = 4, *,
          grpc_port: int | None = None, metrics_port: int | None = None,
          front_ready: FrontReadyCallback | None = None, grpc_tls: GrpcTls | None = None,
          http_read_timeout_s: float | None = READ_TIMEOUT_S, limits: Limits | None = None) -> None:
    """Serve `models` (built-in models, or a ModelHost over a repository) over HTTP (plus gRPC and
    metrics when their ports are not None; gRPC over TLS with `grpc_tls`) until SIGTERM/SIGINT.

    An HTTP request that takes longer than `http_read_timeout_s` to arrive is cut off (None: never);
    `limits` bounds idle connections, open connections and concurrent gRPC calls (Limits). Signals are caught only in the main thread. `front_ready` runs for gRPC and
    metrics before `ready_callback` runs for HTTP, so once the HTTP callback runs every front end is ready.

    Example:
        serve(builtin_models(), port=0, ready_callback=lambda host, port: print(host, port),
              grpc_port=0, front_ready=lambda front, host, port: print(front, host, port))
    """
    gc.collect()
    gc.freeze()  # what exists now lives as long as the server: a full collection must not walk it
    app = TritonApp(models)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="infer") as executor:
            limits = limits or Limits()
            context = ServerContext(app, executor, connections(http_read_timeout_s, limits.http_idle_timeout_s,
                                                               limits.max_connections))
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                fronts = _Fronts(grpc_port, metrics_port, front_ready, grpc_tls, limits.grpc_max_concurrent_rpcs)
                runner.run(_serve_until_signal(context, host, port, ready_callback, fronts))
    finally:
        app.host.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass(frozen=True)
class Limits:
    """What one client, or many, may hold of the server: an HTTP connection idle between requests is
    closed after `http_idle_timeout_s`; at most `max_connections` HTTP connections are open per port
    (beyond: 503 and close); at most `grpc_max_concurrent_rpcs` gRPC calls run at once (beyond:
    RESOURCE_EXHAUSTED). None: no limit."""

    http_idle_timeout_s: float | None = IDLE_TIMEOUT_S
    max_connections: int | None = None
    grpc_max_concurrent_rpcs: int | None = None


@dataclass(frozen=True)
class _Fronts:
    """The front ends besides HTTP: a port (None = not served) each, who hears they are ready, and
    gRPC's TLS."""

    grpc_port: int | None
    metrics_port: int | None
    ready: FrontReadyCallback | None
    grpc_tls: GrpcTls | None = None
    grpc_max_concurrent_rpcs: int | None = None


async def _serve_until_signal(context: ServerContext, host: str, port: int, ready_callback: ReadyCallback | None,
                              fronts: _Fronts) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with AsyncExitStack() as started:
            await _start_fronts(context, host, fronts, started)
            await run_server(context, host, port, stop, ready_callback)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _start_fronts(context: ServerContext, host: str, fronts: _Fronts, started: AsyncExitStack) -> None:
    announce = fronts.ready or (lambda front, host, port: None)
    if fronts.grpc_port is not None:
        from servers.triton._grpc import start_grpc  # needs tritonclient[grpc]: only when asked

        grpc_server, bound = await start_grpc(context.app.host, context.executor, host, fronts.grpc_port,
                                              fronts.grpc_tls, fronts.grpc_max_concurrent_rpcs)
        started.push_async_callback(grpc_server.stop, None)
        announce("grpc", host, bound)
    if fronts.metrics_port is not None:
        metrics = ServerContext(MetricsApp(build_registry(context.app.host)), context.executor,
                                connections(context.connections.options.read_timeout_s,
                                            context.connections.options.idle_timeout_s,
                                            context.connections.options.max_connections))
        metrics_server = await listen(metrics, host, fronts.metrics_port)
        started.push_async_callback(close, metrics_server, metrics)
        announce("metrics", host, metrics_server.sockets[0].getsockname()[1])


def build_parser(prog: str = "python -m servers.triton") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Triton-compatible KServe v2 server (HTTP, and gRPC with --grpc-port) hosting a Triton "
                    "model repository, or the built-in models (identity, identity_bytes, mlp) without one.",
        epilog="example: python -m servers.triton --model-repository ./models --http-port 8000 --grpc-port 8001",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--http-port", type=int, default=8000, help="HTTP port; 0 picks a free one (default 8000)")
    add("--grpc-port", type=int, default=None,
        help="serve gRPC (inference.GRPCInferenceService) on this port; 0 picks a free one "
             "(default: gRPC not served; Triton's port is 8001)")
    add("--grpc-use-ssl", type=_boolean, nargs="?", const=True, default=False, metavar="BOOL",
        help="serve gRPC over TLS only, with --grpc-server-cert and --grpc-server-key (default false)")
    add("--grpc-use-ssl-mutual", type=_boolean, nargs="?", const=True, default=False, metavar="BOOL",
        help="gRPC over TLS, and clients must present a certificate signed by --grpc-root-cert; "
             "implies --grpc-use-ssl (default false)")
    add("--grpc-server-cert", default=None, metavar="FILE",
        help="PEM file of the gRPC server's certificate (chain)")
    add("--grpc-server-key", default=None, metavar="FILE", help="PEM file of the gRPC server's private key")
    add("--grpc-root-cert", default=None, metavar="FILE",
        help="PEM file of the CA that client certificates must chain to (for --grpc-use-ssl-mutual)")
    add("--metrics-port", type=int, default=None,
        help="serve Prometheus metrics (Triton's nv_inference_* names) at http://HOST:PORT/metrics; "
             "0 picks a free one (default: not served; Triton's port is 8002)")
    add("--model-repository", default=None, metavar="PATH",
        help="Triton model repository folder (<model>/config.pbtxt, <model>/<version>/...); "
             "default: serve the built-in models")
    add("--model-control-mode", choices=("none", "explicit"), default="none",
        help="none: load every model at start, refuse load/unload; explicit: load only --load-model "
             "models, accept load/unload requests (default none)")
    add("--load-model", action="append", default=[], metavar="NAME",
        help="with --model-control-mode explicit: a model to load at start ('*' = all); repeatable")
    add("--allow-python-backend", action="store_true",
        help="load python backend models: the server imports and runs the model.py of a repository "
             "model, and of a load request that carries files (anyone who can reach the server with "
             "--model-control-mode explicit can then run code on it); default: refused, the model is "
             "UNAVAILABLE with the reason")
    add("--strict-readiness", type=_boolean, default=True, metavar="BOOL",
        help="server ready only when every model asked for is ready (default true)")
    add("--mlp-hidden", type=int, default=64, help="hidden size of the built-in mlp model (default 64)")
    add("--seed", type=int, default=0, help="seed of the built-in models' weights (default 0)")
    add("--http-read-timeout", type=float, default=READ_TIMEOUT_S, metavar="S",
        help="the deadline of an HTTP request's arrival: a request not complete S seconds after its first "
             "byte is cut off (its connection closed), however steadily it trickles in "
             f"(default {READ_TIMEOUT_S:g})")
    add("--http-idle-timeout", type=float, default=IDLE_TIMEOUT_S, metavar="S",
        help="close a kept-alive HTTP connection idle for S seconds between requests "
             f"(default {IDLE_TIMEOUT_S:g})")
    add_max_connections_flag(parser, " (per port)")
    add("--grpc-max-concurrent-rpcs", type=int, default=None, metavar="N",
        help="at most N gRPC calls in progress at once; a call beyond it fails at once with "
             "RESOURCE_EXHAUSTED (default: no cap)")
    add("--workers", type=int, default=4, help="threads for models that do not run inline (default 4)")
    return parser


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.model_repository is not None and not Path(args.model_repository).is_dir():
        problems.append(f"--model-repository {args.model_repository}: not a folder")
    if args.load_model and args.model_control_mode != "explicit":
        problems.append("--load-model needs --model-control-mode explicit")
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                       ("--metrics-port", args.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            problems.append(f"{flag} must be in 0..65535, got {port}")
    if args.grpc_port is not None and importlib.util.find_spec("tritonclient") is None:
        problems.append("--grpc-port needs the gRPC stubs of tritonclient: pip install 'tritonclient[grpc]'")
    problems += _tls_problems(args)
    if args.mlp_hidden < 1:
        problems.append(f"--mlp-hidden must be >= 1, got {args.mlp_hidden}")
    if not args.http_read_timeout > 0:
        problems.append(f"--http-read-timeout must be > 0, got {args.http_read_timeout}")
    if not args.http_idle_timeout > 0:
        problems.append(f"--http-idle-timeout must be > 0, got {args.http_idle_timeout}")
    problems += max_connections_problems(args.max_connections)
    problems += max_connections_problems(args.grpc_max_concurrent_rpcs, "--grpc-max-concurrent-rpcs")
    if args.grpc_max_concurrent_rpcs is not None and args.grpc_port is None:
        problems.append("--grpc-max-concurrent-rpcs needs --grpc-port")
    if args.workers < 1:
        problems.append(f"--workers must be >= 1, got {args.workers}")
    return problems


def _tls_problems(args: argparse.Namespace) -> list[str]:
    tls = args.grpc_use_ssl or args.grpc_use_ssl_mutual
    files = (("--grpc-server-cert", args.grpc_server_cert), ("--grpc-server-key", args.grpc_server_key),
             ("--grpc-root-cert", args.grpc_root_cert))
    if not tls:
        given = [flag for flag, path in files if path is not None]
        return [f"{' '.join(given)} needs --grpc-use-ssl"] if given else []
    needed = [("--grpc-server-cert", "--grpc-server-key")[index] for index, (_, path) in enumerate(files[:2])
              if path is None]
    if args.grpc_use_ssl_mutual and args.grpc_root_cert is None:
        needed.append("--grpc-root-cert")
    mode = "--grpc-use-ssl-mutual" if args.grpc_use_ssl_mutual else "--grpc-use-ssl"
    problems = [f"{mode} needs {flag}" for flag in needed]
    if args.grpc_port is None:
        problems.append("--grpc-use-ssl needs --grpc-port")
    for (flag, path), marker in zip(files, ("CERTIFICATE-----", "PRIVATE KEY-----", "CERTIFICATE-----")):
        if path is None:
            continue
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            problems.append(f"{flag} {path}: cannot read it: {exc.strerror or exc}")
            continue
        if b"-----BEGIN " not in text or marker.encode() not in text:
            problems.append(f"{flag} {path}: not a PEM file with a {marker.rstrip('-').lower()}")
    return problems


def _grpc_tls(args: argparse.Namespace) -> GrpcTls | None:
    """The TLS settings of the gRPC port from checked flags (_tls_problems), or None for plain gRPC."""
    if not (args.grpc_use_ssl or args.grpc_use_ssl_mutual):
        return None
    from servers.triton._grpc import GrpcTls

    root = Path(args.grpc_root_cert).read_bytes() if args.grpc_root_cert else None
    return GrpcTls(Path(args.grpc_server_cert).read_bytes(), Path(args.grpc_server_key).read_bytes(), root,
                   mutual=args.grpc_use_ssl_mutual)


def main(argv: Sequence[str] | None = None, prog: str = "python -m servers.triton") -> int:
    """Parse flags, serve until stopped; returns the exit code (2 for bad flags, 1 if it cannot listen)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    problems = _problems(args)
    if problems:
        parser.print_usage(sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    grpc_tls = _grpc_tls(args)
    models = _models(args)
    try:
        serve(models, args.host, args.http_port, _print_listening, workers=args.workers,
              grpc_port=args.grpc_port, metrics_port=args.metrics_port, front_ready=_print_front_listening,
              grpc_tls=grpc_tls, http_read_timeout_s=args.http_read_timeout,
              limits=Limits(args.http_idle_timeout, args.max_connections, args.grpc_max_concurrent_rpcs))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}: {exc}", file=sys.stderr)
        return 1
    return 0


def _models(args: argparse.Namespace) -> dict[str, Model] | ModelHost:
    if args.model_repository is None:
        return builtin_models(mlp_hidden=args.mlp_hidden, seed=args.seed)
    host = ModelHost(repository=Path(args.model_repository), control_mode=args.model_control_mode,
                     strict_readiness=args.strict_readiness, allow_python_backend=args.allow_python_backend)
    host.load_repository(None if args.model_control_mode == "none" else args.load_model)
    for row in host.index():
        if row.get("state") == "UNAVAILABLE":
            print(f"error: {row['reason']}", file=sys.stderr, flush=True)
    return host


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _print_listening(host: str, port: int) -> None:
    print(f"listening on http://{_shown(host)}:{port}", flush=True)


def _print_front_listening(front: str, host: str, port: int) -> None:
    scheme = "http://" if front == "metrics" else ""
    print(f"{front} listening on {scheme}{_shown(host)}:{port}", flush=True)


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
