"""Open-loop schedules: intended send offsets (seconds from the run start), fixed before sending.

`schedule(pattern)` yields numpy chunks of offsets, ascending, ending before the pattern's
duration. Each offset is start + f(i) for the i-th arrival, computed from the run start and never
from the previous send, so a late send does not move any later one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from loadgen.patterns.arrivals import ARRIVALS
from loadgen.patterns.profile import RateProfile
from loadgen.scenario import OpenLoop

__all__ = ["count_in", "profile_of", "schedule", "schedule_offsets"]


def profile_of(pattern: OpenLoop) -> RateProfile:
    """The rate profile that an open-loop pattern describes."""
    if pattern.stages:
        stages = [(s.duration, s.rate, s.ramp_to) for s in pattern.stages]
        return RateProfile.from_stages(pattern.rate or 0.0, stages)
    return RateProfile.constant(float(pattern.rate or 0.0), pattern.total_duration)


def schedule(
    pattern: OpenLoop, *, share: tuple[int, int] = (0, 1), start_s: float = 0.0
) -> Iterator[np.ndarray]:
    """Chunks of intended offsets for `pattern`.

    `share=(k, n)` keeps every n-th arrival starting at k, so n generators that each take one
    share send the whole schedule between them. `start_s` drops the offsets before it (a share taken
    over mid-run): the arrivals are still counted from the run start, so the share is the same.
    """
    profile = profile_of(pattern)
    end = profile.duration_s
    index = 0
    k, n = share
    for units in ARRIVALS[pattern.arrival](pattern.seed):
        offsets = profile.invert(units)
        picks = (np.arange(index, index + len(offsets)) % n) == k
        index += len(offsets)
        inside = offsets < end
        if start_s > 0.0:
            inside &= offsets >= start_s
        chunk = offsets[inside & picks]
        if len(chunk):
            yield chunk
        if not offsets[-1] < end:
            return


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
