"""Open-loop schedules: intended send offsets (seconds from the run start), fixed before sending.

`schedule(pattern)` yields numpy chunks of offsets, ascending, ending before the pattern's
duration. Each offset is start + f(i) for the i-th arrival, computed from the run start and never
from the previous send, so a late send does not move any later one.

`replan(pattern, at_s, rate)` is the pattern with its rate held at `rate` from `at_s` on (a live rate change,
loadgen/driver/console.py): its schedule before `at_s` is the old one, arrival for arrival (the same
unit times through the same rate profile), so the dispatcher that sent those hands over at `at_s` to one
over the new schedule from `at_s`, and every arrival is sent by exactly one of them.

`arrivals(pattern)` yields the same chunks paired with each arrival's row: its row of the trace for a
trace replay (loadgen/patterns/trace.py; the request is built from that row's sizes), its index in
the whole schedule otherwise. A share of the schedule keeps the rows of its arrivals, so n
generators replaying one trace between them send each row exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from loadgen.patterns.arrivals import ARRIVALS, CHUNK
from loadgen.patterns.profile import RateProfile
from loadgen.patterns.trace import Trace
from loadgen.scenario import OpenLoop, Stage

__all__ = ["Profile", "TraceProfile", "arrivals", "count_in", "profile_of", "replan", "schedule", "schedule_offsets"]


class Profile(Protocol):
    """What the run reads of an open-loop pattern's rate: RateProfile, or TraceProfile for a trace."""

    @property
    def duration_s(self) -> float: ...

    @property
    def mean_rate(self) -> float: ...

    def count_by(self, t: float) -> float:
        """Arrivals expected (a trace: scheduled) from the start to `t` seconds."""

    def rate_at(self, t: float) -> float:
        """Requests per second asked for at `t`."""


class TraceProfile:
    """A trace's arrivals as a rate: exact counts, and the rate over the second around an instant."""

    def __init__(self, trace: Trace, speedup: float, duration_s: float, loop: bool) -> None:
        self.offsets = trace.times_s / speedup
        """One pass of the trace, in run seconds."""
        self.period_s = trace.period_s / speedup if loop else float("inf")
        self.duration_s = duration_s

    def count_by(self, t: float) -> float:
        t = min(t, self.duration_s)
        if t <= 0:
            return 0.0
        passes = int(t // self.period_s) if np.isfinite(self.period_s) else 0
        rest = t - passes * self.period_s if passes else t
        return float(passes * len(self.offsets) + np.searchsorted(self.offsets, rest, side="left"))

    @property
    def mean_rate(self) -> float:
        return self.count_by(self.duration_s) / self.duration_s if self.duration_s > 0 else 0.0

    def rate_at(self, t: float) -> float:
        return self.count_by(t + 0.5) - self.count_by(max(t - 0.5, 0.0))


def profile_of(pattern: OpenLoop) -> Profile:
    """The rate profile that an open-loop pattern describes."""
    trace = pattern.trace_rows()
    if trace is not None:
        return TraceProfile(trace, pattern.trace_speedup, pattern.total_duration, pattern.trace_loop)
    if pattern.stages:
        stages = [(s.duration, s.rate, s.ramp_to) for s in pattern.stages]
        return RateProfile.from_stages(pattern.rate or 0.0, stages)
    return RateProfile.constant(float(pattern.rate or 0.0), pattern.total_duration)


def replan(pattern: OpenLoop, at_s: float, rate: float) -> OpenLoop:
    """`pattern` with the rate held at `rate` from `at_s` seconds into the run to its end: stages (held or
    ramped, cut at `at_s`) then a hold. Raises ValueError for a trace replay (its instants are the trace's),
    a rate <= 0, or an instant outside the run."""
    if pattern.trace is not None:
        raise ValueError("a trace replay sends the trace's own instants: its rate cannot be changed")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second (got {rate:g}); stop the run instead")
    end = pattern.total_duration
    if not 0.0 <= at_s < end:
        raise ValueError(f"the change's instant {at_s:.3f} s is outside the run (0 to {end:g} s)")
    profile = profile_of(pattern)
    assert isinstance(profile, RateProfile)
    stages = []
    for segment in profile.segments:
        kept = min(segment.duration_s, at_s - segment.start_s)
        if kept <= 0.0:
            break
        if segment.from_rate == segment.to_rate:
            stages.append(Stage(duration=kept, rate=segment.from_rate))
        else:  # a ramp starts from the rate before it, as in RateProfile.from_stages
            slope = (segment.to_rate - segment.from_rate) / segment.duration_s
            stages.append(Stage(duration=kept, ramp_to=segment.from_rate + slope * kept))
    stages.append(Stage(duration=end - at_s, rate=rate))
    first = profile.segments[0].from_rate
    return pattern.model_copy(update={"rate": first, "duration": None, "stages": stages})


def _offsets(pattern: OpenLoop) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every arrival of the pattern with its row, in chunks, ascending, without end."""
    trace = pattern.trace_rows()
    if trace is None:
        profile = profile_of(pattern)
        index = 0
        for units in ARRIVALS[pattern.arrival](pattern.seed, pattern.burstiness):
            yield profile.invert(units), np.arange(index, index + len(units))
            index += len(units)
        return
    profile = TraceProfile(trace, pattern.trace_speedup, pattern.total_duration, pattern.trace_loop)
    rows = np.arange(len(trace))
    start = 0.0
    while True:
        for at in range(0, len(rows), CHUNK):
            yield start + profile.offsets[at:at + CHUNK], rows[at:at + CHUNK]
        if not np.isfinite(profile.period_s):
            yield np.array([np.inf]), np.array([-1])  # the end, past any duration
            return
        start += profile.period_s


def arrivals(
    pattern: OpenLoop, *, share: tuple[int, int] = (0, 1), start_s: float = 0.0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (intended offsets, rows) for `pattern`.

    `share=(k, n)` keeps every n-th arrival starting at k, so n generators that each take one
    share send the whole schedule between them. `start_s` drops the offsets before it (a share taken
    over mid-run): the arrivals are still counted from the run start, so the share is the same.
    """
    end = pattern.total_duration
    index = 0
    k, n = share
    for offsets, rows in _offsets(pattern):
        picks = (np.arange(index, index + len(offsets)) % n) == k
        index += len(offsets)
        inside = offsets < end
        if start_s > 0.0:
            inside &= offsets >= start_s
        keep = inside & picks
        if keep.any():
            yield offsets[keep], rows[keep]
        if not offsets[-1] < end:
            return


def schedule(
    pattern: OpenLoop, *, share: tuple[int, int] = (0, 1), start_s: float = 0.0
) -> Iterator[np.ndarray]:
    """Chunks of intended offsets for `pattern` (`arrivals` without the rows)."""
    for offsets, _ in arrivals(pattern, share=share, start_s=start_s):
        yield offsets


def count_in(pattern: OpenLoop, share: tuple[int, int], start_s: float, end_s: float) -> int:
    """How many arrivals of `share` fall in [start_s, end_s) of the run."""
    total = 0
    for chunk in schedule(pattern, share=share, start_s=max(start_s, 0.0)):
        total += int(np.count_nonzero(chunk < end_s))
        if chunk[-1] >= end_s:
            break
    return total


def schedule_offsets(pattern: OpenLoop) -> np.ndarray:
    """The whole schedule as one array (tests and short runs)."""
    chunks = list(schedule(pattern))
    return np.concatenate(chunks) if chunks else np.empty(0)
