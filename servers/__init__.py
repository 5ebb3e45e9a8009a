"""Reference servers that loadgen is tried, tested and calibrated against.

Each server runs in its own process (`loadgen serve ...` or `python -m servers.<name>`); they share
servers/core, and loadgen.lowlevel with the generator. loadgen imports nothing from here; only
`loadgen serve` loads a server's main by module name.
"""

from servers.calibration import ServerConfig, TimingConfig, TimingModel

__all__ = ["ServerConfig", "TimingConfig", "TimingModel"]
