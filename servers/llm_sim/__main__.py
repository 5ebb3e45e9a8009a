"""Command line of the LLM engine simulator (see servers/llm_sim/__init__.py for the engine's rules).

    python -m servers.llm_sim --port 0 --max-batch 4 --decode-ms 10
    python -m servers.llm_sim --port 8000 --max-batch 32 --prefill-ms-per-token 0.1 --decode-ms 12 \\
        --decode-ms-per-seq 0.2 --kv-tokens 65536 --model llama-3-8b --max-tokens 128

Once listening it prints one line, `listening on http://HOST:PORT`, and flushes (tests read it to learn
the port when 0 was asked). SIGTERM or SIGINT stops it with exit code 0; bad flags exit with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Sequence

from loadgen.lowlevel.precise_timer import PreciseScheduler
from servers.core.connection import add_max_connections_flag
from servers.llm_sim._app import DEFAULT_MODEL, SimApp, SimConfig
from servers.llm_sim._server import EngineClock, SimProtocol
from servers.llm_sim.engine import Engine, EngineConfig
from servers.openai_mock._server import (
    ServerContext,
    command_main,
    openai_connections,
    run_server,
    serve_until_signal,
)

ReadyCallback = Callable[[str, int], None]
_FLAGS = {"max_batch": "--max-batch", "prefill_ms_per_token": "--prefill-ms-per-token",
          "decode_ms_per_seq": "--decode-ms-per-seq", "decode_ms": "--decode-ms", "kv_tokens": "--kv-tokens",
          "max_tokens": "--max-tokens", "max_connections": "--max-connections"}
_FIELD = re.compile(rf"\b({'|'.join(_FLAGS)})\b")


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8000,
          ready_callback: ReadyCallback | None = None) -> None:
    """Run the simulator until SIGTERM or SIGINT (signals are caught only in the main thread)."""
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))

    async def serving(stop: asyncio.Event) -> None:
        scheduler = PreciseScheduler(asyncio.get_running_loop())
        engine = Engine(config.engine)
        clock = EngineClock(engine, scheduler)

        def make_context(t0: float) -> ServerContext:
            return ServerContext(SimApp(config, engine, t0=t0, pid=os.getpid()), scheduler,
                                 connections=openai_connections(config.max_connections))

        await run_server(make_context, host, port, stop, ready_callback,
                         protocol=lambda context: SimProtocol(context, clock))

    serve_until_signal(serving)


def build_parser(prog: str = "python -m servers.llm_sim") -> argparse.ArgumentParser:
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="OpenAI-compatible completions served by a simulated continuous-batching engine: "
                    "queueing, batch and KV limits, and step times follow exactly from these flags.",
        epilog="example: python -m servers.llm_sim --port 0 --max-batch 4 --decode-ms 10",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    add("--max-batch", type=int, default=defaults.max_batch,
        help=f"most sequences in one engine step (default {defaults.max_batch})")
    add("--prefill-ms-per-token", type=float, default=defaults.prefill_ms_per_token,
        help="step time per prompt token of the sequences a step admits "
             f"(default {defaults.prefill_ms_per_token})")
    add("--decode-ms", type=float, default=defaults.decode_ms,
        help=f"fixed time of every step (default {defaults.decode_ms})")
    add("--decode-ms-per-seq", type=float, default=defaults.decode_ms_per_seq,
        help=f"step time per sequence in the step (default {defaults.decode_ms_per_seq})")
    add("--kv-tokens", type=int, default=defaults.kv_tokens,
        help="KV budget: a running sequence holds its prompt + max_tokens tokens; a request larger than "
             f"the whole budget gets 400 (default {defaults.kv_tokens})")
    add("--max-tokens", type=int, default=16,
        help="tokens generated when a request gives no max_tokens (default 16)")
    add("--model", action="append", dest="models", metavar="NAME",
        help=f"a model name to serve (repeat for several; default {DEFAULT_MODEL}); others get 404")
    add("--keep-awake", action=argparse.BooleanOptionalAction, default=True,
        help="keep this server's CPUs out of deep idle with idle-priority spinners, so that the wake-up of "
             "an idle CPU does not delay the step ends (default on)")
    add_max_connections_flag(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[SimConfig, list[str]]:
    """The simulator config the flags describe, and every problem with them (named by flag)."""
    engine = EngineConfig(max_batch=args.max_batch, prefill_ms_per_token=args.prefill_ms_per_token,
                          decode_ms=args.decode_ms, decode_ms_per_seq=args.decode_ms_per_seq,
                          kv_tokens=args.kv_tokens)
    config = SimConfig(engine=engine, models=tuple(args.models or (DEFAULT_MODEL,)), max_tokens=args.max_tokens,
                       max_connections=args.max_connections)
    problems = [_FIELD.sub(lambda match: _FLAGS[match.group()], text) for text in config.problems()]
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    return config, problems


def main(argv: Sequence[str] | None = None, prog: str = "python -m servers.llm_sim") -> int:
    """Parse flags, serve until stopped; returns the exit code (2 for bad flags, 1 if it cannot listen)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    config, problems = config_from_args(args)
    return command_main(args, config, problems, parser, serve)


if __name__ == "__main__":
    sys.exit(main())
