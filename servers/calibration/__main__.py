"""Command line of the calibration server: a KServe v2 endpoint whose true latency is its flags.

    python -m servers.calibration --port 0 --delay-ms 20
    python -m servers.calibration --port 0 --stall-every 2 --stall-for 0.3 --delay-ms 5
    python -m servers.calibration --port 0 --service-ms 10 --workers 4

Once listening it prints one line, `listening on http://HOST:PORT`, and flushes (tests and the demo
read it to learn the port when 0 was asked). SIGTERM or SIGINT stops it with exit code 0; bad flags
exit with code 2. GET /calibration reports the declared timing and t0 for computing the truth with
servers/calibration/timing.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Sequence

from loadgen.lowlevel.keepawake import KeepAwake
from loadgen.lowlevel.precise_timer import PreciseScheduler
from loadgen.lowlevel.timerfd import reduce_timer_slack
from servers.calibration._app import CalibrationApp, ServerConfig, error_reply
from servers.calibration._server import ServerContext, run_server
from servers.calibration.timing import TimingConfig, TimingModel
from servers.core.connection import add_max_connections_flag, capped_connections

ReadyCallback = Callable[[str, int], None]
# Problems name config fields; on the command line, show the flag that sets each one.
_FLAGS = {
    "delay_ms": "--delay-ms", "stall_every_s": "--stall-every", "stall_for_s": "--stall-for",
    "service_ms": "--service-ms", "workers": "--workers", "shape": "--shape", "datatype": "--datatype",
    "max_connections": "--max-connections",
}
_FIELD_NAME = re.compile(r"\b(?:" + "|".join(_FLAGS) + r")\b")


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          ready_callback: ReadyCallback | None = None, tls: ssl.SSLContext | None = None) -> None:
    """Run the calibration server until SIGTERM or SIGINT (signals are caught only in the main thread).

    Example:
        serve(ServerConfig(TimingConfig(delay_ms=20)), port=0,
              ready_callback=lambda host, port: print(f"listening on {host}:{port}"))
    """
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    reduce_timer_slack()
    # What exists now lives as long as the server: a full collection must not walk it mid-request.
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve_until_signal(config, host, port, ready_callback, tls))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve_until_signal(config: ServerConfig, host: str, port: int,
                              ready_callback: ReadyCallback | None, tls: ssl.SSLContext | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)

    def make_context(t0: float) -> ServerContext:
        app = CalibrationApp(config, t0=t0, pid=os.getpid())
        return ServerContext(app, TimingModel(config.timing, t0), PreciseScheduler(loop),
                             capped_connections(config.max_connections, lambda reason: error_reply(503, reason).body))

    try:
        await run_server(make_context, host, port, stop, ready_callback, tls)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def build_parser(prog: str = "python -m servers.calibration") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="KServe v2 HTTP endpoint with a declared, precisely kept latency (identity model).",
        epilog="example: python -m servers.calibration --port 0 --delay-ms 20",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    add("--delay-ms", type=float, default=0.0, help="fixed latency from arrival to answer (default 0)")
    add("--stall-every", type=float, default=0.0, metavar="S",
        help="stall during [t0+k*S, t0+k*S+T) for k = 1, 2, ... (seconds; default 0 = never)")
    add("--stall-for", type=float, default=0.0, metavar="T", help="length of each stall window (seconds)")
    add("--service-ms", type=float, default=0.0,
        help="FIFO workers with this fixed service time replace --delay-ms (default 0 = off)")
    add("--workers", type=int, default=1, help="number of FIFO workers for --service-ms (default 1)")
    add("--shape", default="16", help="tensor shape after the batch dimension, e.g. 16 or 3,224,224")
    add("--datatype", default="FP32", help="tensor datatype in metadata and answers (default FP32)")
    add("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate (with --tls-key)")
    add("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    add("--keep-awake", action=argparse.BooleanOptionalAction, default=True,
        help="keep this server's CPUs out of deep idle with idle-priority spinners, so that the "
             "wake-up of an idle CPU does not add to the declared latency (default on)")
    add_max_connections_flag(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[ServerConfig, list[str]]:
    """The server config the flags describe, and every problem with them."""
    problems = []
    try:
        shape = tuple(int(part) for part in args.shape.split(","))
    except ValueError:
        problems.append(f"--shape must be comma-separated integers, got {args.shape!r}")
        shape = (1,)
    timing = TimingConfig(delay_ms=args.delay_ms, stall_every_s=args.stall_every, stall_for_s=args.stall_for,
                          service_ms=args.service_ms, workers=args.workers)
    config = ServerConfig(timing=timing, shape=shape, datatype=args.datatype.upper(),
                          max_connections=args.max_connections)
    problems += [_FIELD_NAME.sub(lambda m: _FLAGS[m.group(0)], text) for text in config.problems()]
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    if (args.tls_cert is None) != (args.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    return config, problems


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def main(argv: Sequence[str] | None = None, prog: str = "python -m servers.calibration") -> int:
    """Parse flags, serve until stopped; returns the exit code (2 for bad flags, 1 if it cannot listen)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    config, problems = config_from_args(args)
    if problems:
        parser.print_usage(sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        tls = _tls_context(args)
    except (OSError, ssl.SSLError) as exc:
        print(f"error: --tls-cert/--tls-key: {exc}", file=sys.stderr)
        return 2
    try:
        with KeepAwake(os.sched_getaffinity(0) if args.keep_awake else ()):
            serve(config, args.host, args.port, _print_https if tls else _print_listening, tls)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_listening(host: str, port: int, scheme: str = "http") -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on {scheme}://{shown}:{port}", flush=True)


def _print_https(host: str, port: int) -> None:
    _print_listening(host, port, "https")


if __name__ == "__main__":
    sys.exit(main())
