"""Keep a process's CPUs out of deep idle while it measures or keeps time.

An idle CPU, and above all an idle virtual CPU, takes 0.1-2 ms to wake when a response arrives, a
request comes in or a send instant is due. On the generator that wake-up lands in the measured
latency although the server had no part in it; on the calibration server it is an error in the
latency it declares. Against a 20 ms server at 100 req/s on a 2-core VM it moved p99 from 20.7 ms
to 21.4-21.6 ms in about half of the runs. A companion process per CPU that spins at SCHED_IDLE
priority keeps each CPU awake using only time nothing else wants: the kernel preempts it at once
whenever the generator (or anything else) becomes runnable.

    with KeepAwake(os.sched_getaffinity(0)):
        ...  # the run

Each spinner is put at SCHED_IDLE by the parent the moment it is spawned (and starts Python with
-S), so its start-up takes next to no time from the process it keeps awake.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Self

__all__ = ["KeepAwake"]

_MAX_CPUS = 8
# The spinner: pin to one CPU, spin, end by itself when the parent is gone.
_SPINNER = (
    "import os,sys\n"
    "os.sched_setaffinity(0,{int(sys.argv[1])})\n"
    "p=int(sys.argv[2])\n"
    "while os.getppid()==p:\n"
    " for _ in range(200000): pass\n"
)


class KeepAwake:
    """Context manager starting one idle-priority spinner per CPU in `cpus` (at most 8)."""

    def __init__(self, cpus: Iterable[int]) -> None:
        self.cpus = sorted(cpus)[:_MAX_CPUS]
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Self:
        if not hasattr(os, "SCHED_IDLE"):
            return self
        for cpu in self.cpus:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _SPINNER, str(cpu), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._procs.append(proc)
            try:
                os.sched_setscheduler(proc.pid, os.SCHED_IDLE, os.sched_param(0))
            except OSError:  # not allowed here: a spinner at normal priority would compete
                self.__exit__()
                break
        return self

    def __exit__(self, *exc_info: object) -> None:
        for proc in self._procs:
            _end(proc)
        self._procs.clear()


def _end(proc: subprocess.Popen) -> None:
    """End a spinner (SIGTERM, then SIGKILL) and reap it, waiting at most a second for each: the exit is read
    with waitpid itself, never with an unbounded Popen.wait(), which under gevent waits on the loop's SIGCHLD
    watcher, so that an exit it misses would hold the run's end (and a worker's DONE) for ever."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already (by the event loop's SIGCHLD handler)
                proc.returncode = proc.returncode if proc.returncode is not None else -sig
                return
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return
            time.sleep(0.005)
