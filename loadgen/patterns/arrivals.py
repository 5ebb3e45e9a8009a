"""Arrival processes in unit time: the points of a rate-1 process (second stage of DESIGN.md's flow).

An arrival process here knows nothing of rates or clocks. It yields, in chunks, the cumulative
"unit times" s_0 < s_1 < ... of a process with rate 1: constant gives 0, 1, 2, ...; Poisson gives
the cumulative sum of Exp(1) gaps, seeded; gamma the cumulative sum of Gamma(k, 1/k) gaps (mean 1,
coefficient of variation 1/sqrt(k): vLLM's "burstiness" k; k = 1 is Poisson). `RateProfile.invert` maps unit times to seconds through
the inverse of the integrated rate (time rescaling), which turns a rate-1 process into the same
process at any rate profile, ramps included: constant stays evenly spaced at the local rate, and
Poisson stays Poisson with intensity lambda(t).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["ARRIVALS", "constant_units", "gamma_units", "poisson_units"]

CHUNK = 8192


def constant_units(seed: int = 0, burstiness: float = 1.0) -> Iterator[np.ndarray]:
    """0, 1, 2, ... in chunks (seed and burstiness are ignored: a constant process has no randomness)."""
    start = 0
    while True:
        yield np.arange(start, start + CHUNK, dtype=np.float64)
        start += CHUNK


def poisson_units(seed: int = 0, burstiness: float = 1.0) -> Iterator[np.ndarray]:
    """Cumulative sums of independent Exp(1) gaps from a seeded generator, in chunks (burstiness is 1)."""
    rng = np.random.default_rng(seed)
    total = 0.0
    while True:
        chunk = total + np.cumsum(rng.exponential(1.0, CHUNK))
        total = float(chunk[-1])
        yield chunk


def gamma_units(seed: int = 0, burstiness: float = 1.0) -> Iterator[np.ndarray]:
    """Cumulative sums of independent Gamma(burstiness, 1/burstiness) gaps (mean 1), seeded, in chunks."""
    rng = np.random.default_rng(seed)
    total = 0.0
    while True:
        chunk = total + np.cumsum(rng.gamma(burstiness, 1.0 / burstiness, CHUNK))
        total = float(chunk[-1])
        yield chunk


ARRIVALS: dict[str, Callable[[int, float], Iterator[np.ndarray]]] = {
    "constant": constant_units,
    "poisson": poisson_units,
    "gamma": gamma_units,
}
