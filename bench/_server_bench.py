"""What the server benchmarks share: pinned processes, the Triton-compatible server, perf_analyzer and
loadgen runs, the server's own statistics and CPU time.

The rate search of the generator benchmarks (bench/generator_capacity.py, bench/llm_generator_capacity.py)
is here too: a ladder climbed by every tool, interleaved, then one bisection.

bench/server_efficiency.py and bench/server_overhead.py measure the reference server (servers/triton)
rather than the generator, so the server gets a core of its own and every client runs on the other
(DESIGN.md, timing traps); each measured step also reads how much of its core the server and the
client used over the client's own measurement window, which says which of them was the bottleneck.

perf_analyzer (NVIDIA's C++ KServe client, tritonclient 2.41.0) comes from $LOADGEN_PERF_ANALYZER or
.peers/perf_analyzer/perf_analyzer; ../shared/peers/perf_analyzer.sh installs it there.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
RESULTS = BENCH / "results"
PERF_ANALYZER_ENV = "LOADGEN_PERF_ANALYZER"

WINDOW_MS = 1000
STABILITY_PERCENT = 1000
"""perf_analyzer repeats a level until three windows agree within this many percent and gives up with
no report after --max-trials. The benchmarks rather take the mean of exactly three windows a level
and show run-to-run spread by measuring every configuration in two interleaved rounds."""
SAMPLE_S = 0.05
_TICKS = os.sysconf("SC_CLK_TCK")


def pick_cores(generator_core: int | None, server_core: int | None) -> tuple[int, int]:
    """(client core, server core): the first two this process may run on, unless given."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("this benchmark needs two cores: one for the clients, one for the server")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin the clients and the server")
    client = allowed[0] if generator_core is None else generator_core
    server = allowed[1] if server_core is None else server_core
    if client == server:
        raise SystemExit(f"the clients and the server need different cores, both got {client}")
    return client, server


def perf_analyzer_binary() -> str:
    """The perf_analyzer wrapper to run; exits with how to install it when there is none."""
    given = os.environ.get(PERF_ANALYZER_ENV)
    candidate = given or str(ROOT / ".peers" / "perf_analyzer" / "perf_analyzer")
    try:
        done = subprocess.run([candidate, "--version"], check=False, capture_output=True, timeout=30)
        ok = done.returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise SystemExit(f"perf_analyzer not found at {candidate}: install it with `../shared/peers/"
                         f"perf_analyzer.sh .peers/perf_analyzer` or set ${PERF_ANALYZER_ENV}")
    return candidate


