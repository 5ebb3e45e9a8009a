"""The calibration server: a KServe v2 HTTP endpoint whose true latency is declared on its command line.

It is the ground truth the load generator is tested against (DESIGN.md, "Numbers must be true").
Run it with `python -m servers.calibration --port 0 --delay-ms 20`; compute what a client should have
measured with TimingModel(TimingConfig(...), t0).done_at(arrival_t), t0 being read from GET /calibration.
"""

from servers.calibration._app import ServerConfig
from servers.calibration.timing import TimingConfig, TimingModel

__all__ = ["ServerConfig", "TimingConfig", "TimingModel"]
