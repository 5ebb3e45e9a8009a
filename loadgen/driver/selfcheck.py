"""The generator's self-check: could it keep its schedule? A typed record every output carries.

A SelfCheck holds the figures (schedule lag, dropped and unsent arrivals, CPU, in-flight); its
`findings` (each a kind and its words) are computed from them, never parsed back from text, and `bound`
is whether there are any. A distributed run's check holds the workers' own findings, each naming its
worker (`combine`). A sweep judges lag and dropped arrivals again on a step's measured part only
(`measured`): the kinds say which findings that replaces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

__all__ = ["CPU_LIMIT", "Finding", "SelfCheck", "unsent_reason"]

CPU_LIMIT = 0.95
"""A generator process above this share of a core is the bottleneck."""

Kind = Literal["dropped", "unsent", "handover", "lag", "cpu", "master_cpu", "failed", "lost", "fd_limit"]


class Finding(NamedTuple):
    kind: Kind
    text: str


def unsent_reason(unsent: int) -> str:
    """The words for arrivals never sent because the generator was behind its schedule."""
    return (f"{unsent} scheduled arrivals never sent: the generator was still behind its schedule when "
            "dispatching stopped (a stalled host?)")


@dataclass(frozen=True)
class SelfCheck:
    """The generator's own health over a run, or over the measured part of a sweep step."""

    lag_ms: dict[str, float]
    dropped: int = 0
    unsent: int = 0
    handover_unsent: int = 0
    """Of the unsent arrivals, those a leaving worker left before the takeover (distributed runs)."""
    cpu_fraction: float = 0.0
    peak_in_flight: int = 0
    max_in_flight: int | None = None
    """The open loop's in-flight cap; None in closed loop (no schedule to keep, no lag judged)."""
    max_lag_ms: float = 1.0
    master_cpu_fraction: float | None = None
    """A distributed run's master; None for a single process."""
    fd_note: str = ""
    """Why the open-file limit could not be raised to what the run's connections need ("": it was)."""
    workers: tuple[tuple[str, Finding], ...] = ()
    """A distributed run: each worker's own findings (and its failure or loss), by worker label."""

    @property
    def open_loop(self) -> bool:
        return self.max_in_flight is not None

    @property
    def distributed(self) -> bool:
        return self.master_cpu_fraction is not None

    @property
    def findings(self) -> list[Finding]:
        worker_kinds = {finding.kind for _, finding in self.workers}
        everyone = " (all workers)" if self.distributed else ""
        found: list[Finding] = []
        if self.dropped and "dropped" not in worker_kinds:
            found.append(Finding("dropped", f"{self.dropped} arrivals dropped at the in-flight cap of "
                                            f"{self.max_in_flight}" + everyone))
        behind = self.unsent - self.handover_unsent
        if behind and "unsent" not in worker_kinds:
            found.append(Finding("unsent", unsent_reason(behind) + everyone))
        if self.handover_unsent:
            found.append(Finding("handover", f"{self.handover_unsent} scheduled arrivals never sent: a leaving "
                                             "worker's, between its leaving and the takeover"))
        if self.open_loop and self.lag_ms.get("p99", 0.0) > self.max_lag_ms and "lag" not in worker_kinds:
            found.append(Finding("lag", f"schedule lag p99 {self.lag_ms['p99']:.3f} ms > {self.max_lag_ms} ms"
                                        + everyone))
        if self.fd_note:
            found.append(Finding("fd_limit", self.fd_note))
        if self.cpu_fraction > CPU_LIMIT and not self.distributed:
            found.append(Finding("cpu", f"generator CPU at {self.cpu_fraction:.0%} of a core"))
        found += [Finding(finding.kind, finding.text) for _, finding in self.workers]
        if self.master_cpu_fraction is not None and self.master_cpu_fraction > CPU_LIMIT:
            found.append(Finding("master_cpu", f"generator CPU at {self.master_cpu_fraction:.0%} of a core on "
                                               "the master"))
        return found

    @property
    def reasons(self) -> list[str]:
        return [finding.text for finding in self.findings]

    @property
    def bound(self) -> bool:
        return bool(self.findings)

    @property
    def bound_workers(self) -> list[str]:
        return sorted({worker for worker, _ in self.workers}, key=str)

    def measured(self, lag_ms: dict[str, float], dropped: int) -> SelfCheck:
        """This check with lag and dropped arrivals judged on a part of the run (a sweep step without its
        warm-up): the workers' own lag and dropped findings give way to the part's merged figures."""
        workers = tuple((worker, finding) for worker, finding in self.workers
                        if finding.kind not in ("lag", "dropped"))
        return dataclasses.replace(self, lag_ms=lag_ms, dropped=dropped, workers=workers)

    def as_json(self) -> dict[str, Any]:
        """summary.json's `generator`, and what a worker ships to its master."""
        findings = self.findings
        data: dict[str, Any] = {
            "bound": bool(findings),
            "reasons": [finding.text for finding in findings],
            "findings": [{"kind": kind, "text": text} for kind, text in findings],
            "lag_ms": self.lag_ms,
            "max_lag_ms": self.max_lag_ms,
            "dropped": self.dropped,
            "unsent": self.unsent,
            "handover_unsent": self.handover_unsent,
            "cpu_fraction": round(self.cpu_fraction, 3),
            "peak_in_flight": self.peak_in_flight,
            "max_in_flight": self.max_in_flight,
        }
        if self.fd_note:
            data["fd_note"] = self.fd_note
        if self.distributed:
            data["bound_workers"] = self.bound_workers
            data["master_cpu_fraction"] = round(self.master_cpu_fraction or 0.0, 3)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SelfCheck:
        """A worker's check as it shipped it (its own findings are recomputed from its figures)."""
        return cls(lag_ms=dict(data.get("lag_ms") or {}), dropped=int(data.get("dropped", 0)),
                   unsent=int(data.get("unsent", 0)), handover_unsent=int(data.get("handover_unsent", 0)),
                   cpu_fraction=float(data.get("cpu_fraction", 0.0)),
                   peak_in_flight=int(data.get("peak_in_flight", 0) or 0), max_in_flight=data.get("max_in_flight"),
                   max_lag_ms=float(data.get("max_lag_ms", 1.0)), fd_note=str(data.get("fd_note", "")))
