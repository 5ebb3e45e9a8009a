"""Judging measured times against the truth, on a host whose own timing is noisy.

`truth_percentiles` gives the percentiles of the true latencies of a run (computed from a server's
timing model), as loadgen reports them; `within` compares a figure with its truth.

The VMs the suite runs on lose a core to the host for 1-3 ms a few times a second, in bursts that come
and go; such a burst can push one run's tail past a tolerance of a millisecond whatever the code does.
So a timing test measures the host's own timer noise, as cyclictest does: one probe process pinned to
each core sleeps 2 ms at a time and records how late it wakes (timer slack 1 ns). The probes run from
the first test that asks for them to the end of the session; a test's noise is the lateness over its
own window, from BEFORE_S before it started to the check, so the burst that hit the test is in it. A
check that fails before the window is MIN_WINDOW_S long waits for that much (the "after").

A check (HostNoise.assert_near, assert_below) passes when the figure is within its tolerance plus the
quantile of the probes' lateness that matters for it, that widening capped at `cap_ms`: a systematic
error larger than tolerance + cap fails on any host. One probe sample is one wake-up; one request meets
about ten chances to be delayed (wake-ups and work in two processes, over tens of ms), so a request
figure at quantile q is matched with the probes' 1 - (1 - q) / 10: a p99 latency with their p99.9 (the
default), a median with their p95; a figure of one wake-up with the same quantile, one event with max.
Measured here under load (3 runs of 100 req/s to a 20 ms server): latency p99 off by 2.7, 1.8 and
0.8 ms, the probes' p99 0.3, 0.3, 0.1 ms, their p99.9 2.2, 3.1, 2.1 ms.
When the noise itself is over the cap and the check fails, the host was too noisy to judge it: the test
is skipped with that message and its figures (noise, steal, load average), neither passed nor failed; a
quieter host judges it strictly. A check with no tolerance to widen (assert_holds: a batch that forms
unless the host stalls 30 ms) fails, or is skipped the same way when the noise was over its margin. A check that passes within its own tolerance reads no
noise at all. Each failure message gives the figure, the truth, the tolerance, the noise added, and
the host's state (steal time, load average).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

PROBE_INTERVAL_S = 0.002
"""Each probe sleeps this long at a time: 500 wake-ups a second, about 1 % of a core."""
BEFORE_S = 0.3
"""A test's noise window opens this long before the test started."""
MIN_WINDOW_S = 0.3
"""A failed check reads at least this much of the probes (waiting for it when the test was shorter)."""
TOO_NOISY = "the host was too noisy to judge"
"""How a check whose tolerance could not cover the host's noise begins its message; such a check is
skipped with that message (and its figures), neither passed nor failed."""
DEFAULT_CAP_MS = 5.0
"""The most a check's tolerance is widened by the host's noise: VMs of this kind were seen losing a core for
3-4 ms at p99.9 of their wake-ups with nothing else running (steal from the hypervisor); a generator
error of a millisecond still fails on a quiet host, and checks that guard against one set a smaller cap."""

_PROBE = """
import array, ctypes, os, sys, time
path, interval, cpu = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
os.sched_setaffinity(0, {cpu})
try:
    ctypes.CDLL(None).prctl(29, ctypes.c_ulong(1), 0, 0, 0)  # PR_SET_TIMERSLACK: 1 ns
except (AttributeError, OSError):
    pass
mono, sleep, parent = time.monotonic, time.sleep, os.getppid()
with open(path, "ab", buffering=0) as out:
    samples, flushed = array.array("d"), mono()
    while os.getppid() == parent:  # the test session is gone: so is the probe
        t0 = mono()
        sleep(interval)
        t1 = mono()
        samples.append(t1)
        samples.append(t1 - t0 - interval)
        if t1 - flushed > 0.05:
            out.write(samples.tobytes())
            samples, flushed = array.array("d"), t1
"""


def within(measured: float, truth: float, rel: float, floor_ms: float = 0.0) -> bool:
    return abs(measured - truth) <= max(floor_ms, rel * truth)


def truth_percentiles(latencies_ms: np.ndarray) -> dict[str, float]:
    points = {"p90": 90.0, "p99": 99.0, "p99_9": 99.9}
    return {k: float(np.percentile(latencies_ms, q, method="inverted_cdf")) for k, q in points.items()}


