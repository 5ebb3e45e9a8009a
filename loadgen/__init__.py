"""loadgen: a load tester for deployed ML inference endpoints.

The public names below are the library surface; everything else lives in modules that may change.
Importing this package does not import locust (and so does not monkey-patch with gevent): the
driver (`loadgen.driver.run.execute`) does that when load is actually sent.
"""

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
