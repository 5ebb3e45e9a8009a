"""A `vllm bench serve`-style open-loop client for streamed chat completions: the peer of
bench/llm_generator_capacity.py.

What vLLM's benchmark client does, in one self-contained file: Poisson send instants computed before
the run (gamma gaps of shape 1, as `--request-rate R --burstiness 1`), one loop that sleeps
(`await asyncio.sleep`) until each instant and starts one task per request, each task POSTing a
streamed chat completion on one shared aiohttp session and reading the Server-Sent Events line by line
(`async for line in response.content`, `json.loads` of each `data:` line, as vLLM's
async_request_openai_chat_completions). The event loop is uvloop's when it is installed (--loop asyncio
gives the plain loop that `vllm bench serve` itself runs on: its sleeps wake later, lag p50 ~0.4 ms
against ~0.15 ms, for about the same CPU, so uvloop is the stronger peer). guidellm, the other such
client, needs torch, transformers, datasets and a tokenizer from the Hugging Face hub: not runnable here.

Per request it keeps the intended send instant, the actual one (when the task calls `session.post`, the
instant vLLM stamps as the request's start), TTFT and ITL from that actual send (as vLLM measures them),
the token chunks and the usage count. Its lag is actual - intended send. It writes one JSON summary:

    python bench/_asyncio_sse_peer.py --url http://127.0.0.1:8000 --model sim-llm --rate 100 \\
        --duration 5 --max-tokens 16 --input-tokens 32 --out peer.json

Counts mirror loadgen's summary.json: `scheduled` sends in the window, `completed_in_window` streams that
ended (successfully) by its end, `achieved_rps` = completed_in_window / duration, `output_tokens_per_s`
the tokens of those streams / duration. Times are time.monotonic() seconds (vLLM's perf_counter is the
same CLOCK_MONOTONIC on Linux), so they compare with a server's log on the same host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional, as in vLLM
    uvloop = None

TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)  # vLLM's AIOHTTP_TIMEOUT
WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be", "this",
         "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when")


@dataclass
class Record:
    """One request as the peer saw it."""

    intended: float
    sent: float = 0.0
    done: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    usage_tokens: int | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


def send_times(rate: float, duration_s: float, seed: int) -> list[float]:
    """Offsets (s) from the start of every send in [0, duration): gamma(1) = exponential gaps."""
    rng = np.random.default_rng(seed)
    expected = int(rate * duration_s)
    gaps = rng.gamma(shape=1.0, scale=1.0 / rate, size=expected + 10 * int(expected ** 0.5) + 100)
    offsets = np.cumsum(gaps)
    return offsets[offsets < duration_s].tolist()


def payloads(model: str, input_tokens: int, max_tokens: int, seed: int, count: int = 256) -> list[dict]:
    """Distinct chat requests of `input_tokens` words each (the server counts a word a token)."""
    rng = np.random.default_rng(seed)
    return [{"model": model,
             "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS, input_tokens).tolist())}],
             "temperature": 0.0, "max_completion_tokens": max_tokens, "stream": True,
             "stream_options": {"include_usage": True}}
            for _ in range(count)]


async def one_request(session: aiohttp.ClientSession, url: str, payload: dict, record: Record) -> None:
    """POST one streamed chat completion and read its events, as vLLM's chat request function does."""
    record.sent = most_recent = time.monotonic()
    try:
        async with session.post(url, json=payload, headers={"Accept": "text/event-stream"}) as response:
            if response.status != 200:
                record.error = f"http_{response.status}"
                await response.read()
                return
            done = False
            async for line in response.content:
                line = line.strip()
                if not line:
                    continue
                data = line.decode("utf-8").removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if choices := chunk.get("choices"):
                    if choices[0]["delta"].get("content"):
                        now = time.monotonic()
                        if record.ttft is None:
                            record.ttft = now - record.sent
                        else:
                            record.itl.append(now - most_recent)
                        most_recent = now
                        record.chunks += 1
                elif usage := chunk.get("usage"):
                    record.usage_tokens = usage.get("completion_tokens")
            if not done:
                record.error = "stream_truncated"
    except Exception as exc:  # noqa: BLE001 - counted by kind, the run goes on
        record.error = type(exc).__name__
    finally:
        record.done = time.monotonic()


async def run(args: argparse.Namespace) -> dict:
    offsets = send_times(args.rate, args.duration, args.seed)
    bodies = payloads(args.model, args.input_tokens, args.max_tokens, args.seed)
    url = args.url.rstrip("/") + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, trust_env=False) as session:
        for body in bodies[:2]:  # warm-up, unmeasured (loadgen sends two as well)
            await one_request(session, url, body, Record(0.0))
        cpu0 = _cpu_s()
        start = time.monotonic()
        start_epoch = time.time()
        records = [Record(start + offset) for offset in offsets]
        tasks = []
        for i, record in enumerate(records):
            delay = record.intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, url, bodies[i % len(bodies)], record)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.duration + 60)
        cpu = (_cpu_s() - cpu0) / (time.monotonic() - start)
    return summarize(records, start, start_epoch, args, cpu)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _quantiles_ms(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(p50 * 1e3, 3), "p99": round(p99 * 1e3, 3), "max": round(max(values) * 1e3, 3)}


def summarize(records: list[Record], start: float, start_epoch: float, args: argparse.Namespace,
              cpu: float) -> dict:
    end = start + args.duration
    ok = [r for r in records if r.error is None]
    in_window = [r for r in ok if r.done <= end]
    errors = Counter(r.error for r in records if r.error is not None)
    return {
        "tool": "asyncio+aiohttp SSE peer (vllm bench serve style)",
        "event_loop": args.loop,
        "offered_rps": args.rate,
        "duration_s": args.duration,
        "scheduled": len(records),
        "sent": sum(1 for r in records if r.sent),
        "completed": len(ok),
        "completed_in_window": len(in_window),
        "achieved_rps": round(len(in_window) / args.duration, 3),
        "errors": dict(errors),
        "lag_ms": _quantiles_ms([r.sent - r.intended for r in records]),
        "ttft_ms": _quantiles_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _quantiles_ms([gap for r in ok for gap in r.itl]),
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tokens_per_s": round(sum(r.output_tokens for r in in_window) / args.duration, 3),
        "cpu_fraction": round(cpu, 3),
        "clock": {"start_monotonic_s": start, "start_epoch_s": start_epoch},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the OpenAI-compatible server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--rate", type=float, required=True, help="Poisson requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds of sends")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop" if uvloop else "asyncio",
                        help="event loop (default uvloop when installed)")
    parser.add_argument("--out", type=Path, required=True, help="JSON summary to write")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.rate <= 0 or args.duration <= 0:
        raise SystemExit("--rate and --duration must be > 0")
    if args.loop == "uvloop" and uvloop is None:
        raise SystemExit("--loop uvloop: uvloop is not installed")
    summary = uvloop.run(run(args)) if args.loop == "uvloop" else asyncio.run(run(args))
    summary["pid"] = os.getpid()
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
