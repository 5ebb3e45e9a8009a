"""Command line of the OpenAI-compatible mock: a streaming endpoint whose token timing is its flags.

    python -m servers.openai_mock --port 0 --ttft-ms 30 --itl-ms 10
    python -m servers.openai_mock --port 8000 --ttft-ms 200 --itl-ms 25 --model llama-3-8b --max-tokens 128
    python -m servers.openai_mock --port 0 --ttft-ms 30 --itl-ms 10 --truncate-every 10
    python -m servers.openai_mock --port 0 --ttft-ms 20,120 --itl-ms 5     (TTFT 20, 120, 20, ... ms per request)

Once listening it prints one line, `listening on http://HOST:PORT`, and flushes (tests read it to learn
the port when 0 was asked). SIGTERM or SIGINT stops it with exit code 0; bad flags exit with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from loadgen.lowlevel.precise_timer import PreciseScheduler
from servers.core.connection import add_max_connections_flag
from servers.openai_mock._app import DEFAULT_MODEL, MockApp, MockConfig
from servers.openai_mock._server import (
    ServerContext,
    command_main,
    openai_connections,
    run_server,
    serve_until_signal,
)

ReadyCallback = Callable[[str, int], None]
_FLAGS = {"ttft_ms": "--ttft-ms", "itl_ms": "--itl-ms", "max_tokens_limit": "--max-tokens-limit",
          "max_tokens": "--max-tokens", "truncate_every": "--truncate-every", "error_every": "--error-every",
          "embedding_dims": "--embedding-dims", "record_requests": "--record-requests",
          "max_connections": "--max-connections"}


def serve(config: MockConfig, host: str = "127.0.0.1", port: int = 8000,
          ready_callback: ReadyCallback | None = None) -> None:
    """Run the mock until SIGTERM or SIGINT (signals are caught only in the main thread)."""
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))

    async def serving(stop: asyncio.Event) -> None:
        scheduler = PreciseScheduler(asyncio.get_running_loop())

        def make_context(t0: float) -> ServerContext:
            app = MockApp(config, t0=t0, pid=os.getpid())
            return ServerContext(app, scheduler, config.ttft_ms / 1000.0, config.itl_ms / 1000.0,
                                 openai_connections(config.max_connections))

        await run_server(make_context, host, port, stop, ready_callback)

    serve_until_signal(serving)


def build_parser(prog: str = "python -m servers.openai_mock") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="OpenAI-compatible completions (/v1/chat/completions, /v1/completions, streamed or not) "
                    "with an exactly kept time to first token and inter-token latency.",
        epilog="example: python -m servers.openai_mock --port 0 --ttft-ms 30 --itl-ms 10",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    add("--ttft-ms", type=_milliseconds, default=(0.0,), metavar="MS[,MS...]",
        help="request arrival to its first token chunk (default 0); several, comma-separated, cycle per "
             "request in the order the server accepts them: 20,120 gives completion 1 20 ms, 2 120 ms, 3 20 ms, "
             "...; GET /mock lists each request's serial and ttft_ms")
    add("--itl-ms", type=float, default=0.0, help="between successive token chunks (default 0)")
    add("--max-tokens", type=int, default=16,
        help="tokens generated when a request gives no max_tokens (default 16)")
    add("--max-tokens-limit", type=int, default=4096,
        help="largest max_tokens accepted; above it: 400 (default 4096)")
    add("--model", action="append", dest="models", metavar="NAME",
        help=f"a model name to serve (repeat for several; default {DEFAULT_MODEL}); others get 404")
    add("--truncate-every", type=int, default=0, metavar="N",
        help="cut every Nth streamed response after half its tokens: connection closed, no [DONE] "
             "(default 0 = never)")
    add("--error-every", type=int, default=0, metavar="N",
        help="end every Nth streamed response after half its tokens with an error event (default 0 = never)")
    add("--embedding-dims", type=int, default=8, help="length of each /v1/embeddings vector (default 8)")
    add("--record-requests", type=int, default=0, metavar="N",
        help="keep the bodies of the first N accepted requests for GET /mock/requests (default 0)")
    add("--usage", action=argparse.BooleanOptionalAction, default=True,
        help="answers carry usage token counts (default on; --no-usage: never)")
    add_max_connections_flag(parser)
    add("--keep-awake", action=argparse.BooleanOptionalAction, default=True,
        help="keep this server's CPUs out of deep idle with idle-priority spinners, so that the wake-up of "
             "an idle CPU does not add to the declared delays (default on)")
    return parser


def _milliseconds(text: str) -> tuple[float, ...]:
    """"20" or "20,120" -> milliseconds (argparse reports a ValueError as a bad --ttft-ms, exit 2)."""
    values = tuple(float(part) for part in text.split(","))
    if not values:
        raise ValueError(text)
    return values


_milliseconds.__name__ = "milliseconds"  # argparse names the type in its error: "invalid milliseconds value"


def config_from_args(args: argparse.Namespace) -> tuple[MockConfig, list[str]]:
    """The mock config the flags describe, and every problem with them (named by flag)."""
    ttfts = tuple(args.ttft_ms)
    config = MockConfig(ttft_ms=ttfts[0], ttft_cycle_ms=ttfts if len(ttfts) > 1 else (), itl_ms=args.itl_ms, max_tokens=args.max_tokens,
                        max_tokens_limit=args.max_tokens_limit, models=tuple(args.models or (DEFAULT_MODEL,)),
                        truncate_every=args.truncate_every, error_every=args.error_every,
                        embedding_dims=args.embedding_dims, record_requests=args.record_requests, usage=args.usage,
                        max_connections=args.max_connections)
    problems = []
    for text in config.problems():
        for name, flag in _FLAGS.items():
            if text.startswith(name + " "):
                text = flag + text[len(name):]
                break
        problems.append(text.replace("max_tokens_limit", "--max-tokens-limit"))
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    return config, problems


def main(argv: Sequence[str] | None = None, prog: str = "python -m servers.openai_mock") -> int:
    """Parse flags, serve until stopped; returns the exit code (2 for bad flags, 1 if it cannot listen)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    config, problems = config_from_args(args)
    return command_main(args, config, problems, parser, serve)


if __name__ == "__main__":
    sys.exit(main())
