"""loadgen: a load tester for deployed ML inference endpoints.

The public names below are the library surface; everything else lives in modules that may change.
Importing this package does not import locust (and so does not monkey-patch with gevent): the
driver (`loadgen.driver.run.execute`) does that when load is actually sent. The public names are
loaded on first use (PEP 562), so importing a submodule alone, e.g. loadgen.lowlevel.timerfd from a
reference server, does not import the scenario model (pydantic) or the recorder (hdrhistogram).
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from loadgen.errors import (
        LoadgenError,
        ProtocolMismatch,
        TargetError,
        TargetNotReady,
        TargetUnreachable,
    )
    from loadgen.outcome import Outcome
    from loadgen.recorder import HistogramSet, Interval, Recorder
    from loadgen.scenario import (
        ClosedLoop,
        OpenLoop,
        Scenario,
        ScenarioError,
        Stage,
        Target,
        load_scenario,
    )

__version__ = "0.1.0"

__all__ = [
    "ClosedLoop",
    "HistogramSet",
    "Interval",
    "LoadgenError",
    "OpenLoop",
    "Outcome",
    "ProtocolMismatch",
    "Recorder",
    "Scenario",
    "ScenarioError",
    "Stage",
    "Target",
    "TargetError",
    "TargetNotReady",
    "TargetUnreachable",
    "__version__",
    "load_scenario",
]

_SOURCES = {
    "LoadgenError": "loadgen.errors",
    "ProtocolMismatch": "loadgen.errors",
    "TargetError": "loadgen.errors",
    "TargetNotReady": "loadgen.errors",
    "TargetUnreachable": "loadgen.errors",
    "Outcome": "loadgen.outcome",
    "HistogramSet": "loadgen.recorder",
    "Interval": "loadgen.recorder",
    "Recorder": "loadgen.recorder",
    "ClosedLoop": "loadgen.scenario",
    "OpenLoop": "loadgen.scenario",
    "Scenario": "loadgen.scenario",
    "ScenarioError": "loadgen.scenario",
    "Stage": "loadgen.scenario",
    "Target": "loadgen.scenario",
    "load_scenario": "loadgen.scenario",
}
"""Public name -> the module that defines it, imported when the name is first looked up."""


def __getattr__(name: str) -> object:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
