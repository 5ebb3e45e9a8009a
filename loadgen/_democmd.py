"""What `loadgen demo` does: start the Triton-compatible server, run on it, then sweep it.

Imported only by the demo verb: importing locust monkey-patches the process with gevent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import locust  # noqa: F401  (gevent monkey-patching must come before the other imports)

from loadgen._runcmd import run_and_report
from loadgen._sweepcmd import SweepSpec, run_sweep
from loadgen.errors import LoadgenError
from loadgen.lowlevel.children import ending_with_this_process
from loadgen.units import parse_duration

__all__ = ["run_demo"]


def _split_cores() -> tuple[set[int], set[int]] | None:
    """(generator's, server's) cores when there are two or more: a server sharing the generator's
    core reads requests late by whatever the generator was doing."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def _start_server(module: str, port_flag: str, args: list[str]) -> tuple[subprocess.Popen, str]:
    """`python -m MODULE PORT_FLAG 0 ARGS` on its own cores; returns it and its URL once listening.

    With two or more CPUs this process keeps the first half and the server gets the rest.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, port_flag, "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=ending_with_this_process(),  # noqa: PLW1509 - killed with the demo, even by SIGKILL
    )
    cores = _split_cores()
    if cores is not None:
        os.sched_setaffinity(proc.pid, cores[1])
        os.sched_setaffinity(0, cores[0])
        print(f"demo: server on CPU {sorted(cores[1])}, generator on CPU {sorted(cores[0])}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise LoadgenError("the demo server did not start")


def run_demo(*, duration: str, rate: float, sweep_step: str | None = "2s") -> int:
    """Start the Triton-compatible server with its built-in models, run Poisson load on `mlp`, then a
    short closed-loop sweep (1, 2, 4, 8 users) that finds its saturation throughput on this machine."""
    proc, url = _start_server("servers.triton", "--http-port", [])
    try:
        print(f"demo: Triton-compatible server at {url}, built-in model mlp (FP32 16 -> 64 -> 10)")
        print(f"demo: Poisson arrivals at {rate:g} req/s for {duration}")
        overrides = {
            ("target", "url"): url,
            ("target", "model"): "mlp",
            ("open_loop", "rate"): rate,
            ("open_loop", "arrival"): "poisson",
            ("open_loop", "duration"): duration,
        }
        code = run_and_report(None, overrides)
        if code != 0 or sweep_step is None:
            return code
        step_s = parse_duration(sweep_step)
        spec = SweepSpec(users=(1, 2, 4, 8), step_duration_s=step_s, warmup_s=min(1.0, step_s))
        out = Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-demo-sweep"
        print(f"\ndemo: closed-loop sweep over 1, 2, 4, 8 users, {sweep_step} a step -> {out}")
        sweep_code = run_sweep(None, {("target", "url"): url, ("target", "model"): "mlp",
                                      ("output", "dir"): str(out)}, spec)
        return 0 if sweep_code in (0, 1) else sweep_code  # no SLO is given: 1 cannot mean a missed one
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
