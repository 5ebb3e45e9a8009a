"""Distributed runs as real processes: a master (`loadgen run --master`) read line by line, workers that
write every interval they ship (`loadgen worker --debug-dir`), and readers of those intervals."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.support.processes import ROOT, describe_stuck, loadgen_cmd, pin, stop_process


class Master:
    """`loadgen run ... --master --expect-workers N` on a free port, read line by line from stderr."""

    def __init__(self, args: list[str], out: Path, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            loadgen_cmd("run", *args, "--master", "--expect-workers", str(workers), "--master-bind-host",
                        "127.0.0.1", "--master-bind-port", "0", "--quiet", "--out", str(out)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        pin(self.proc.pid, 0)
        self.lines: list[str] = []
        line = self.wait_for("master: listening for workers on ")
        self.port = int(line.split()[5].rsplit(":", 1)[1])

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.lines.append(line)
            if line.startswith(prefix):
                return line
            if not line and self.proc.poll() is not None:
                break
        stop_process(self.proc)
        raise AssertionError(f"no {prefix!r} line from the master: {''.join(self.lines)}")

    def wait_for_start(self, workers: int) -> float:
        """Wait for the master's `run on N worker(s) ... from epoch E` line; returns E, the run's start
        (time.time() seconds): a test that acts some time into the run counts from it, not from when it
        read the line, which a loaded host can deliver late."""
        line = self.wait_for(f"master: run on {workers} worker(s)")
        return float(line.rsplit(" from epoch ", 1)[1])

    def finish(self, timeout: float = 90.0) -> tuple[int, str]:
        try:
            _, rest = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            describe_stuck(self.proc.pid)
            raise
        finally:
            stop_process(self.proc)
        return self.proc.returncode, "".join(self.lines) + rest

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


def sleep_until_epoch(epoch_s: float) -> None:
    """Sleep until the wall-clock instant `epoch_s` (at once when it has passed)."""
    time.sleep(max(0.0, epoch_s - time.time()))


def start_worker(port: int, debug_dir: Path, *args: str, env: dict[str, str] | None = None,
                 stderr: int = subprocess.DEVNULL) -> subprocess.Popen:
    """`loadgen worker` of the master on `port` (ARGS: its other flags; `env`: set in its environment,
    beside this process's own; stderr=subprocess.PIPE to read what it says, as text)."""
    proc = subprocess.Popen(
        loadgen_cmd("worker", "--master-host", "127.0.0.1", "--master-port", str(port), "--debug-dir",
                    str(debug_dir), *args),
        stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
    )
    pin(proc.pid, 0)
    return proc


def shipped(debug_dir: Path, pid: int) -> list[dict]:
    """Every interval worker `pid` shipped to the master, in order."""
    path = debug_dir / f"worker-{pid}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def received(debug_dir: Path, pid: int) -> str:
    """Every loadgen message worker `pid` received from its master, as it wrote them (JSON lines)."""
    path = debug_dir / f"worker-{pid}-received.jsonl"
    return path.read_text() if path.exists() else ""


def requests_of(messages: list[dict]) -> int:
    return sum(m["figures"]["ok"] + sum(m["figures"]["errors"].values()) for m in messages)


def worker_entry(summary: dict, pid: int) -> dict:
    return next(w for w in summary["distributed"]["workers"] if w["pid"] == pid)
