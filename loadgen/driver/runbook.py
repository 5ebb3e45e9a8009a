"""The live console's book of runs: which run is going, which have finished (their folders, exit codes and
downloadable files), and the start and quit requests the run command waits on between runs.

The console (loadgen/driver/console.py) outlives its runs: the run command (loadgen/_runcmd.py) books
the first run from the command line, then asks `next_start()` for each further one, which a start from
the page answers (its scenario, planned from the form), or a quit (the page's, a signal's, or
--web-autoquit's: None). Run numbers count from 1 and are given when a run is booked, so a start
request is answered with its number before the run begins; one run at a time (`busy`).

A finished run's files are served as they were written: summary.json and latency.hlog, and report.html,
made on the first request by `loadgen report DIR` in a child process (matplotlib, seconds of CPU, kept out
of the process that sends the load), then served from the folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gevent.lock import Semaphore
from gevent.queue import Empty, Queue

from loadgen.scenario import Scenario

__all__ = ["DOWNLOADS", "FinishedRun", "RunBook"]

DOWNLOADS = {"summary.json": "application/json", "latency.hlog": "text/plain", "report.html": "text/html"}
"""The files of a finished run the console serves, with their media types."""

_REPORT_TIMEOUT_S = 120.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the loadgen package
_QUIT = object()


@dataclass
class FinishedRun:
    """A run whose outputs are written: its folder, exit code and summary.json's contents."""

    number: int
    out_dir: Path
    exit_code: int
    summary: dict[str, Any]
    _report_lock: Semaphore = field(default_factory=Semaphore, repr=False)
    _report_made: bool = False

    def file(self, name: str) -> Path:
        """The path of download `name` (one of DOWNLOADS), report.html made first when it was not yet.

        Raises RuntimeError with `loadgen report`'s own message when it fails.
        """
        if name == "report.html":
            with self._report_lock:  # two requests at once make it once
                if not self._report_made:
                    _make_report(self.out_dir)
                    self._report_made = True
        return self.out_dir / name


def _make_report(out_dir: Path) -> None:
    """`loadgen report OUT_DIR` as a child process (gevent's subprocess: the console keeps serving)."""
    path = os.pathsep.join(part for part in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if part)
    done = subprocess.run([sys.executable, "-m", "loadgen", "report", str(out_dir)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": path}, timeout=_REPORT_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen report {out_dir} failed (exit {done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")


class RunBook:
    """The runs of one console: booking, the run going, the finished ones, and what comes next.

    >>> book = RunBook(autoquit_s=None)  # doctest: +SKIP
    >>> book.book(scenario)  # doctest: +SKIP
    1
    """

    def __init__(self, autoquit_s: float | None) -> None:
        self.autoquit_s = autoquit_s
        """Seconds after a run ends with no start before next_start() says quit (None: never)."""
        self.number = 0
        """The latest run booked (0: none yet)."""
        self.scenario: Scenario | None = None
        """The latest run's scenario (the command line's before any run): the start form's defaults."""
        self.busy = False
        """A run is booked and not yet finished: a start is refused (409)."""
        self.finished: dict[int, FinishedRun] = {}
        self.failed: dict[int, str] = {}
        """Runs that could not be sent (the target refused them, ...): why."""
        self.quitting = False
        self._commands: Queue = Queue()

    def book(self, scenario: Scenario) -> int:
        """Take the next run number for `scenario`; raises RuntimeError while a run is going."""
        if self.busy:
            raise RuntimeError(f"run {self.number} is going: stop it first, or wait for its end")
        if self.quitting:
            raise RuntimeError("the console is quitting")
        self.busy = True
        self.number += 1
        self.scenario = scenario
        return self.number

    def request(self, scenario: Scenario) -> int:
        """Book a run started from the page and hand it to next_start(); returns its number."""
        number = self.book(scenario)
        self._commands.put((number, scenario))
        return number

    def finish(self, run: FinishedRun) -> None:
        """Run `run.number` has ended and its outputs are written: its files can be downloaded."""
        self.finished[run.number] = run
        self.busy = False

    def fail(self, number: int, why: str) -> None:
        """Run `number` could not be sent (nothing was written)."""
        self.failed[number] = why
        self.busy = False

    def quit(self) -> None:
        """End the console after the run going (if any) is written: next_start() answers None."""
        self.quitting = True
        self._commands.put(_QUIT)

    def next_start(self, *, ended: bool = False) -> tuple[int, Scenario] | None:
        """Wait for the next run started from the page: (its number, its scenario), or None to quit (a
        quit request, or --web-autoquit seconds after a run ended; `ended`: what the console shows has
        ended even when no run was sent, as a sweep stopped before its first step)."""
        timeout = self.autoquit_s if self.number > 0 or ended else None
        try:
            command = self._commands.get(timeout=timeout)
        except Empty:
            return None
        return None if command is _QUIT or self.quitting else command

    def latest_finished(self) -> FinishedRun | None:
        return self.finished[max(self.finished)] if self.finished else None
