"""The saturation verdict of a sweep: from its steps (the curve) to the figures a person acts on.

Place in the flow: plan -> step -> **verdict** -> sweep.json, curve.csv, exit code.

- saturation_rps: the highest achieved throughput among steps whose generator kept its schedule.
  A generator-bound step measured the generator, so it is never the saturation point; when the
  best throughput came from such a step, the verdict says the generator must scale out.
- max_rps_meeting_slo: the highest achieved throughput among healthy steps that met the SLO (None
  when there is no SLO or no step met it).
- knee: the highest-load healthy step that still kept up with its offered rate (achieved within
  the tolerance of offered) and was stable (any that kept up when none was); past it, the
  endpoint queues. Closed loop (no offered rate): the healthy steps in user-count order, the last
  one of the first run of steps whose users each still got 90 % of the best per-user throughput
  so far (loadgen.sweep.plan.efficient, the criterion of the adaptive user search); past it,
  extra users only queue. It gives its `load` (req/s, or users) beside its figures.
- saturated: whether some healthy step fell behind its offered rate (or, closed loop, lies past
  the knee); when none did, saturation_rps is only a lower bound.
- slo_met: at least one healthy step met every objective (True when there is no SLO).
- goodput (only when the steps were judged against goodput terms, --goodput; else absent):
  - best: the healthy step with the highest goodput_rps (good requests per second): the most useful
    work the endpoint did, which past the knee often falls while achieved throughput still grows;
  - knee: in load order, the last healthy step of the first run of steps whose goodput share (good /
    responses) stayed >= share_floor (GOODPUT_SHARE_FLOOR, 0.9): the highest offered rate (closed loop:
    user count) at which nine requests in ten still met every term. A later step that climbs back over
    the floor after one fell under it does not count: the share did not *stay* there. None when the
    first step was already under the floor.
  Each gives step, load, offered_rps, achieved_rps, goodput_rps and share.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from loadgen.sweep.plan import efficient
from loadgen.sweep.step import StepResult

__all__ = ["GOODPUT_SHARE_FLOOR", "verdict"]

GOODPUT_SHARE_FLOOR = 0.9
"""The goodput share (good / responses) a step must keep to be at or below the goodput knee."""


def _kept_up(step: StepResult, tolerance: float) -> bool:
    return step.offered_rps <= 0 or step.achieved_rps >= (1 - tolerance) * step.offered_rps


def _summary(step: StepResult | None) -> dict[str, Any] | None:
    if step is None:
        return None
    return {"step": step.index, "load": step.load, "offered_rps": round(step.offered_rps, 3),
            "achieved_rps": round(step.achieved_rps, 3), "p99_ms": step.latency_ms.get("p99")}


def _saturated(healthy: list[StepResult], tolerance: float) -> bool:
    """Some step fell behind its offered rate, or (closed loop) some step lies past the knee."""
    if any(not _kept_up(step, tolerance) for step in healthy):
        return True
    if healthy and all(step.offered_rps <= 0 for step in healthy):
        knee = _closed_loop_knee(healthy)
        return knee is not None and knee.load < max(step.load for step in healthy)
    ordered = sorted(healthy, key=lambda step: step.load)
    return any(b.offered_rps <= 0 and b.achieved_rps < (1 + tolerance) * a.achieved_rps
               for a, b in pairwise(ordered))


def _closed_loop_knee(healthy: list[StepResult]) -> StepResult | None:
    """In user-count order, the last step of the first run whose users each still got KNEE_EFFICIENCY
    of the best per-user throughput before them."""
    knee, best = None, 0.0
    for step in sorted(healthy, key=lambda step: step.load):
        if not efficient(step.load, step.achieved_rps, best):
            break
        knee, best = step, max(best, step.achieved_rps / step.load)
    return knee


def _notes(steps: Sequence[StepResult], best: StepResult | None, saturated: bool) -> list[str]:
    notes = []
    top = max(steps, key=lambda step: step.achieved_rps, default=None)
    if top is not None and top.generator_bound:
        notes.append(f"the highest throughput ({top.achieved_rps:.1f} req/s, step {top.index}) came from a "
                     "generator-bound step: scale the generator out (Locust workers) to measure beyond it")
    if best is None:
        notes.append("every step was generator-bound: no saturation figure can be given")
    elif not saturated:
        notes.append("the endpoint kept up at every healthy step: saturation_rps is a lower bound, "
                     "raise the load")
    return notes


def _goodput_step(step: StepResult | None) -> dict[str, Any] | None:
    if step is None:
        return None
    return {"step": step.index, "load": step.load, "offered_rps": round(step.offered_rps, 3),
            "achieved_rps": round(step.achieved_rps, 3), "goodput_rps": step.goodput_rps,
            "share": step.goodput_share}


def _goodput(steps: Sequence[StepResult], healthy: list[StepResult]) -> dict[str, Any] | None:
    """The goodput part of the verdict (module docstring); None when no step was judged for goodput."""
    judged = [step for step in steps if step.goodput is not None]
    if not judged:
        return None
    healthy_judged = [step for step in healthy if step.goodput is not None]
    best = max(healthy_judged, key=lambda step: step.goodput_rps or 0.0, default=None)
    knee = None
    for step in sorted(healthy_judged, key=lambda step: step.load):
        if (step.goodput_share or 0.0) < GOODPUT_SHARE_FLOOR:
            break
        knee = step
    return {"terms": judged[0].goodput["terms"], "share_floor": GOODPUT_SHARE_FLOOR,
            "best": _goodput_step(best), "knee": _goodput_step(knee)}


def verdict(steps: Sequence[StepResult], *, has_slo: bool, tolerance: float = 0.05) -> dict[str, Any]:
    """The sweep's verdict as a JSON-able dict (see the module docstring for each key)."""
    healthy = [step for step in steps if not step.generator_bound]
    best = max(healthy, key=lambda step: step.achieved_rps, default=None)
    meeting = [step for step in healthy if step.slo_met]
    best_meeting = max(meeting, key=lambda step: step.achieved_rps, default=None)
    if healthy and all(step.offered_rps <= 0 for step in healthy):
        knee = _closed_loop_knee(healthy)
    else:
        kept_up = [s for s in healthy if _kept_up(s, tolerance)]
        knee = max([s for s in kept_up if s.stable] or kept_up, key=lambda step: step.load, default=None)
    saturated = _saturated(healthy, tolerance)
    goodput = _goodput(steps, healthy)
    return {
        "saturation_rps": round(best.achieved_rps, 3) if best else None,
        "saturated": saturated,
        "saturation_step": best.index if best else None,
        "max_rps_meeting_slo": round(best_meeting.achieved_rps, 3) if best_meeting else None,
        "slo_met": (best_meeting is not None) if has_slo else True,
        "knee": _summary(knee),
        "generator_bound_steps": [step.index for step in steps if step.generator_bound],
        "notes": _notes(steps, best, saturated),
        **({"goodput": goodput} if goodput is not None else {}),
    }
