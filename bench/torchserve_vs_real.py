"""The TorchServe-compatible server beside the real TorchServe 0.12.0, on the same model and settings.

Place in the flow: servers/torchserve answers TorchServe's APIs from .mar archives with TorchServe's
own handler code (the `ts` package) run in worker processes, as TorchServe does; this benchmark says
how its throughput and tail latency compare with the server it stands in for. Both serve the same
archive, the captures' MLP (784-512-512-10, TorchScript, models/float_handler.py of
../shared/torchserve-captures, archived here with the real torch-model-archiver), with the same
settings: 2 workers, batch_size 8, max_batch_delay 5 ms, OMP_NUM_THREADS=1 (the real server's best
configuration on this kind of host, about 2,660 req/s at 32 clients per the captures' README).

The client is the same for both: a closed loop of N keep-alive HTTP/1.1 connections (one process,
uvloop), each posting the captures' JSON input (784 floats) to /predictions/mlp and sending the next
request as soon as the answer is in; it counts answers completed in a measurement window after a
warm-up and takes latency percentiles over them. Every answer must be 200; one answer per step is
compared with the model run in this process. Concurrency 1, 8, 32 and 64, both servers running
side by side all along, steps alternating between them, in two rounds; each server's best round is
reported, with the ratio this/real. Also the CPU both servers used per request (their whole process
trees: front end and workers; the JVM for the real one) and the client's, over the window.

Nothing is pinned: as in the captures' measurement, the servers and the client share the host's
cores, so the client's CPU is taken from both alike. On a shared host the figures are lower bounds
(the load average is recorded and a busy host is noted).

    .venv/bin/python bench/torchserve_vs_real.py            # about 3 minutes
    .venv/bin/python bench/torchserve_vs_real.py --quick    # about 1.5 minutes: one round, shorter steps

Needs torchserve==0.12.0 and torch-model-archiver (in .venv), PyYAML, Java 17 on PATH. Run it under
`flock /tmp/bench.lock` on a shared machine. Results: bench/results/torchserve_vs_real.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from _server_bench import BIN, ROOT, busy_host_note, git_state, write_json

CAPTURES = ROOT.parent / "shared" / "torchserve-captures"
MODEL = "mlp"
WORKERS, BATCH_SIZE, MAX_BATCH_DELAY_MS = 2, 8, 5
LEVELS = (1, 8, 32, 64)
ROUNDS, QUICK_ROUNDS = 2, 1
WARMUP_S, MEASURE_S = 2.0, 6.0
QUICK_WARMUP_S, QUICK_MEASURE_S = 1.0, 3.0
TARGET_RATIO = 2.0
INPUT = [(i % 100) / 100 for i in range(784)]
"""The captures' mlp input."""