# -- the probes -------------------------------------------------------------------------------------------

class _Probe:
    """One probe process pinned to `cpu`, and what it has written so far: (wake-up instant, lateness)."""

    def __init__(self, cpu: int, folder: Path) -> None:
        self.path = folder / f"probe-{cpu}.bin"
        self.path.touch()
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE, str(self.path), str(PROBE_INTERVAL_S),
                                      str(cpu)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self._offset = 0
        self.t = np.empty(0)
        self.late = np.empty(0)

    def read(self) -> None:
        with self.path.open("rb") as source:
            source.seek(self._offset)
            data = source.read()
        data = data[: len(data) - len(data) % 16]
        self._offset += len(data)
        pairs = np.frombuffer(data, dtype=np.float64).reshape(-1, 2)
        newest = pairs[-1, 0] if len(pairs) else (self.t[-1] if len(self.t) else 0.0)
        keep = self.t > newest - 600.0  # the last 10 minutes
        self.t = np.concatenate([self.t[keep], pairs[:, 0]])
        self.late = np.concatenate([self.late[keep], pairs[:, 1]])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class NoiseProbes:
    """A probe on each core this process may use, from `start()` until `stop()` (one per session)."""

    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="loadgen-host-noise-"))
        self.started_t = time.monotonic()
        self._probes = [_Probe(cpu, self._folder) for cpu in sorted(os.sched_getaffinity(0))]

    def lateness_since(self, start_t: float) -> np.ndarray:
        """Every wake-up lateness (seconds) the probes recorded from `start_t` on, all cores together."""
        parts = []
        for probe in self._probes:
            probe.read()
            parts.append(probe.late[probe.t >= start_t])
        return np.concatenate(parts)

    def stop(self) -> None:
        for probe in self._probes:
            probe.stop()
            probe.path.unlink(missing_ok=True)
        self._folder.rmdir()


