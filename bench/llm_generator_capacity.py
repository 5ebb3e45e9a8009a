"""LLM generator capacity: how many streamed completions a second, and tokens a second, loadgen's
`openai` protocol follows on one core, beside a `vllm bench serve`-style asyncio client.

Place in the flow: bench/generator_capacity.py measures the Driver -> Protocol client -> Recorder budget
for one-shot requests; a streamed completion costs the generator once per token chunk as well (a read,
an SSE parse, a timestamp), so its capacity is counted in streams/s *and* tokens/s.

The endpoint is the LLM engine simulator (servers/llm_sim) on a core of its own. It refuses a step of
zero time, so it runs with the smallest useful one: --decode-ms 1 and no per-sequence or prefill time,
a batch and KV budget no run reaches. Every stream of L tokens then takes about L ms; each step writes
one chunk to every running stream at once (as a continuous-batching engine does), and the server's CPU
and its own log's throughput are read at every step to show it is not what falls behind.

Side by side in one run, both tools pinned to the same core, against the same server:
- `loadgen run --protocol openai --rate R --arrival poisson` (16 output tokens, 32-word prompts);
- bench/_asyncio_sse_peer.py: what `vllm bench serve` does (Poisson send instants computed in advance,
  `await asyncio.sleep` until each, one task a request, aiohttp, SSE read line by line), on uvloop.
Both use seed 1, so both draw the very same Poisson schedule. They climb the same ladder of rates,
interleaved, each until its first step that fails the loose criterion below, then bisect once for each
criterion. A step is healthy when
    no errors, nothing dropped or unsent, completed streams/s within 2 % of the schedule's own rate
    (its Poisson draw of arrivals in the window: at these rates it strays more than 2 % from R itself),
    the server logged an arrival for every request sent, and the lag p99 (actual - intended send) is
    below 1 ms (strict) or 5 ms (loose).
The peer's event loop wakes its sleeps on millisecond timers (libuv's, or epoll's whole-ms timeouts for
plain asyncio), so its lag p99 is above 1 ms at any rate: the loose criterion is where the two compare
at equal lag. loadgen's own GENERATOR-BOUND verdict is reported beside them.

    .venv/bin/python bench/llm_generator_capacity.py            # ~2.5 minutes: 5 s steps
    .venv/bin/python bench/llm_generator_capacity.py --quick    # ~1 minute: 3 s steps, coarser ladder

Needs Linux, two cores and `taskset`; run it alone (flock /tmp/test.lock). Writes
bench/results/llm_generator_capacity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server_bench import (  # the bench folder's own helpers
    BENCH,
    BIN,
    ROOT,
    CpuTrace,
    ServerProcess,
    bisect_once,
    busy_host_note,
    climb_ladder,
    git_state,
    max_healthy_rate,
    pick_cores,
    run_child,
    start_server,
    write_json,
)

MODEL = "sim-llm"
SEED = 1  # the same Poisson draw for both tools
MAX_TOKENS = 16
INPUT_TOKENS = 32
DECODE_MS = 1.0
MAX_BATCH = 4096
KV_TOKENS = 10_000_000
LADDER = (100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1400, 1700, 2000)
QUICK_LADDER = (100, 300, 500, 800, 1100, 1400, 1800)
GRAIN = 50  # the bisection's step, streams/s
MAX_LAG_P99_MS = 1.0
LOOSE_LAG_P99_MS = 5.0
RATE_TOLERANCE = 0.02
TARGET_RATIO = 2.0
LOADGEN, PEER = "loadgen", "asyncio peer"


@dataclass
class Step:
    """One run of one tool at one rate; `cpu` and `server_cpu` are fractions of a core over its window."""

    tool: str
    target_rps: float
    duration_s: float
    scheduled: int  # arrivals the tool's schedule put in the window
    sent: int
    completed: int  # streams that ended successfully within the window
    achieved_rps: float
    tokens_per_s: float
    errors: int
    dropped: int  # loadgen: dropped + unsent; the peer never drops (it only falls behind)
    lag_p50_ms: float
    lag_p99_ms: float
    ttft_p99_ms: float | None  # from the actual send, as each tool measures it
    itl_p99_ms: float | None
    cpu: float
    server_cpu: float
    server_arrivals: int  # requests the server logged arriving in or after the window
    server_streams_per_s: float  # streams the server's log finished within the window
    server_tokens_per_s: float
    problems: list[str] = field(default_factory=list)  # every reason but the lag
    self_bound: list[str] = field(default_factory=list)  # loadgen's own GENERATOR-BOUND reasons

    def ok(self, max_lag_ms: float) -> bool:
        return not self.problems and self.lag_p99_ms < max_lag_ms

    @property
    def healthy(self) -> bool:
        return self.ok(MAX_LAG_P99_MS)

    @property
    def healthy_loose(self) -> bool:
        return self.ok(LOOSE_LAG_P99_MS)


def _strict(step: Step) -> bool:
    return step.healthy


def _loose(step: Step) -> bool:
    return step.healthy_loose


# -- the server -----------------------------------------------------------------------------------
def start_sim(core: int) -> ServerProcess:
    cmd = [sys.executable, "-m", "servers.llm_sim", "--port", "0", "--model", MODEL,
           "--max-batch", str(MAX_BATCH), "--kv-tokens", str(KV_TOKENS), "--decode-ms", f"{DECODE_MS:g}",
           "--decode-ms-per-seq", "0", "--prefill-ms-per-token", "0", "--max-tokens", str(MAX_TOKENS)]
    return start_server(cmd, core)


def take_log(server: ServerProcess) -> list[dict]:
    """Every request the server finished since the last call (GET /sim/log?clear=1)."""
    with urllib.request.urlopen(f"{server.url}/sim/log?clear=1", timeout=30) as response:
        return json.load(response)["requests"]


# -- the tools ------------------------------------------------------------------------------------
@dataclass
class Bench:
    server: ServerProcess
    duration_s: float
    core: int
    work: Path

    def _measure(self, name: str, cmd: list[str]) -> tuple[CpuTrace, list[dict]]:
        """Run `cmd` pinned; its CPU trace (and the server's), and the server's log of the run."""
        take_log(self.server)
        _, trace = run_child(cmd, self.core, self.duration_s + 90, self.work / f"{name}.log", self.server)
        return trace, take_log(self.server)

    def run_loadgen(self, rate: float) -> Step:
        name = f"loadgen-{rate:g}"
        out = self.work / name
        cmd = [str(BIN / "loadgen"), "run", "--protocol", "openai", "--target", self.server.url, "--model", MODEL,
               "--rate", f"{rate:g}", "--arrival", "poisson", "--seed", str(SEED),
               "--duration", f"{self.duration_s:g}s", "--max-tokens", str(MAX_TOKENS),
               "--input-tokens", str(INPUT_TOKENS), "--out", str(out), "-q"]
        trace, log = self._measure(name, cmd)
        summary = json.loads((out / "summary.json").read_text())
        clock = summary["clock"]
        server_cpu, cpu = trace.fractions(clock["start_epoch_s"], clock["start_epoch_s"] + summary["duration_s"])
        dropped = summary["dropped"] + summary.get("unsent", 0)
        return _step(LOADGEN, rate, summary, dropped, clock["start_monotonic_s"], cpu, server_cpu, log,
                     list(summary["generator"]["reasons"]))

    def run_peer(self, rate: float) -> Step:
        name = f"peer-{rate:g}"
        out = self.work / f"{name}.json"
        cmd = [sys.executable, str(BENCH / "_asyncio_sse_peer.py"), "--url", self.server.url, "--model", MODEL,
               "--rate", f"{rate:g}", "--duration", f"{self.duration_s:g}", "--seed", str(SEED),
               "--max-tokens", str(MAX_TOKENS), "--input-tokens", str(INPUT_TOKENS), "--out", str(out)]
        trace, log = self._measure(name, cmd)
        summary = json.loads(out.read_text())
        clock = summary["clock"]
        server_cpu, cpu = trace.fractions(clock["start_epoch_s"], clock["start_epoch_s"] + summary["duration_s"])
        return _step(PEER, rate, summary, 0, clock["start_monotonic_s"], cpu, server_cpu, log, [])


def _step(tool: str, rate: float, summary: dict, dropped: int, start: float, cpu: float, server_cpu: float,
          log: list[dict], self_bound: list[str]) -> Step:
    """A Step from a tool's summary (loadgen's summary.json and the peer's share these keys) and the
    server's log of the run; `start` is the window's start on time.monotonic()."""
    duration = summary["duration_s"]
    scheduled = summary["scheduled"] if "scheduled" in summary else summary["sent"] + dropped
    errors = sum(summary["errors"].values())
    arrivals = sum(1 for r in log if r["arrival"] >= start)
    finished = [r for r in log if start <= r["last_token"] <= start + duration]
    problems = []
    scheduled_rps = scheduled / duration
    if abs(summary["achieved_rps"] - scheduled_rps) > RATE_TOLERANCE * scheduled_rps:
        problems.append(f"achieved {summary['achieved_rps']:.1f}/s, schedule {scheduled_rps:.1f}/s")
    if errors:
        problems.append(f"errors {summary['errors']}")
    if dropped:
        problems.append(f"{dropped} dropped or unsent")
    if arrivals != summary["sent"]:
        problems.append(f"server logged {arrivals} arrivals, {tool} sent {summary['sent']}")
    lag = summary["lag_ms"]
    return Step(tool, rate, duration, scheduled, summary["sent"], summary["completed_in_window"],
                summary["achieved_rps"], summary["output_tokens_per_s"], errors, dropped, lag["p50"], lag["p99"],
                summary["ttft_ms"]["p99"], summary["itl_ms"]["p99"], round(cpu, 3), round(server_cpu, 3),
                arrivals, round(len(finished) / duration, 3),
                round(sum(r["output_tokens"] for r in finished) / duration, 3), problems, self_bound)


# -- report ---------------------------------------------------------------------------------------
HEADER = (f"{'tool':<13} {'target':>6} {'sched':>6} {'streams':>8} {'tokens':>7} {'lag p50':>7} {'lag p99':>7} "
          f"{'itl p99':>7} {'cpu':>5} {'server':>6} {'server':>8}  verdict\n"
          f"{'':<13} {'/s':>6} {'':>6} {'/s':>8} {'/s':>7} {'ms':>7} {'ms':>7} "
          f"{'ms':>7} {'core':>5} {'cpu':>6} {'log /s':>8}")


def announce(step: Step) -> Step:
    """Print the step's line as soon as it is measured."""
    if step.healthy:
        verdict = "healthy"
    elif step.healthy_loose:
        verdict = f"healthy at lag < {LOOSE_LAG_P99_MS:g} ms only"
    else:
        lag = [f"lag p99 >= {LOOSE_LAG_P99_MS:g} ms"] if step.lag_p99_ms >= LOOSE_LAG_P99_MS else []
        verdict = "UNHEALTHY: " + "; ".join(step.problems + lag)
    if step.self_bound:
        verdict += " (loadgen: GENERATOR-BOUND, " + "; ".join(step.self_bound) + ")"
    print(f"{step.tool:<13} {step.target_rps:>6.0f} {step.scheduled:>6} {step.achieved_rps:>8.1f} "
          f"{step.tokens_per_s:>7.0f} {step.lag_p50_ms:>7.3f} {step.lag_p99_ms:>7.3f} {_ms(step.itl_p99_ms)} "
          f"{step.cpu:>5.0%} {step.server_cpu:>6.0%} {step.server_streams_per_s:>8.1f}  {verdict}", flush=True)
    return step


def _ms(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:>7.3f}"


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def at_rate(steps: list[Step], rate: float) -> Step | None:
    """The step at `rate` (the latest, when a rate was run twice)."""
    found = [s for s in steps if s.target_rps == rate]
    return found[-1] if found else None


def _top(steps: list[Step], good: Callable[[Step], bool]) -> dict:
    rate = max_healthy_rate(steps, good)
    step = at_rate(steps, rate)
    if step is None:
        return {"streams_per_s": 0.0, "tokens_per_s": 0.0, "lag_p50_ms": None, "lag_p99_ms": None,
                "cpu": None, "server_cpu": None, "target_rps": 0.0}
    return {"target_rps": rate, "streams_per_s": step.achieved_rps, "tokens_per_s": step.tokens_per_s,
            "lag_p50_ms": step.lag_p50_ms, "lag_p99_ms": step.lag_p99_ms, "cpu": step.cpu,
            "server_cpu": step.server_cpu, "server_log_streams_per_s": step.server_streams_per_s,
            "server_log_tokens_per_s": step.server_tokens_per_s}


def summarize(steps: dict[str, list[Step]]) -> dict:
    """The highest healthy step of each tool by either lag bound, their ratios, loadgen's own verdict."""
    table = {}
    for bound, good in ((MAX_LAG_P99_MS, _strict), (LOOSE_LAG_P99_MS, _loose)):
        tops = {name: _top(tool_steps, good) for name, tool_steps in steps.items()}
        tops["ratio_loadgen_over_peer"] = _ratio(tops[LOADGEN]["streams_per_s"], tops[PEER]["streams_per_s"])
        table[f"lag_p99_below_{bound:g}_ms"] = tops
    unbound = max_healthy_rate(steps[LOADGEN], lambda s: not s.self_bound)
    bound_lag = table[f"lag_p99_below_{LOOSE_LAG_P99_MS:g}_ms"]
    first_bad = [s for tool_steps in steps.values() for s in tool_steps if not s.healthy_loose]
    table["loadgen_not_self_marked_bound_rps"] = unbound
    table["server_at_full_core_when_a_tool_failed"] = any(s.server_cpu > 0.95 for s in first_bad)
    table["target"] = {
        "goal": f"loadgen >= {TARGET_RATIO:g}x the peer's streams/s at equal lag",
        "at_lag_p99_below_ms": LOOSE_LAG_P99_MS,
        "met": (bound_lag["ratio_loadgen_over_peer"] or 0) >= TARGET_RATIO,
    }
    return table


def print_table(table: dict, settings: dict) -> None:
    print(f"\n== LLM generator capacity: generators on core {settings['generator_core']}, llm-sim (decode "
          f"{DECODE_MS:g} ms a step) on core {settings['server_core']}, {settings['duration_s']:g} s a step, "
          f"{MAX_TOKENS} tokens a stream ==")
    print(f"{'highest healthy step':<34} {'loadgen':>9} {'peer':>9} {'ratio':>7}")
    for bound in (MAX_LAG_P99_MS, LOOSE_LAG_P99_MS):
        tops = table[f"lag_p99_below_{bound:g}_ms"]
        ours, theirs = tops[LOADGEN], tops[PEER]
        print(f"lag p99 < {bound:g} ms: streams/s{'':<14} {ours['streams_per_s']:>9.1f} {theirs['streams_per_s']:>9.1f} "
              f"{_fmt_ratio(tops['ratio_loadgen_over_peer'])}")
        print(f"{'  tokens/s':<34} {ours['tokens_per_s']:>9.0f} {theirs['tokens_per_s']:>9.0f} "
              f"{_fmt_ratio(_ratio(ours['tokens_per_s'], theirs['tokens_per_s']))}")
        print(f"{'  lag p50 / p99, ms':<34} {_pair(ours)} {_pair(theirs)}")
        print(f"{'  generator / server CPU, core':<34} {_cpus(ours)} {_cpus(theirs)}")
    print(f"{'loadgen not GENERATOR-BOUND (own)':<34} {table['loadgen_not_self_marked_bound_rps']:>9.0f}")
    if table["server_at_full_core_when_a_tool_failed"]:
        print("note: the server was at a full core at a failing step: that step measured the server too")
    target = table["target"]
    print(f"  {'met   ' if target['met'] else 'MISSED'}  {target['goal']} (lag p99 < "
          f"{target['at_lag_p99_below_ms']:g} ms)")
    load = settings["load_average"]
    print(f"load average: {load['start']:.2f} at the start, {load['end']:.2f} at the end")


def _pair(top: dict) -> str:
    if top["lag_p50_ms"] is None:
        return f"{'-':>9}"
    return f"{top['lag_p50_ms']:.2f}/{top['lag_p99_ms']:.2f}".rjust(9)


def _cpus(top: dict) -> str:
    if top["cpu"] is None:
        return f"{'-':>9}"
    return f"{top['cpu']:.0%}/{top['server_cpu']:.0%}".rjust(9)


def _fmt_ratio(ratio: float | None) -> str:
    return f"{ratio:>7.3f}" if ratio is not None else f"{'-':>7}"


# -- main -----------------------------------------------------------------------------------------
def measure(bench: Bench, ladder: tuple[int, ...]) -> dict[str, list[Step]]:
    """The ladder, interleaved, to each tool's first step that fails the loose criterion; then one
    bisection for each criterion and tool."""
    runners = {LOADGEN: bench.run_loadgen, PEER: bench.run_peer}
    steps = climb_ladder(runners, ladder, announce, _loose)
    for name, run_step in runners.items():
        bisect_once(run_step, steps[name], announce, grain=GRAIN)
        bisect_once(run_step, steps[name], announce, _loose, grain=GRAIN)
    return steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s steps and a coarser ladder (~1.5 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per step (default 5, 3 with --quick)")
    parser.add_argument("--generator-core", type=int, help="core for loadgen and the peer")
    parser.add_argument("--server-core", type=int, help="core for llm-sim")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # loadgen, the peer and the server run from this tree, even where the venv's editable install
    # points at another checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    generator_core, server_core = pick_cores(args.generator_core, args.server_core)
    ladder = QUICK_LADDER if args.quick else LADDER
    note = busy_host_note()
    if note:
        print(note, flush=True)
    settings = {"duration_s": args.duration or (3.0 if args.quick else 5.0), "ladder": list(ladder),
                "generator_core": generator_core, "server_core": server_core,
                "server": {"decode_ms": DECODE_MS, "decode_ms_per_seq": 0, "prefill_ms_per_token": 0,
                           "max_batch": MAX_BATCH, "kv_tokens": KV_TOKENS},
                "max_tokens": MAX_TOKENS, "input_tokens": INPUT_TOKENS, "seed": SEED,
                "criteria": {"max_lag_p99_ms": MAX_LAG_P99_MS, "loose_lag_p99_ms": LOOSE_LAG_P99_MS,
                             "rate_tolerance": RATE_TOLERANCE},
                "python": platform.python_version(), "machine": platform.machine(), **git_state()}
    load_start, started = os.getloadavg()[0], time.monotonic()
    server = start_sim(server_core)
    try:
        with tempfile.TemporaryDirectory(prefix="llm-generator-capacity-") as work:
            bench = Bench(server, settings["duration_s"], generator_core, Path(work))
            print(f"llm-sim {server.url} on core {server_core}; generators on core {generator_core}\n{HEADER}",
                  flush=True)
            steps = measure(bench, ladder)
    finally:
        server.stop()
    settings["load_average"] = {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}
    settings["wall_s"] = round(time.monotonic() - started, 1)
    table = summarize(steps)
    print_table(table, settings)
    results = {**table, "settings": settings, "busy_host": note,
               "steps": {name: [{**asdict(s), "healthy": s.healthy, "healthy_loose": s.healthy_loose}
                                for s in tool_steps] for name, tool_steps in steps.items()}}
    path = write_json("llm_generator_capacity", results)
    print(f"\nwritten to {path.relative_to(ROOT)} ({settings['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
