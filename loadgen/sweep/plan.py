"""Sweep plans: which load each step of a sweep runs at (first stage of a sweep).

Place in the flow: **plan** -> step (one run at that load) -> verdict. A plan is a generator in the
style of guidellm's sweep profiles: it yields the load of the next step and receives that step's
result through `send()`, so an adaptive plan can pick the next load from what it just measured.

    plan = adaptive(50, 400)
    load = next(plan)
    while True:
        result = run_step(load)
        try:
            load = plan.send(result)
        except StopIteration:
            break

Ladders (explicit, linear, geometric) ignore the results and run every value. `adaptive` grows
geometrically until a step is *bad* (missed the SLO, fell behind the offered rate, throughput grew
by less than the tolerance, or the generator was the bottleneck), then bisects between the last good
and the first bad load until they are within the tolerance of each other.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from typing import Protocol

__all__ = ["Plan", "StepOutcome", "adaptive", "adaptive_bound", "geometric", "is_good", "ladder", "linear"]

Plan = Generator[float, "StepOutcome | None", None]
"""Yields loads (req/s, or users in closed loop); receives each step's outcome via send()."""


class StepOutcome(Protocol):
    """What a plan reads of a finished step (loadgen.sweep.step.StepResult has these)."""

    offered_rps: float
    achieved_rps: float
    slo_met: bool | None
    generator_bound: bool


def ladder(values: Sequence[float]) -> Plan:
    """Run each value in turn, whatever the results.

    >>> list(ladder([100, 200, 400]))
    [100.0, 200.0, 400.0]
    """
    for value in values:
        yield float(value)


def linear(start: float, stop: float, increment: float) -> list[float]:
    """start, start + increment, ... up to stop (included when it falls on the ladder).

    >>> linear(100, 300, 50)
    [100.0, 150.0, 200.0, 250.0, 300.0]
    """
    if increment <= 0 or start <= 0 or stop < start:
        raise ValueError("a linear ladder needs 0 < start <= stop and increment > 0")
    count = math.floor((stop - start) / increment + 1e-9) + 1
    return [round(float(start + k * increment), 6) for k in range(count)]


def geometric(start: float, stop: float, factor: float) -> list[float]:
    """start, start * factor, ... up to stop; stop itself ends the ladder when the last factor overshoots.

    >>> geometric(100, 400, 2)
    [100.0, 200.0, 400.0]
    >>> geometric(100, 300, 2)
    [100.0, 200.0, 300.0]
    """
    _check_growth(start, stop, factor)
    values = [float(start)]
    while values[-1] * factor < stop * (1 - 1e-9):
        values.append(round(values[-1] * factor, 6))
    if values[-1] < stop:
        values.append(float(stop))
    return values


def is_good(result: StepOutcome, previous: StepOutcome | None, tolerance: float = 0.05) -> bool:
    """A step the endpoint handled: SLO met (or none), kept up with the offered rate, throughput still
    growing over the previous good step, and a healthy generator."""
    if result.generator_bound or result.slo_met is False:
        return False
    if result.offered_rps > 0 and result.achieved_rps < (1 - tolerance) * result.offered_rps:
        return False
    return previous is None or result.achieved_rps >= (1 + tolerance) * previous.achieved_rps


def adaptive(start: float, stop: float, factor: float = 1.5, tolerance: float = 0.05) -> Plan:
    """Grow from `start` by `factor` (capped at `stop`) until a step is bad, then bisect to `tolerance`.

    Ends without bisecting when the first step is already bad or `stop` was good.
    """
    _check_growth(start, stop, factor)
    good_load, bad_load = None, None
    good: StepOutcome | None = None
    load = float(start)
    while True:
        result = yield load
        if result is None or not is_good(result, good, tolerance):
            bad_load = load
            break
        good_load, good = load, result
        if load >= stop:
            return
        load = min(round(load * factor, 6), float(stop))
    if good_load is None:
        return
    while bad_load - good_load > tolerance * good_load:
        load = round((good_load + bad_load) / 2, 6)
        result = yield load
        # Between two measured loads only keeping up counts: growth was judged on the way up.
        if result is not None and is_good(result, None, tolerance):
            good_load = load
        else:
            bad_load = load


def adaptive_bound(start: float, stop: float, factor: float, tolerance: float = 0.05) -> int:
    """The most steps `adaptive` can take with these settings (for "step k of at most n")."""
    growth = len(geometric(start, stop, factor))
    bisections = max(0, math.ceil(math.log2(max(factor - 1, tolerance) / tolerance)))
    return growth + bisections


def _check_growth(start: float, stop: float, factor: float) -> None:
    if start <= 0 or stop < start:
        raise ValueError("a sweep needs 0 < start <= max")
    if factor <= 1:
        raise ValueError("the growth factor must be > 1, e.g. 1.5")
