"""A sweep as the live console shows it (`loadgen sweep --web-port`): the curve growing step by step, the
step running now, and the verdict.

The sweep command (loadgen/_sweepcmd.py) tells the board what it tells its Prometheus collector
(SweepCollector: begin_step, end_step, judge), with the same objects: each finished step's StepResult
(kept, not copied: /loadgen/sweep answers `step.as_json()`, the very call sweep.json's steps are written
with) and each verdict dict, the last one being the one sweep.json holds. So the console's curve and
verdict are sweep.json's numbers, not figures computed a second time. `finish()` comes once sweep.json
and curve.csv are written: from then on they are the console's downloads.

A stop from the page ends the sweep as Ctrl-C does: the step going is interrupted, what was measured is
written, and no further step starts (`stop_requested`, read by the sweep between steps).

This module only holds and shows what it is given (no locust, no gevent): the steps are anything with
`as_json()` (loadgen.sweep sits above the driver and is not imported here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

__all__ = ["SWEEP_DOWNLOADS", "ShownStep", "SweepBoard"]

SWEEP_DOWNLOADS = {"sweep.json": "application/json", "curve.csv": "text/csv"}
"""The files of a finished sweep the console serves, with their media types."""


class ShownStep(Protocol):
    """A finished step as the board reads it (loadgen.sweep.step.StepResult is one)."""

    def as_json(self) -> dict[str, Any]: ...


class SweepBoard:
    """The sweep the console shows: plan, finished steps, the step running, the verdict, its files.

    >>> board = SweepBoard(closed_loop=False)
    >>> board.begin_step(1, 60.0)
    >>> board.as_json()["running"]
    {'phase': 'step', 'step': 1, 'load': 60.0}
    """

    def __init__(self, *, closed_loop: bool) -> None:
        self.unit = "users" if closed_loop else "req/s"
        """The unit of a step's load: an open loop's offered rate, or a closed loop's user count."""
        self.plan = ""
        """The plan as the sweep describes it (e.g. "rates 60, 90, 130")."""
        self.total: int | None = None
        """The plan's step count, or its upper bound (None: not known)."""
        self.steps: list[ShownStep] = []
        self.running: dict[str, Any] | None = None
        self.verdict: dict[str, Any] | None = None
        """The verdict of the steps so far; sweep.json's own once `out_dir` is set."""
        self.stop_requested = False
        self.out_dir: Path | None = None
        """Where sweep.json and curve.csv were written: set when the sweep has ended."""
        self.exit_code: int | None = None
        self.interrupted = False

    def planned(self, described: str, total: int | None) -> None:
        self.plan, self.total = described, total

    def begin_probe(self, users: int) -> None:
        """A probe run (a sweep without a plan measures the target first) at `users` users begins."""
        self.running = {"phase": "probe", "users": users}

    def begin_step(self, index: int, load: float) -> None:
        self.running = {"phase": "step", "step": index, "load": load}

    def end_step(self, step: ShownStep) -> None:
        self.steps = [*self.steps, step]
        self.running = None

    def judge(self, judged: dict[str, Any]) -> None:
        """The verdict of the steps so far (kept as given: the final one is sweep.json's dict)."""
        self.verdict = judged

    def request_stop(self) -> None:
        """End the sweep after the step going (the console interrupts that one): no further step starts."""
        self.stop_requested = True

    def finish(self, judged: dict[str, Any], out_dir: Path, exit_code: int, *, interrupted: bool) -> None:
        """The sweep has ended and sweep.json (whose verdict is `judged`) and curve.csv are in `out_dir`."""
        self.verdict, self.out_dir, self.exit_code, self.interrupted = judged, out_dir, exit_code, interrupted
        self.running = None

    @property
    def ended(self) -> bool:
        return self.out_dir is not None

    def state(self) -> str:
        if self.ended:
            return "finished"
        if self.stop_requested:
            return "stopping"
        return "probing" if (self.running or {}).get("phase") == "probe" else "running"

    def as_json(self) -> dict[str, Any]:
        """What GET /loadgen/sweep answers: the steps as sweep.json has them, the verdict (`final` once it is
        sweep.json's), the step running and, once ended, the exit code and the downloads."""
        found: dict[str, Any] = {
            "state": self.state(), "unit": self.unit, "plan": self.plan, "total": self.total,
            "running": self.running, "steps": [step.as_json() for step in self.steps],
            "verdict": self.verdict, "final": self.ended, "interrupted": self.interrupted,
        }
        if self.ended:
            found.update(exit_code=self.exit_code, out=str(self.out_dir),
                         downloads={name: f"/loadgen/download/{name}" for name in SWEEP_DOWNLOADS})
        return found

    def file(self, name: str) -> Path | None:
        """The path of download `name` (one of SWEEP_DOWNLOADS) once the sweep has ended, else None."""
        return self.out_dir / name if self.out_dir is not None else None
