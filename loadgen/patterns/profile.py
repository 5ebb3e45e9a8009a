"""Rate profiles: requests per second as a piecewise-linear function of time since the run start.

A profile is a list of segments, each holding a rate or ramping linearly between two rates. Its
integral Lambda(t) is the expected number of arrivals by t; `invert` solves Lambda(t) = s for
whole arrays of unit times s, which is how arrival processes become send times (arrivals.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RateProfile", "Segment"]


@dataclass(frozen=True)
class Segment:
    start_s: float
    duration_s: float
    from_rate: float
    to_rate: float

    @property
    def count(self) -> float:
        """Expected arrivals in the segment (the integral of its rate)."""
        return 0.5 * (self.from_rate + self.to_rate) * self.duration_s


class RateProfile:
    """Piecewise-linear rate; `constant(r, d)` or `from_stages(start_rate, [(d, rate, ramp_to)])`."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self._starts = np.array([seg.start_s for seg in segments])
        self._cum = np.concatenate([[0.0], np.cumsum([seg.count for seg in segments])])

    @classmethod
    def constant(cls, rate: float, duration_s: float) -> RateProfile:
        return cls([Segment(0.0, duration_s, rate, rate)])

    @classmethod
    def from_stages(
        cls, start_rate: float, stages: list[tuple[float, float | None, float | None]]
    ) -> RateProfile:
        """Stages are (duration, hold_rate, ramp_to): exactly one of the last two is set."""
        segments, t, rate = [], 0.0, start_rate
        for duration, hold, ramp_to in stages:
            if hold is not None:
                segments.append(Segment(t, duration, hold, hold))
                rate = hold
            else:
                segments.append(Segment(t, duration, rate, float(ramp_to)))
                rate = float(ramp_to)
            t += duration
        return cls(segments)

    @property
    def duration_s(self) -> float:
        last = self.segments[-1]
        return last.start_s + last.duration_s

    @property
    def expected_count(self) -> float:
        return float(self._cum[-1])

    @property
    def mean_rate(self) -> float:
        return self.expected_count / self.duration_s if self.duration_s > 0 else 0.0

    def count_by(self, t: float) -> float:
        """Lambda(t): expected arrivals from the start to `t` seconds."""
        total = 0.0
        for seg in self.segments:
            u = min(max(t - seg.start_s, 0.0), seg.duration_s)
            slope = (seg.to_rate - seg.from_rate) / seg.duration_s
            total += seg.from_rate * u + 0.5 * slope * u * u
        return total

    def rate_at(self, t: float) -> float:
        for seg in self.segments:
            if t < seg.start_s + seg.duration_s:
                frac = (t - seg.start_s) / seg.duration_s
                return seg.from_rate + (seg.to_rate - seg.from_rate) * frac
        return self.segments[-1].to_rate

    def invert(self, units: np.ndarray) -> np.ndarray:
        """Seconds t with Lambda(t) = s for each s; s beyond the profile's total maps past its end.

        Within a segment Lambda(start + u) = C + a*u + k*u^2/2 (a = start rate, k = slope), so
        u = 2x / (a + sqrt(a^2 + 2*k*x)) with x = s - C: one formula for holds (k = 0) and ramps,
        stable where a or k is zero.
        """
        idx = np.clip(np.searchsorted(self._cum, units, side="right") - 1, 0, len(self.segments) - 1)
        seg_from = np.array([s.from_rate for s in self.segments])[idx]
        seg_to = np.array([s.to_rate for s in self.segments])[idx]
        seg_dur = np.array([s.duration_s for s in self.segments])[idx]
        x = units - self._cum[idx]
        slope = (seg_to - seg_from) / seg_dur
        root = np.sqrt(np.maximum(seg_from * seg_from + 2.0 * slope * x, 0.0))
        denom = seg_from + root
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(denom > 0, 2.0 * x / denom, np.inf)
        return self._starts[idx] + u