# -- the client (a child process: python bench/torchserve_vs_real.py --client ...) ----------------------
class _Connection(asyncio.Protocol):
    """One closed-loop client: a request, its whole answer, the next request."""

    def __init__(self, run: _ClientRun) -> None:
        self._run = run
        self._buffer = bytearray()
        self._need = -1
        self._status = 0
        self._head = 0
        self._sent = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self._sent = time.perf_counter_ns()
        self._transport.write(self._run.request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            self._status = int(head[9:12])
            at = head.find(b"content-length:") + 15
            stop = head.find(b"\r", at)
            length = int(head[at:stop if stop >= 0 else None])
            self._head, self._need = end + 4, end + 4 + length
        if len(buffer) < self._need:
            return
        body = bytes(buffer[self._head:self._need])
        del buffer[:self._need]
        self._need = -1
        if self._run.answered(self._sent, time.perf_counter_ns(), self._status, body):
            self._send()
        else:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._run.lost(self)


class _ClientRun:
    def __init__(self, host: str, port: int, concurrency: int, warmup_s: float, measure_s: float,
                 tree_pid: int) -> None:
        body = json.dumps(INPUT).encode()
        self.request = (f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        self.host, self.port, self.concurrency = host, port, concurrency
        self.warmup_s, self.measure_s, self.tree_pid = warmup_s, measure_s, tree_pid
        self.latencies: list[int] = []
        self.errors: dict[int, int] = {}
        self.sample: bytes | None = None
        self.start_ns = self.end_ns = 0
        self.cpu: dict[str, float] = {}
        self.done = asyncio.Event()
        self.open = 0

    def answered(self, sent: int, now: int, status: int, body: bytes) -> bool:
        if self.start_ns <= now < self.end_ns:
            if status == 200:
                self.latencies.append(now - sent)
                if self.sample is None:
                    self.sample = body
            else:
                self.errors[status] = self.errors.get(status, 0) + 1
        return now < self.end_ns

    def lost(self, connection: _Connection) -> None:
        self.open -= 1
        if time.perf_counter_ns() < self.end_ns:  # an error closed it: open another one
            asyncio.ensure_future(self._connect())
        elif self.open == 0:
            self.done.set()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.open += 1
        await loop.create_connection(lambda: _Connection(self), self.host, self.port)

    async def run(self) -> dict:
        now = time.perf_counter_ns()
        self.start_ns = now + int(self.warmup_s * 1e9)
        self.end_ns = self.start_ns + int(self.measure_s * 1e9)
        for _ in range(self.concurrency):
            await self._connect()
        await asyncio.sleep(max(0.0, (self.start_ns - time.perf_counter_ns()) / 1e9))
        before = (_tree_cpu(self.tree_pid), time.process_time())
        await asyncio.sleep(max(0.0, (self.end_ns - time.perf_counter_ns()) / 1e9))
        after = (_tree_cpu(self.tree_pid), time.process_time())
        await asyncio.wait_for(self.done.wait(), 60)
        latencies = sorted(self.latencies)
        window = self.measure_s
        return {
            "requests_per_s": len(latencies) / window,
            "p50_ms": _percentile(latencies, 50) / 1e6, "p99_ms": _percentile(latencies, 99) / 1e6,
            "answers": len(latencies), "errors": self.errors,
            "server_cpu_cores": (after[0] - before[0]) / window,
            "client_cpu_cores": (after[1] - before[1]) / window,
            "sample": self.sample.decode() if self.sample else None,
        }


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return math.nan
    return float(sorted_values[min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1)])


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def client_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    host, port = args.client.rsplit(":", 1)
    run = _ClientRun(host, int(port), args.concurrency, args.warmup, args.measure, args.tree_pid)
    with runner:
        print(json.dumps(runner.run(run.run())), flush=True)


# -- the servers ------------------------------------------------------------------------------------
@dataclass
class Served:
    """A running server: its process (group leader), inference and management addresses."""

    name: str
    proc: subprocess.Popen
    inference: str
    management: str

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(folder: Path) -> tuple[Path, str, str]:
    ports = [_free_port() for _ in range(5)]
    models = {MODEL: {"1.0": {"minWorkers": WORKERS, "maxWorkers": WORKERS, "batchSize": BATCH_SIZE,
                              "maxBatchDelay": MAX_BATCH_DELAY_MS}}}
    lines = [f"inference_address=http://127.0.0.1:{ports[0]}", f"management_address=http://127.0.0.1:{ports[1]}",
             f"metrics_address=http://127.0.0.1:{ports[2]}", "grpc_inference_address=127.0.0.1",
             "grpc_management_address=127.0.0.1", f"grpc_inference_port={ports[3]}",
             f"grpc_management_port={ports[4]}", "disable_token_authorization=true",
             f"models={json.dumps(models)}"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"


def build_store(work: Path) -> Path:
    """The captures' mlp.mar, built as the captures' was (make_models.py, torch-model-archiver)."""
    if not (CAPTURES / "models" / "make_models.py").is_file():
        raise SystemExit(f"the TorchServe captures are missing: expected {CAPTURES}")
    build, store = work / "build", work / "store"
    shutil.copytree(CAPTURES / "models", build)
    store.mkdir()
    subprocess.run([sys.executable, str(build / "make_models.py"), str(build)], check=True, capture_output=True,
                   timeout=300)
    archiver = BIN / "torch-model-archiver"
    subprocess.run([str(archiver), "--model-name", MODEL, "--version", "1.0", "--serialized-file",
                    str(build / "mlp.pt"), "--handler", str(build / "float_handler.py"), "--export-path",
                    str(store)], check=True, capture_output=True, timeout=300)
    return store


def _environment(work: Path) -> dict[str, str]:
    temp = work / "tmp"
    temp.mkdir(exist_ok=True)
    # TEMP/TMPDIR: the real server's pid file and worker sockets stay private to this run
    return {**os.environ, "OMP_NUM_THREADS": "1", "TEMP": str(temp), "TMPDIR": str(temp),
            "PYTHONUNBUFFERED": "1"}


def start_ours(work: Path, store: Path) -> Served:
    config, inference, management = _config(work / "ours")
    log = open(work / "ours" / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "servers.torchserve", "--model-store", str(store),
                             "--models", f"{MODEL}={MODEL}.mar", "--ts-config", str(config)],
                            cwd=ROOT, env=_environment(work), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return Served("this server", proc, inference, management)


def start_real(work: Path, store: Path) -> Served:
    config, inference, management = _config(work / "real")
    torchserve = BIN / "torchserve"
    if not torchserve.is_file() or shutil.which("java") is None:
        raise SystemExit("the real TorchServe needs `pip install torchserve==0.12.0` in .venv and Java 17")
    log = open(work / "real" / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([str(torchserve), "--start", "--foreground", "--ncs", "--model-store", str(store),
                             "--models", f"{MODEL}={MODEL}.mar", "--ts-config", str(config),
                             "--disable-token-auth"],
                            cwd=work / "real", env=_environment(work), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return Served("TorchServe 0.12.0", proc, inference, management)


def wait_ready(server: Served, timeout_s: float = 180.0) -> dict:
    """Until the model's workers are all READY; returns its description (settings checked)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} exited with {server.proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{server.management}/models/{MODEL}", timeout=5) as answer:
                (described,) = json.loads(answer.read())
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.5)
            continue
        workers = described.get("workers", [])
        if len(workers) == WORKERS and all(worker["status"] == "READY" for worker in workers):
            settings = (described["batchSize"], described["maxBatchDelay"], described["minWorkers"])
            if settings != (BATCH_SIZE, MAX_BATCH_DELAY_MS, WORKERS):
                raise SystemExit(f"{server.name} runs {MODEL} with batch size, delay, workers {settings}")
            return described
        time.sleep(0.5)
    raise SystemExit(f"{server.name}: {MODEL} not ready after {timeout_s:g} s")


def measure(server: Served, concurrency: int, warmup_s: float, measure_s: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--client", server.inference, "--concurrency",
                           str(concurrency), "--warmup", str(warmup_s), "--measure", str(measure_s),
                           "--tree-pid", str(server.proc.pid)],
                          cwd=ROOT, capture_output=True, text=True, timeout=warmup_s + measure_s + 120, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the client failed against {server.name}: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    if result["errors"] or not result["answers"]:
        raise SystemExit(f"{server.name} at concurrency {concurrency}: answers {result['answers']}, "
                         f"errors by status {result['errors']}")
    return result


def expected_output(store: Path, work: Path) -> list[float]:
    import torch

    unpacked = work / "unpacked"
    shutil.unpack_archive(store / f"{MODEL}.mar", unpacked, format="zip")
    model = torch.jit.load(str(unpacked / "mlp.pt"))
    with torch.inference_mode():
        return model(torch.tensor([INPUT])).tolist()[0]


def check_answer(server: Served, sample: str, want: list[float]) -> None:
    got = json.loads(sample)
    if len(got) != len(want) or any(not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got, want)):
        raise SystemExit(f"{server.name} answered {got}, the model in-process gives {want}")


# -- the benchmark ----------------------------------------------------------------------------------
def run(quick: bool) -> dict:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    warmup_s, measure_s = (QUICK_WARMUP_S, QUICK_MEASURE_S) if quick else (WARMUP_S, MEASURE_S)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ts-vs-real-") as folder:
        work = Path(folder)
        store = build_store(work)
        want = expected_output(store, work)
        servers = [start_ours(work, store), start_real(work, store)]
        try:
            for server in servers:
                wait_ready(server)
                print(f"{server.name}: ready ({server.inference})", flush=True)
            for server in servers:  # warm both up (the JVM's JIT, the workers' first batches)
                measure(server, 32, 1.0, 2.0)
            steps: list[dict] = []
            for round_ in range(rounds):
                for concurrency in LEVELS:
                    order = servers if (round_ + concurrency) % 2 == 0 else servers[::-1]
                    for server in order:
                        result = measure(server, concurrency, warmup_s, measure_s)
                        check_answer(server, result.pop("sample"), want)
                        steps.append({"server": server.name, "round": round_ + 1, "concurrency": concurrency,
                                      **result})
                        print(f"round {round_ + 1} c={concurrency:>2} {server.name:>17}: "
                              f"{result['requests_per_s']:8.1f} req/s  p99 {result['p99_ms']:7.2f} ms  "
                              f"server CPU {result['server_cpu_cores']:.2f} cores", flush=True)
        finally:
            for server in servers:
                server.stop()
    return {"steps": steps, "rounds": rounds, "warmup_s": warmup_s, "measure_s": measure_s,
            "elapsed_s": round(time.monotonic() - started, 1)}


def best(steps: list[dict], server: str, concurrency: int) -> dict:
    """The round with the most requests per second (the least disturbed by the shared host)."""
    mine = [step for step in steps if step["server"] == server and step["concurrency"] == concurrency]
    return max(mine, key=lambda step: step["requests_per_s"])


def summarize(measured: dict) -> list[dict]:
    table = []
    for concurrency in LEVELS:
        ours, real = best(measured["steps"], "this server", concurrency), best(
            measured["steps"], "TorchServe 0.12.0", concurrency)
        table.append({
            "concurrency": concurrency,
            "this_requests_per_s": round(ours["requests_per_s"], 1), "this_p99_ms": round(ours["p99_ms"], 2),
            "real_requests_per_s": round(real["requests_per_s"], 1), "real_p99_ms": round(real["p99_ms"], 2),
            "ratio": round(ours["requests_per_s"] / real["requests_per_s"], 2),
            "this_server_cpu_us_per_request": round(ours["server_cpu_cores"] / ours["requests_per_s"] * 1e6),
            "real_server_cpu_us_per_request": round(real["server_cpu_cores"] / real["requests_per_s"] * 1e6),
            "client_cpu_us_per_request": round(ours["client_cpu_cores"] / ours["requests_per_s"] * 1e6),
        })
    return table


def print_table(table: list[dict]) -> None:
    print()
    print(f"{'clients':>7} | {'this req/s':>10} {'p99 ms':>7} | {'real req/s':>10} {'p99 ms':>7} | "
          f"{'ratio':>5} | {'CPU us/req this':>15} {'real':>6}")
    for row in table:
        print(f"{row['concurrency']:>7} | {row['this_requests_per_s']:>10.1f} {row['this_p99_ms']:>7.2f} | "
              f"{row['real_requests_per_s']:>10.1f} {row['real_p99_ms']:>7.2f} | {row['ratio']:>5.2f} | "
              f"{row['this_server_cpu_us_per_request']:>15} {row['real_server_cpu_us_per_request']:>6}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, shorter steps")
    parser.add_argument("--client", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=WARMUP_S, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=float, default=MEASURE_S, help=argparse.SUPPRESS)
    parser.add_argument("--tree-pid", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.client:
        client_main(args)
        return
    state = git_state()
    note_before = busy_host_note()
    measured = run(args.quick)
    table = summarize(measured)
    print_table(table)
    at_32 = next(row for row in table if row["concurrency"] == 32)
    verdict = (f"at 32 clients: {at_32['ratio']:.2f}x the real TorchServe "
               f"(target {TARGET_RATIO:g}x: {'met' if at_32['ratio'] >= TARGET_RATIO else 'not met'})")
    print(verdict)
    notes = [note for note in (note_before, busy_host_note()) if note]
    for note in dict.fromkeys(notes):
        print(note)
    path = write_json("torchserve_vs_real", {
        "settings": {"model": MODEL, "workers": WORKERS, "batch_size": BATCH_SIZE,
                     "max_batch_delay_ms": MAX_BATCH_DELAY_MS, "omp_num_threads": 1, "levels": list(LEVELS)},
        "table": table, "verdict": verdict, "notes": notes, "git": state, **measured,
    })
    print(f"results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