# -- processes ------------------------------------------------------------------------------------
@dataclass
class ServerProcess:
    """A server child pinned to one core, with the addresses it printed (host:port, no scheme)."""

    proc: subprocess.Popen
    http: str
    grpc: str

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(cmd: list[str], core: int, timeout_s: float = 30.0) -> ServerProcess:
    """Start `cmd` pinned to `core`; it prints `grpc listening on H:P` and then `listening on http://H:P`."""
    proc = subprocess.Popen(["taskset", "-c", str(core), *cmd], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    grpc = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("grpc listening on "):
            grpc = line.split()[-1]
        elif line.startswith("listening on http://"):
            return ServerProcess(proc, line.split()[-1].removeprefix("http://"), grpc)
        elif not line and proc.poll() is not None:
            break
    ServerProcess(proc, "", "").stop()
    raise SystemExit(f"{' '.join(cmd)} did not start")


def start_triton(core: int, repository: Path | None = None) -> ServerProcess:
    """The Triton-compatible server, HTTP and gRPC on free ports: its built-in models, or the models of
    `repository` (--model-repository)."""
    cmd = [sys.executable, "-m", "servers.triton", "--http-port", "0", "--grpc-port", "0"]
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    return start_server(cmd, core, timeout_s=120.0)


def model_stats(server: ServerProcess, model: str) -> dict:
    """The model's entry of the statistics extension (GET /v2/models/MODEL/stats)."""
    with urllib.request.urlopen(f"{server.url}/v2/models/{model}/stats", timeout=5) as response:
        (stats,) = json.load(response)["model_stats"]
    return stats


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (all its threads); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuTrace(threading.Thread):
    """CPU seconds of the server and of the client, with the wall clock, every SAMPLE_S while a client
    runs: the CPU either used over the client's own measurement window (start-up and warm-up left out)."""

    def __init__(self, server_pid: int, client_pid: int) -> None:
        super().__init__(daemon=True)
        self._pids = (server_pid, client_pid)
        self._done = threading.Event()
        self.samples: list[tuple[float, float, float]] = []  # (epoch s, server cpu s, client cpu s)
        self._sample()

    def _sample(self) -> bool:
        server, client = (cpu_seconds(pid) for pid in self._pids)
        if server is None or client is None:
            return False
        self.samples.append((time.time(), server, client))
        return True

    def run(self) -> None:
        while not self._done.wait(SAMPLE_S) and self._sample():
            pass

    def stop(self) -> None:
        self._done.set()
        self.join()

    def fractions(self, start: float, end: float) -> tuple[float, float]:
        """(server, client) fraction of a core used from epoch second `start` to `end` (interpolated)."""
        def at(t: float, index: int) -> float:
            times = [sample[0] for sample in self.samples]
            i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
            (t0, *v0), (t1, *v1) = self.samples[i - 1], self.samples[i]
            return v0[index] + (v1[index] - v0[index]) * (t - t0) / (t1 - t0)

        if len(self.samples) < 2 or end <= start:
            return float("nan"), float("nan")
        return tuple((at(end, i) - at(start, i)) / (end - start) for i in (0, 1))


def run_child(cmd: list[str], core: int, timeout_s: float, log: Path, server: ServerProcess,
              ok: tuple[int, ...] = (0,)) -> tuple[int, CpuTrace]:
    """Run `cmd` pinned to `core`, output to `log`, tracing its CPU and the server's; returns its exit
    code and the trace. Exits with the log's tail when the code is not in `ok`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(["taskset", "-c", str(core), *cmd], cwd=log.parent, stdout=out,
                                stderr=subprocess.STDOUT)
        trace = CpuTrace(server.proc.pid, proc.pid)
        trace.start()
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(f"{cmd[0]} ran past {timeout_s:.0f} s:\n{log.read_text()[-2000:]}") from None
        finally:
            trace.stop()
    if server.proc.poll() is not None:
        raise SystemExit(f"the server exited (code {server.proc.returncode}): {' '.join(server.proc.args)}")
    if code not in ok:
        raise SystemExit(f"{' '.join(cmd)}\nexited with {code}:\n{log.read_text()[-2000:]}")
    return code, trace


# -- clients --------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One client run at one load level: what the client achieved over its measurement window, the CPU
    the server and the client used in that window, and what the server counted over the whole run."""

    client: str  # "perf_analyzer" or "loadgen"
    protocol: str  # "http" or "grpc"
    level: int  # concurrency (perf_analyzer) or closed-loop users (loadgen)
    batch: int  # rows per request the client sent
    requests_per_s: float
    p99_ms: float
    server_cpu: float  # fraction of a core
    client_cpu: float  # fraction of a core
    server: dict  # statistics deltas over the run (empty when the server keeps none)

    @property
    def inferences_per_s(self) -> float:
        return self.requests_per_s * self.batch

    @property
    def server_cpu_us_per_request(self) -> float:
        return self.server_cpu / self.requests_per_s * 1e6


@dataclass
class Clients:
    """Runs the clients on one core against a server, measuring the server around each run."""

    perf_analyzer: str
    core: int
    work: Path

    def perf_analyzer_run(self, server: ServerProcess, model: str, protocol: str, concurrency: int,
                          batch: int = 1, extra: tuple[str, ...] = (),
                          stats_model: str | None = None) -> Measured | None:
        """perf_analyzer at one concurrency, three windows of WINDOW_MS; `extra` adds flags. None when
        perf_analyzer found no stable measurement (exit 2): throughput swung more than STABILITY_PERCENT
        between windows, which only a host that stalls the client or server for long does."""
        name = f"pa-{server.proc.pid}-{model}-{protocol}-c{concurrency}-b{batch}"
        report, export = self.work / f"{name}.csv", self.work / f"{name}.json"
        for earlier in (report, export):  # an earlier round's; perf_analyzer refuses to overwrite an export
            earlier.unlink(missing_ok=True)
        address = server.http if protocol == "http" else server.grpc
        cmd = [self.perf_analyzer, "-m", model, "-u", address, "-i", protocol, "-b", str(batch),
               "--concurrency-range", str(concurrency), "--measurement-interval", str(WINDOW_MS),
               "--stability-percentage", str(STABILITY_PERCENT), "--max-trials", "4", *extra,
               "-f", str(report), "--profile-export-file", str(export)]
        before = model_stats(server, stats_model) if stats_model else None
        code, trace = run_child(cmd, self.core, 60, self.work / f"{name}.log", server, ok=(0, 2))
        if code == 2:
            print(f"perf_analyzer {protocol} at concurrency {concurrency}: no stable measurement, "
                  f"step left out", flush=True)
            return None
        with open(report, newline="") as rows:
            (row,) = list(csv.DictReader(rows))
        (experiment,) = json.loads(export.read_text())["experiments"]
        bounds = experiment["window_boundaries"]
        server_cpu, client_cpu = trace.fractions(bounds[0] / 1e9, bounds[-1] / 1e9)
        requests_per_s = float(row["Inferences/Second"]) / batch
        return Measured("perf_analyzer", protocol, concurrency, batch, requests_per_s,
                        float(row["p99 latency"]) / 1000, server_cpu, client_cpu,
                        _delta(server, stats_model, before))

    def loadgen_run(self, server: ServerProcess, model: str, users: int, duration_s: float,
                    stats_model: str | None = None, protocol: str = "http", batch: int = 1) -> Measured:
        """`loadgen run --users N --think none` (closed loop) for `duration_s`: over HTTP with binary tensors
        (`protocol` "http": the default against a server with the extension) or JSON tensors ("http-json"),
        or raw tensors over gRPC ("grpc", --protocol kserve-grpc); `batch` rows per request (--batch-size)."""
        out = self.work / f"lg-{server.proc.pid}-{model}-{protocol}-u{users}-b{batch}"
        target = f"grpc://{server.grpc}" if protocol == "grpc" else server.url
        cmd = [str(BIN / "loadgen"), "run", "--target", target, "--model", model, "--users", str(users),
               "--think", "none", "--duration", f"{duration_s:g}s", "--out", str(out), "-q"]
        if protocol == "grpc":
            cmd += ["--protocol", "kserve-grpc"]
        elif protocol == "http-json":
            cmd += ["--tensor-format", "json"]
        if batch > 1:
            cmd += ["--batch-size", str(batch)]
        before = model_stats(server, stats_model) if stats_model else None
        _, trace = run_child(cmd, self.core, duration_s + 60, self.work / f"{out.name}.log", server)
        summary = json.loads((out / "summary.json").read_text())
        if summary["errors"]:
            raise SystemExit(f"loadgen saw errors against {target}: {summary['errors']}")
        start = summary["clock"]["start_epoch_s"]
        server_cpu, client_cpu = trace.fractions(start, start + summary["duration_s"])
        return Measured("loadgen", protocol, users, batch, summary["achieved_rps"], summary["service_ms"]["p99"],
                        server_cpu, client_cpu, _delta(server, stats_model, before))


def _delta(server: ServerProcess, model: str | None, before: dict | None) -> dict:
    return stats_delta(before, model_stats(server, model)) if model and before else {}


def stats_delta(before: dict, after: dict) -> dict:
    """Counts and per-stage nanoseconds the server added between two statistics snapshots, and the
    nanoseconds its model executions took (execution_infer_ns: each execution once, where a request's
    compute_infer counts the whole execution it was part of)."""
    stages = {key: {"count": after["inference_stats"][key]["count"] - value["count"],
                    "ns": after["inference_stats"][key]["ns"] - value["ns"]}
              for key, value in before["inference_stats"].items()}
    return {"inference_count": after["inference_count"] - before["inference_count"],
            "execution_count": after["execution_count"] - before["execution_count"],
            "execution_infer_ns": _execution_ns(after) - _execution_ns(before), **stages}


def _execution_ns(stats: dict) -> int:
    return sum(entry["compute_infer"]["ns"] for entry in stats.get("batch_stats", []))


def write_json(name: str, results: dict) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def busy_host_note(cores: int = 2) -> str:
    """A warning line when other work may have kept the host busy (1-minute load above the cores the
    benchmark uses): then the figures may be lower bounds. Empty when the host looked quiet. The load
    average also counts the idle-priority CPU spinners the generators and servers run (keep_awake),
    always runnable though they yield at once, so a high figure is a hint to look, not proof."""
    load = os.getloadavg()[0]
    if load <= cores + 0.5:
        return ""
    return (f"NOTE: load average {load:.1f} on a benchmark that needs {cores} quiet cores (idle-priority "
            f"spinners count in it too): if other processes shared them, the figures are lower bounds")


def git_state() -> dict:
    """The commit measured and whether the server or generator code differed from it."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], check=False, cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--", "loadgen", "servers")),
            "load_average_at_start": round(os.getloadavg()[0], 2)}


# -- the rate search ------------------------------------------------------------------------------
class RateStep(Protocol):
    """One measured step of an open-loop tool at one rate."""

    target_rps: float

    @property
    def healthy(self) -> bool: ...


S = TypeVar("S", bound=RateStep)


def _healthy(step: RateStep) -> bool:
    return step.healthy


def climb_ladder(runners: dict[str, Callable[[float], S]], ladder: tuple[int, ...], announce: Callable[[S], S],
                 good: Callable[[S], bool] = _healthy) -> dict[str, list[S]]:
    """Each tool climbs the ladder, interleaved rate by rate (so the tools meet the same host), until its
    first step that is not `good`; `announce` prints each step as it is measured."""
    steps: dict[str, list[S]] = {name: [] for name in runners}
    climbing = dict(runners)
    for rate in ladder:
        for name, run_step in list(climbing.items()):
            step = announce(run_step(rate))
            steps[name].append(step)
            if not good(step):
                del climbing[name]
        if not climbing:
            break
    return steps


def bisect_once(run_step: Callable[[float], S], steps: list[S], announce: Callable[[S], S],
                good: Callable[[S], bool] = _healthy, grain: int = 100) -> None:
    """One more step halfway (to `grain`) between the highest good and the lowest not-good rate."""
    high = min((s.target_rps for s in steps if not good(s)), default=None)
    low = max_healthy_rate(steps, good)
    if high is None or not low:
        return
    middle = round((low + high) / 2 / grain) * grain
    if low < middle < high and all(s.target_rps != middle for s in steps):
        steps.append(announce(run_step(middle)))


def max_healthy_rate(steps: list[S], good: Callable[[S], bool] = _healthy) -> float:
    """The highest good rate below every rate that was not good (0 when none)."""
    lowest_bad = min((s.target_rps for s in steps if not good(s)), default=float("inf"))
    return max((s.target_rps for s in steps if good(s) and s.target_rps < lowest_bad), default=0.0)
