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

`adaptive_users` is the same search over closed-loop user counts, in whole users, never running a
count twice. There is no offered rate to keep up with: a count is good when each of its users still
gets KNEE_EFFICIENCY (90 %) of the best per-user throughput of the good counts so far (by Little's
law, with no think time, X / users = 1 / mean latency: the latency has not yet risen by more than
~11 % over its best), and it met the SLO with a healthy generator. Below the knee throughput rises
with the user count; past it extra users only queue and per-user throughput falls as knee / users:
with N identical workers and no think time the knee is N users, found exactly up to N = 8 (N + 1
users get N / (N + 1) < 90 % each) and to within 11 % above. The verdict reads the same criterion
(loadgen/sweep/verdict.py), so the plan's last good count is the verdict's knee, unless the SLO
failed first (then it is the highest count that met the SLO: the verdict's max_rps_meeting_slo).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from itertools import pairwise
from typing import Protocol

__all__ = [
    "KNEE_EFFICIENCY",
    "Plan",
    "StepOutcome",
    "adaptive",
    "adaptive_bound",
    "adaptive_users",
    "adaptive_users_bound",
    "efficient",
    "geometric",
    "is_good",
    "ladder",
    "linear",
]

KNEE_EFFICIENCY = 0.9
"""Closed loop: the share of the best per-user throughput a user count must still give each user to be
below the knee."""

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


def efficient(users: float, rps: float, best_per_user: float) -> bool:
    """Closed loop: `users` users at `rps` still give each user KNEE_EFFICIENCY of `best_per_user`
    (req/s a user; 0: nothing measured yet).

    >>> efficient(4, 200.0, 50.0), efficient(5, 200.0, 50.0), efficient(9, 400.0, 50.0)
    (True, False, False)
    """
    return users > 0 and rps / users >= KNEE_EFFICIENCY * best_per_user


def _users_good(result: StepOutcome | None, users: int, best_per_user: float) -> bool:
    if result is None or result.generator_bound or result.slo_met is False:
        return False
    return efficient(users, result.achieved_rps, best_per_user)


def _user_ladder(start: int, stop: int, factor: float) -> list[int]:
    """start, then x factor (at least one more user each time), capped at stop."""
    counts = [start]
    while counts[-1] < stop:
        counts.append(min(max(counts[-1] + 1, round(counts[-1] * factor)), stop))
    return counts


def adaptive_users(start: int, stop: int, factor: float = 2.0, tolerance: float = 0.05) -> Plan:
    """Closed loop: grow the user count from `start` by `factor` (whole users, capped at `stop`) while
    each count is below the knee (see `efficient`), then bisect between the last good and the first bad
    count until they are adjacent (or within `tolerance` of each other, for large counts).

    Ends without bisecting when the first step is already bad or `stop` was good.

    >>> plan = adaptive_users(1, 16)
    >>> [next(plan)]  # then plan.send(step) for each result
    [1.0]
    """
    _check_users(start, stop, factor)
    good_users: int | None = None
    best = 0.0  # req/s a user, the best of the good counts
    for users in _user_ladder(int(start), int(stop), factor):
        result = yield float(users)
        if not _users_good(result, users, best):
            bad_users = users
            break
        good_users, best = users, max(best, result.achieved_rps / users)
    else:
        return
    if good_users is None:
        return
    while bad_users - good_users > max(1, math.floor(tolerance * good_users)):
        users = (good_users + bad_users) // 2
        result = yield float(users)
        if _users_good(result, users, best):
            good_users, best = users, max(best, result.achieved_rps / users)
        else:
            bad_users = users


def adaptive_users_bound(start: int, stop: int, factor: float = 2.0, tolerance: float = 0.05) -> int:
    """The most steps `adaptive_users` can take with these settings (for "step k of at most n")."""
    _check_users(start, stop, factor)
    counts = _user_ladder(int(start), int(stop), factor)
    widest = max((b - a for a, b in pairwise(counts)), default=1)
    return len(counts) + math.ceil(math.log2(widest))


def _check_users(start: int, stop: int, factor: float) -> None:
    if int(start) != start or int(stop) != stop:
        raise ValueError("user counts are whole numbers")
    _check_growth(start, stop, factor)


def _check_growth(start: float, stop: float, factor: float) -> None:
    if start <= 0 or stop < start:
        raise ValueError("a sweep needs 0 < start <= max")
    if factor <= 1:
        raise ValueError("the growth factor must be > 1, e.g. 1.5")
