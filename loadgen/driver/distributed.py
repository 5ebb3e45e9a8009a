"""What the master and the workers of a distributed run agree on: messages, shares, clocks, merging.

Distributed runs use Locust's own master/worker mode (loadgen/driver/master.py and worker.py): Locust's
runners carry the connection, worker registration and indexes, heartbeats (a worker that stops sending
them is marked missing) and the `quit` at the end; loadgen's part travels as Locust custom messages
(`runner.send_message` / `register_message`), named here. This module imports no locust, so its rules
are unit-tested without a cluster.

One run, as the messages go (M: master, W: every worker)
--------------------------------------------------------
    (on connect, with a cluster key: W -> M HELLO, M -> W CHALLENGE, W -> M PROOF, M -> W WELCOME or
    REFUSED; loadgen/driver/trust.py. Only a worker that proved the key is counted and sent SETUP.)
    M -> W  SETUP     the scenario (as validated JSON), the worker's place (index i of n) and seed
    W -> M  READY     the target checked and warmed up (or FAILED, with the error)
    M -> W  START     the start instant as an epoch time, and the worker's share of the load
    W -> M  INTERVAL  every closed interval: its HistogramSet, encoded (exact), and the worker's health
    M -> W  TAKEOVER  a lost worker's load, from a given instant (the run goes on without it), and the
                      count of its arrivals that nobody sent before that instant when it left cleanly
    M -> W  RESHARE   a worker joined mid-run: leave your shares at a given instant and send this one
                      from there (the joiner got SETUP, READY, then START with its share from that instant)
    M -> W  STOP      end now (Ctrl-C on the master, or --stop-on-worker-loss)
    W -> M  DONE      the worker's own generator self-check, after its last interval

The schedule is the master's: open loop, worker i of n sends share (i, n) of the arrival process (every
n-th arrival from the i-th, loadgen/patterns/schedule.py), so the workers together send exactly the
single-process schedule; closed loop, the users are split as evenly as they go. Every worker converts the
start epoch to its own monotonic clock once, so all start at the same wall-clock instant (as close as
the hosts' clocks agree: NTP keeps them within a millisecond or so on a LAN).

A worker that connects while an open-loop run goes is set up (SETUP, READY) beside it; once it is ready,
the master picks an instant a little ahead and reshuffles what is left of the schedule over every worker
still sending, the joiner included (`Share.reshuffle`): each one's old shares end at that instant, and
share (j, m) of the schedule from that instant is worker j's. As with a lost worker's handover, every
arrival is still sent by exactly one worker.

Intervals are the recorder's, on the same beat everywhere (start + k * interval), so the master sums
the k-th interval of every worker into the k-th interval of one Recorder (`IntervalMerger`): histograms
add bucket by bucket, so every percentile of the merged run is the one a single histogram fed every
worker's samples would give. A slot is merged once every worker still running has sent it, so the
recorder only ever holds whole intervals (the live exporter reads it as it would a single process's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from loadgen.driver.selfcheck import Finding, SelfCheck
from loadgen.recorder import HistogramSet, Interval, Recorder

__all__ = [
    "MSG_DONE",
    "MSG_FAILED",
    "MSG_INTERVAL",
    "MSG_READY",
    "MSG_RESHARE",
    "MSG_SETUP",
    "MSG_START",
    "MSG_STOP",
    "MSG_TAKEOVER",
    "DistributedOptions",
    "IntervalMerger",
    "Share",
    "combined_generator",
    "monotonic_of_epoch",
    "split_users",
]

MSG_SETUP = "loadgen_setup"
MSG_READY = "loadgen_ready"
MSG_FAILED = "loadgen_failed"
MSG_START = "loadgen_start"
MSG_INTERVAL = "loadgen_interval"
MSG_TAKEOVER = "loadgen_takeover"
MSG_RESHARE = "loadgen_reshare"
MSG_STOP = "loadgen_stop"
MSG_DONE = "loadgen_done"

_EPS_S = 1e-6


@dataclass(frozen=True)
class DistributedOptions:
    """How a run or sweep is distributed (the CLI's --processes / --master flags)."""

    processes: int = 0
    """Local worker processes to start (0: none; the workers connect by themselves)."""
    expect_workers: int = 0
    """Workers to wait for before the first run."""
    bind_host: str = "*"
    bind_port: int = 5557
    max_wait_s: float | None = None
    """Give up (exit 2) when the workers have not all connected by then; None waits for ever."""
    stop_on_worker_loss: bool = False
    cluster_key: bytes | None = field(default=None, repr=False)
    """The secret every worker must prove (loadgen/driver/trust.py); None: any worker may join (local
    workers get a random one)."""

    @property
    def wanted(self) -> int:
        return self.processes or self.expect_workers

    @classmethod
    def from_flags(
        cls,
        *,
        processes: int = 0,
        master: bool = False,
        expect_workers: int = 0,
        bind_host: str | None = None,
        bind_port: int | None = None,
        max_wait_s: float | None = None,
        stop_on_worker_loss: bool = False,
        cluster_key: bytes | None = None,
    ) -> DistributedOptions | None:
        """The options the CLI flags ask for (None: a single-process run); ValueError naming bad flags."""
        problems = []
        if processes and master:
            problems.append("--processes (local workers) and --master (workers connect) exclude each other")
        if processes < -1:
            problems.append(f"--processes must be a count >= 1, or -1 for one per CPU (got {processes})")
        if master and expect_workers < 1:
            problems.append("--master needs --expect-workers N (N >= 1): the workers to wait for")
        if expect_workers and not master:
            problems.append("--expect-workers goes with --master")
        if bind_port is not None and not 0 <= bind_port <= 65535:
            problems.append(f"--master-bind-port must be a port (0-65535), got {bind_port}")
        if max_wait_s is not None and max_wait_s <= 0:
            problems.append("--expect-workers-max-wait must be > 0 seconds")
        if problems:
            raise ValueError("; ".join(problems))
        if processes == -1:
            processes = len(os.sched_getaffinity(0))
        if not processes and not master:
            if bind_host or bind_port is not None or max_wait_s is not None or stop_on_worker_loss \
                    or cluster_key is not None:
                raise ValueError("--master-bind-host/-port, --expect-workers-max-wait, --stop-on-worker-loss and "
                                 "--cluster-key-env/-file go with --processes or --master")
            return None
        local = bool(processes)
        return cls(
            processes=processes,
            expect_workers=0 if local else expect_workers,
            bind_host=bind_host or ("127.0.0.1" if local else "*"),
            bind_port=bind_port if bind_port is not None else (0 if local else 5557),
            max_wait_s=max_wait_s,
            stop_on_worker_loss=stop_on_worker_loss,
            cluster_key=cluster_key,
        )


@dataclass(frozen=True)
class Share:
    """Arrivals k, k + n, k + 2n, ... of the open-loop schedule, from `start_s` seconds into the run
    until `end_s` (None: its end)."""

    k: int
    n: int
    start_s: float = 0.0
    end_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.k < self.n:
            raise ValueError(f"a share needs 0 <= k < n, got k={self.k}, n={self.n}")

    def split(self, parts: int, start_s: float) -> list[Share]:
        """This share divided among `parts` takers from `start_s` on: taker j gets k + j*n mod n*parts.

        >>> Share(1, 2).split(2, 4.0)
        [Share(k=1, n=4, start_s=4.0, end_s=None), Share(k=3, n=4, start_s=4.0, end_s=None)]
        """
        if parts < 1:
            raise ValueError("a share is split among one taker or more")
        begin = max(self.start_s, start_s)
        return [Share(self.k + j * self.n, self.n * parts, begin, self.end_s) for j in range(parts)]

    def ended(self, end_s: float) -> Share:
        """This share, sent no longer from `end_s` on."""
        return Share(self.k, self.n, self.start_s, end_s if self.end_s is None else min(self.end_s, end_s))

    def sends_after(self, at_s: float) -> bool:
        """Whether any of this share's arrivals fall at or after `at_s`."""
        return self.end_s is None or self.end_s > at_s

    @staticmethod
    def reshuffle(parts: int, start_s: float) -> list[Share]:
        """The whole schedule from `start_s` on, in `parts` shares (a worker joined mid-run).

        >>> Share.reshuffle(3, 4.0)
        [Share(k=0, n=3, start_s=4.0, end_s=None), Share(k=1, n=3, start_s=4.0, end_s=None), \
Share(k=2, n=3, start_s=4.0, end_s=None)]
        """
        return [Share(j, parts, start_s) for j in range(parts)]

    def as_json(self) -> list[float | None]:
        return [self.k, self.n, self.start_s, self.end_s]

    @classmethod
    def from_json(cls, data: Iterable[float | None]) -> Share:
        k, n, start_s, *end = data
        end_s = end[0] if end else None
        return cls(int(k), int(n), float(start_s), None if end_s is None else float(end_s))

    def __str__(self) -> str:
        return (f"{self.k}/{self.n}" + (f" from {self.start_s:.3f} s" if self.start_s else "")
                + (f" until {self.end_s:.3f} s" if self.end_s is not None else ""))


def split_users(users: int, workers: int) -> list[int]:
    """`users` spread over `workers` as evenly as they go, the first workers taking the remainder.

    >>> split_users(10, 4)
    [3, 3, 2, 2]
    """
    if workers < 1:
        raise ValueError("users are split over one worker or more")
    base, extra = divmod(users, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def monotonic_of_epoch(epoch_s: float) -> float:
    """This process's time.monotonic() at the wall-clock instant `epoch_s` (time.time() seconds)."""
    return time.monotonic() + (epoch_s - time.time())


@dataclass
class _Slot:
    figures: HistogramSet
    end_s: float
    senders: set[str] = field(default_factory=set)


class IntervalMerger:
    """Sums the k-th interval of every worker into the k-th interval of `recorder`, in order.

    `add` takes a worker's interval as offsets from the run start; a slot goes into the recorder once
    every worker still sending (`expect`, less those `close`d: done or lost) has sent it, and every
    earlier slot has gone in. `flush` puts whatever is left in, in order (the end of the run).
    """

    def __init__(self, recorder: Recorder, workers: Iterable[str]) -> None:
        self.recorder = recorder
        self._sending = set(workers)
        self._slots: dict[int, _Slot] = {}
        self._next = 0
        self._streams = recorder.streams

    def add(self, worker: str, start_s: float, end_s: float, figures: HistogramSet) -> None:
        """Keep `worker`'s interval [start_s, end_s) of the run (seconds from its start)."""
        k = round(start_s / self.recorder.interval_s)
        if k < self._next and _empty(figures):
            return  # nothing to add to a slot merged already (a worker that joined sends such intervals)
        if k < self._next:
            # A slot already merged (its sender was taken for done or lost): merge it on its own.
            self._merge(k, _Slot(figures, end_s, {worker}))
            return
        slot = self._slots.get(k)
        if slot is None:
            blank = HistogramSet.streaming() if self._streams else HistogramSet()
            slot = self._slots[k] = _Slot(blank, end_s)
        slot.figures.add(figures)
        slot.end_s = max(slot.end_s, end_s)
        slot.senders.add(worker)
        self._release()

    def join(self, worker: str) -> None:
        """`worker` sends intervals from now on (it joined mid-run): the slots not merged yet wait for it.
        The empty intervals it sends for slots already merged (before it joined) are ignored."""
        self._sending.add(worker)

    def close(self, worker: str) -> None:
        """`worker` sends no more intervals (done, or lost): it holds no slot back any longer."""
        self._sending.discard(worker)
        self._release()

    def flush(self) -> None:
        """Merge every slot still held, in order."""
        for k in sorted(self._slots):
            self._merge(k, self._slots.pop(k))
            self._next = k + 1

    def _release(self) -> None:
        while (slot := self._slots.get(self._next)) is not None and self._sending <= slot.senders:
            del self._slots[self._next]
            self._merge(self._next, slot)
            self._next += 1

    def _merge(self, k: int, slot: _Slot) -> None:
        step = self.recorder.interval_s
        start_s, end_s = k * step, slot.end_s
        if abs(end_s - (k + 1) * step) < _EPS_S:
            end_s = (k + 1) * step
        start_t = self.recorder.start_t
        self.recorder.merge_interval(Interval(start_t + start_s, start_t + end_s, slot.figures))


def _empty(figures: HistogramSet) -> bool:
    return not (figures.sent or figures.requests or figures.dropped or figures.unsent or figures.out_of_range)


def combined_generator(
    workers: list[dict[str, Any]],
    merged: HistogramSet,
    *,
    open_loop: bool,
    max_in_flight: int | None,
    max_lag_ms: float,
    master_cpu: float,
) -> SelfCheck:
    """The run's generator self-check from every worker's own (`workers`: label, generator, lost).

    Bound when any worker was bound (each of its findings names the worker), when the merged lag p99
    exceeds `max_lag_ms`, when the master's CPU was saturated, or when a worker failed or was lost (its
    requests after its last report are missing from the figures).
    """
    found: list[tuple[str, Finding]] = []
    for worker in workers:
        label = str(worker["worker"])
        own = SelfCheck.from_json(worker["generator"]) if worker.get("generator") else None
        if own is not None:
            found += [(label, Finding(f.kind, f"{f.text} on worker {label}")) for f in own.findings]
        if worker.get("error"):
            found.append((label, Finding("failed", f"worker {label} failed: {worker['error']}")))
        if worker.get("lost_at_s") is not None:
            found.append((label, Finding("lost", f"worker {label} lost {worker['lost_at_s']:.1f} s into the run: "
                                                 f"its requests after {worker['last_report_s']:.1f} s are not in "
                                                 "the figures")))
    finals = [worker.get("generator") or {} for worker in workers]
    return SelfCheck(
        lag_ms=merged.percentiles_ms("lag"),
        dropped=merged.dropped,
        unsent=merged.unsent,
        cpu_fraction=max([float(g.get("cpu_fraction", 0.0)) for g in finals] or [0.0]),
        peak_in_flight=sum(int(g.get("peak_in_flight", 0) or 0) for g in finals),
        max_in_flight=max_in_flight if open_loop else None,
        max_lag_ms=max_lag_ms,
        master_cpu_fraction=master_cpu,
        workers=tuple(found),
    )
