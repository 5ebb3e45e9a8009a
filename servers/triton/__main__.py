"""Command line of the Triton-compatible server; its flags mirror tritonserver's.

    python -m servers.triton --http-port 0
    python -m servers.triton --http-port 8000 --mlp-hidden 256

Once listening it prints one line, `listening on http://HOST:PORT`, and flushes (tests and the demo
read it to learn the port when 0 was asked). SIGTERM or SIGINT stops it with exit code 0; bad flags
exit with code 2. Served now: HTTP with the built-in models. Accepted but not served yet: --grpc-port,
--metrics-port. Refused (exit 2): --model-repository.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from servers.core.model import Model
from servers.models.builtin import builtin_models
from servers.triton._app import TritonApp
from servers.triton._server import ServerContext, run_server

ReadyCallback = Callable[[str, int], None]


def serve(models: dict[str, Model], host: str = "127.0.0.1", port: int = 8000,
          ready_callback: ReadyCallback | None = None, workers: int = 4) -> None:
    """Serve `models` over HTTP until SIGTERM or SIGINT (signals are caught only in the main thread).

    Example:
        serve(builtin_models(), port=0, ready_callback=lambda host, port: print(host, port))
    """
    gc.collect()
    gc.freeze()  # what exists now lives as long as the server: a full collection must not walk it
    with ThreadPoolExecutor(workers, thread_name_prefix="infer") as executor:
        context = ServerContext(TritonApp(models), executor)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve_until_signal(context, host, port, ready_callback))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve_until_signal(context: ServerContext, host: str, port: int,
                              ready_callback: ReadyCallback | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await run_server(context, host, port, stop, ready_callback)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def build_parser(prog: str = "python -m servers.triton") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Triton-compatible KServe v2 HTTP server hosting the built-in models "
                    "(identity, identity_bytes, mlp).",
        epilog="example: python -m servers.triton --http-port 8000",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--http-port", type=int, default=8000, help="HTTP port; 0 picks a free one (default 8000)")
    add("--grpc-port", type=int, default=8001, help="gRPC port (accepted; gRPC is not served yet)")
    add("--metrics-port", type=int, default=8002, help="metrics port (accepted; metrics are not served yet)")
    add("--model-repository", default=None, metavar="PATH",
        help="model repository folder (not supported yet: only the built-in models are served)")
    add("--mlp-hidden", type=int, default=64, help="hidden size of the built-in mlp model (default 64)")
    add("--seed", type=int, default=0, help="seed of the built-in models' weights (default 0)")
    add("--workers", type=int, default=4, help="threads for models that do not run inline (default 4)")
    return parser


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.model_repository is not None:
        problems.append("model repositories are not supported yet; drop --model-repository "
                        "to serve the built-in models")
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                       ("--metrics-port", args.metrics_port)):
        if not 0 <= port <= 65535:
            problems.append(f"{flag} must be in 0..65535, got {port}")
    if args.mlp_hidden < 1:
        problems.append(f"--mlp-hidden must be >= 1, got {args.mlp_hidden}")
    if args.workers < 1:
        problems.append(f"--workers must be >= 1, got {args.workers}")
    return problems


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
    models = builtin_models(mlp_hidden=args.mlp_hidden, seed=args.seed)
    try:
        serve(models, args.host, args.http_port, _print_listening, workers=args.workers)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.http_port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_listening(host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown}:{port}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
