"""Soak: each reference server held at 70 % of its saturation for minutes, its memory and file descriptors
sampled every second: both must stay flat, or the report names the leak.

For each server (on core 1; the generator on core 0):
  1. a closed-loop probe (`loadgen run --users 8`, 3 s) measures what it serves at saturation;
  2. `loadgen run --rate R --arrival poisson --duration M`, R = 0.7 x that (at most --max-rate: one
     generator core's healthy open loop), holds it there while /proc/PID/status
     (VmRSS) and /proc/PID/fd are read every second;
  3. over the second half of the run (after caches and pools have warmed), a least-squares line through
     RSS and through the descriptor count gives the growth per 10 minutes; flat is under 1 % of the
     level per 10 min (RSS) and under one descriptor per 10 min. Errors, dropped and unsent must be 0.
Servers: the Triton-compatible one (built-in `mlp`), the calibration server (1 ms), the OpenAI mock
(16 tokens, 1 ms apart) and llm-sim (decode 2 ms, batch 64); the TorchServe-compatible one too when
--torchserve-store names a model store holding mlp.mar (tests/support/torchserve.py builds one).

    flock /tmp/test.lock .venv/bin/python bench/soak.py                 # 10 minutes a server (~45 min)
    flock /tmp/test.lock .venv/bin/python bench/soak.py --minutes 1     # a short check
    flock /tmp/test.lock .venv/bin/python bench/soak.py --only triton,llm-sim

Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _server_bench import ServerProcess, start_server

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "soak.json"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


@dataclass
class Target:
    name: str
    module: str
    args: list[str]
    load: list[str]
    """loadgen flags that pick the protocol and model."""
    port_flag: str = "--port"


TARGETS = [
    Target("triton", "servers.triton", [], ["--model", "mlp"], "--http-port"),
    Target("calibration", "servers.calibration", ["--delay-ms", "1"], ["--model", "m"]),
    Target("openai-mock", "servers.openai_mock", ["--itl-ms", "1"],
           ["--protocol", "openai", "--model", "mock-llm", "--max-tokens", "16"]),
    Target("llm-sim", "servers.llm_sim", ["--decode-ms", "2", "--max-batch", "64"],
           ["--protocol", "openai", "--model", "sim-llm", "--max-tokens", "16", "--input-tokens", "32"]),
]


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


def _start(target: Target) -> ServerProcess:
    return start_server([sys.executable, "-m", target.module, target.port_flag, "0", *target.args], core=1,
                        timeout_s=120.0)


def _loadgen(url: str, target: Target, extra: list[str], out: Path, timeout: float) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "loadgen", "run", "--target", url, *target.load, *extra,
                             "--out", str(out), "-q"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    os.sched_setaffinity(proc.pid, {0})
    _out, err = proc.communicate(timeout=timeout)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"loadgen failed on {target.name}: {err[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def _sample(pid: int, samples: Samples, stop: threading.Event) -> None:
    start = time.monotonic()
    while not stop.wait(1.0):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            return
        samples.t.append(time.monotonic() - start)
        samples.rss_mb.append(rss_kb / 1024)
        samples.fds.append(fds)


def _per_10_min(t: list[float], values: list[float]) -> tuple[float, float]:
    """Least-squares slope over the second half, per 10 minutes, and the level (mean) there."""
    half = len(t) // 2
    x, y = np.array(t[half:]), np.array(values[half:], dtype=float)
    if len(x) < 3:
        return 0.0, float(y.mean()) if len(y) else 0.0
    slope = np.polyfit(x, y, 1)[0]
    return float(slope * 600), float(y.mean())


def soak(target: Target, minutes: float, work: Path, max_rate: float) -> dict:
    server = _start(target)
    proc, url = server.proc, server.url
    try:
        probe = _loadgen(url, target, ["--users", "8", "--duration", "3s"], work / f"{target.name}-probe", 60)
        rate = round(min(0.7 * probe["achieved_rps"], max_rate), 1)
        samples, stop = Samples(), threading.Event()
        sampler = threading.Thread(target=_sample, args=(proc.pid, samples, stop), daemon=True)
        sampler.start()
        run = _loadgen(url, target, ["--rate", str(rate), "--arrival", "poisson", "--duration", f"{minutes * 60:g}s"],
                       work / f"{target.name}-soak", minutes * 60 + 120)
        stop.set()
        sampler.join()
    finally:
        server.stop()
    rss_growth, rss_level = _per_10_min(samples.t, samples.rss_mb)
    fd_growth, fd_level = _per_10_min(samples.t, samples.fds)
    lost = {key: run[key] for key in ("dropped", "unsent") if run[key]} | (
        {"errors": run["errors"]} if run["errors"] else {})
    leaks = []
    if rss_level and rss_growth / rss_level > 0.01:
        leaks.append(f"RSS grows {rss_growth:.2f} MB per 10 min ({100 * rss_growth / rss_level:.2f} % of {rss_level:.0f} MB)")
    if fd_growth >= 1.0:
        leaks.append(f"file descriptors grow {fd_growth:.1f} per 10 min (of {fd_level:.0f})")
    return {"server": target.name, "saturation_rps": probe["achieved_rps"], "rate": rate, "minutes": minutes,
            "requests": run["requests"], "ok": run["ok"], "lost": lost, "generator_bound": run["generator_bound"],
            "rss_mb": {"first": samples.rss_mb[0] if samples.rss_mb else None, "last": samples.rss_mb[-1] if samples.rss_mb else None,
                       "per_10_min": round(rss_growth, 3)},
            "fds": {"first": samples.fds[0] if samples.fds else None, "last": samples.fds[-1] if samples.fds else None,
                    "per_10_min": round(fd_growth, 2)},
            "verdict": "flat" if not leaks and not lost else "; ".join(leaks + ([f"lost {lost}"] if lost else []))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--max-rate", type=float, default=2000.0,
                        help="cap on the soak rate: one generator core keeps an open loop healthy up to a few "
                             "thousand req/s, and the built-in models serve more than that")
    parser.add_argument("--torchserve-store", type=Path, default=None, help="a model store holding mlp.mar")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores: the server on one, the generator on the other")
    targets = list(TARGETS)
    if args.torchserve_store is not None:
        targets.append(Target("torchserve", "servers.torchserve",
                              ["--model-store", str(args.torchserve_store), "--models", "mlp=mlp.mar",
                               "--disable-token-auth"],
                              ["--protocol", "torchserve-http", "--model", "mlp"], "--inference-port"))
    if args.only:
        wanted = set(args.only.split(","))
        targets = [t for t in targets if t.name in wanted]
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    results = []
    print(f"{'server':<13}{'sat/s':>9}{'rate':>8}{'min':>5}{'requests':>10}{'RSS MB':>14}{'/10min':>8}"
          f"{'fds':>10}{'/10min':>8}  verdict")
    for target in targets:
        row = soak(target, args.minutes, work, args.max_rate)
        results.append(row)
        print(f"{row['server']:<13}{row['saturation_rps']:>9.1f}{row['rate']:>8.1f}{row['minutes']:>5g}"
              f"{row['requests']:>10}{row['rss_mb']['first'] or 0:>7.1f}->{row['rss_mb']['last'] or 0:<6.1f}"
              f"{row['rss_mb']['per_10_min']:>8.2f}{row['fds']['first'] or 0:>5}->{row['fds']['last'] or 0:<4}"
              f"{row['fds']['per_10_min']:>8.1f}  {row['verdict']}", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"load": os.getloadavg(), "rows": results}, indent=2) + "\n")
    print(f"results in {RESULTS}; load average {os.getloadavg()[0]:.1f}")
    return 0 if all(row["verdict"] == "flat" for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
