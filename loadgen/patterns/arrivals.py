"""Arrival processes in unit time: the points of a rate-1 process (second stage of DESIGN.md's flow).

An arrival process here knows nothing of rates or clocks. It yields, in chunks, the cumulative
"unit times" s_0 < s_1 < ... of a process with rate 1: constant gives 0, 1, 2, ...; Poisson gives
the cumulative sum of Exp(1) gaps, seeded. `RateProfile.invert` maps unit times to seconds through
the inverse of the integrated rate (time rescaling), which turns a rate-1 process into the same
process at any rate profile, ramps included: constant stays evenly spaced at the local rate, and
Poisson stays Poisson with intensity lambda(t).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["ARRIVALS", "constant_units", "poisson_units"]

CHUNK = 8192


def constant_units(seed: int = 0) -> Iterator[np.ndarray]:
    """0, 1, 2, ... in chunks (the seed is ignored: a constant process has no randomness)."""
    start = 0
    while True:
        yield np.arange(start, start + CHUNK, dtype=np.float64)
        start += CHUNK


def poisson_units(seed: int = 0) -> Iterator[np.ndarray]:
    """Cumulative sums of independent Exp(1) gaps from a seeded generator, in chunks."""
    rng = np.random.default_rng(seed)
    total = 0.0
    while True:
        chunk = total + np.cumsum(rng.exponential(1.0, CHUNK))
        total = float(chunk[-1])
        yield chunk


ARRIVALS: dict[str, Callable[[int], Iterator[np.ndarray]]] = {
    "constant": constant_units,
    "poisson": poisson_units,
}