def _steal_ticks() -> int:
    """Time the hypervisor ran something else while this VM's cores wanted to run (all cores, USER_HZ)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return float("nan")


# -- a test's noise, and the checks that allow for it ---------------------------------------------------

@dataclass(frozen=True)
class NoiseReport:
    """The host's wake-up lateness over one test's window (milliseconds), and its state meanwhile."""

    p50: float
    p90: float
    p95: float
    p99: float
    p99_9: float
    max: float
    wakeups: int
    window_s: float
    steal_ms: float
    loadavg: float

    @classmethod
    def of(cls, late_s: np.ndarray, window_s: float, steal_ms: float, loadavg: float) -> NoiseReport:
        late_ms = np.maximum(np.asarray(late_s, dtype=np.float64), 0.0) * 1000.0
        if not len(late_ms):
            late_ms = np.array([np.inf])  # no probe woke at all: as noisy as can be
        p50, p90, p95, p99, p99_9 = (float(v) for v in np.percentile(late_ms, [50, 90, 95, 99, 99.9]))
        return cls(p50, p90, p95, p99, p99_9, float(late_ms.max()), len(late_s), window_s, steal_ms, loadavg)

    def quantile(self, name: str) -> float:
        """"p50", "p90", "p95", "p99", "p99.9" or "max" of the lateness (ms)."""
        return {"p50": self.p50, "p90": self.p90, "p95": self.p95, "p99": self.p99, "p99.9": self.p99_9,
                "max": self.max}[name]

    def describe(self, name: str) -> str:
        return (f"{name} wake-up lateness of {self.wakeups} {PROBE_INTERVAL_S * 1000:g} ms sleeps on every "
                f"core over the {self.window_s:.1f} s from just before the test to the check; host steal "
                f"{self.steal_ms:.0f} ms, load average {self.loadavg:.2f}")


def verdict(holds: Callable[[float], bool], what: Callable[[float], str], noise: NoiseReport | None, *,
            quantile: str, cap_ms: float) -> str | None:
    """None when `holds(allowance_ms)`, the allowance being the host's noise at `quantile` capped at `cap_ms`
    (0 without a report); else the failure message: `what(allowance_ms)`, the noise, and whether the host
    was too noisy to judge (its noise over the cap)."""
    if noise is None:
        return None if holds(0.0) else what(0.0)
    level = noise.quantile(quantile)
    allowance = min(level, cap_ms)
    if holds(allowance):
        return None
    message = f"{what(allowance)} ({noise.describe(quantile)})"
    if level > cap_ms:
        return (f"{TOO_NOISY}: its {quantile} wake-up lateness {level:.3f} ms is over "
                f"the {cap_ms:g} ms this check allows for. {message}")
    return message


class HostNoise:
    """One test's view of the probes (its window opens BEFORE_S before the test) and the checks that allow
    for the noise they saw. Figures are in milliseconds unless `unit` says how many ms one unit is."""

    def __init__(self, probes: NoiseProbes) -> None:
        self._probes = probes
        self.start_t = max(time.monotonic() - BEFORE_S, probes.started_t)
        self._steal0 = _steal_ticks()

    def report(self) -> NoiseReport:
        """The lateness from the window's start to now, waiting until the window is MIN_WINDOW_S long."""
        short = self.start_t + MIN_WINDOW_S + 0.06 - time.monotonic()  # + a flush of the probes
        if short > 0:
            time.sleep(short)
        late = self._probes.lateness_since(self.start_t)
        steal_ms = (_steal_ticks() - self._steal0) * 1000.0 / os.sysconf("SC_CLK_TCK")
        return NoiseReport.of(late, time.monotonic() - self.start_t, steal_ms, _loadavg())

    def assert_within(self, holds: Callable[[float], bool], what: Callable[[float], str], *, quantile: str,
                      cap_ms: float) -> None:
        """`holds(allowance_ms)` must be true for no allowance, or for the host's noise at `quantile` capped
        at `cap_ms` (read only when the strict check fails); `what(allowance_ms)` says what failed."""
        __tracebackhide__ = True
        if holds(0.0):
            return
        message = verdict(holds, what, self.report(), quantile=quantile, cap_ms=cap_ms)
        if message is not None and message.startswith(TOO_NOISY):
            # Not judged: the host's own noise was over what this check can tell apart from an error.
            # On a quieter host the same check is strict, so a systematic error still fails there.
            pytest.skip(message)
        if message is not None:
            raise AssertionError(message)

    def assert_near(self, measured: float, truth: float, tolerance: float, *, what: str,
                    quantile: str = "p99.9", cap_ms: float = DEFAULT_CAP_MS, unit: float = 1.0) -> None:
        """|measured - truth| <= tolerance + the host's noise at `quantile`, capped at `cap_ms`."""
        __tracebackhide__ = True
        off_ms, tolerance_ms = abs(measured - truth) * unit, tolerance * unit
        self.assert_within(
            lambda allowance_ms: off_ms <= tolerance_ms + allowance_ms,
            lambda allowance_ms: (f"{what} {measured:g} against {truth:g}: off by {off_ms:.3f} ms; tolerance "
                                  f"{tolerance_ms:g} ms + host noise {allowance_ms:.3f} ms"),
            quantile=quantile, cap_ms=cap_ms)

    def assert_below(self, measured: float, bound: float, *, what: str, quantile: str = "p99.9",
                     cap_ms: float = DEFAULT_CAP_MS, unit: float = 1.0) -> None:
        """measured < bound + the host's noise at `quantile`, capped at `cap_ms`."""
        __tracebackhide__ = True
        over_ms = (measured - bound) * unit
        self.assert_within(
            lambda allowance_ms: over_ms < allowance_ms,
            lambda allowance_ms: (f"{what} {measured:g} against a bound of {bound:g}: over by "
                                  f"{over_ms:.3f} ms; host noise {allowance_ms:.3f} ms allowed"),
            quantile=quantile, cap_ms=cap_ms)

    def assert_holds(self, condition: bool, *, what: str, margin_ms: float, quantile: str = "max") -> None:
        """A check with no tolerance to widen, which only a host stall longer than `margin_ms` could break:
        it fails whatever the noise, saying the host was too noisy to judge when it was over the margin."""
        __tracebackhide__ = True
        self.assert_within(lambda _: condition, lambda _: what, quantile=quantile, cap_ms=margin_ms)
