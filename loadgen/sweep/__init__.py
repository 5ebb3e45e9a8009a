"""Saturation sweeps: a sequence of runs at rising load -> the curve -> the saturation verdict.

    plan (which load next; loadgen.sweep.plan) -> step (one run, warm-up cut, stability judged;
    loadgen.sweep.step) -> verdict (saturation, max rate meeting the SLO, knee; loadgen.sweep.verdict)

These modules are pure (no locust, no gevent); loadgen/_sweepcmd.py runs the steps and writes the files.
"""

from loadgen.sweep.plan import Plan, adaptive, adaptive_users, geometric, ladder, linear
from loadgen.sweep.step import StepResult, Window, measured_recorder, stability
from loadgen.sweep.verdict import verdict

__all__ = [
    "Plan",
    "StepResult",
    "Window",
    "adaptive",
    "adaptive_users",
    "geometric",
    "ladder",
    "linear",
    "measured_recorder",
    "stability",
    "verdict",
]
