"""Reference servers that loadgen is tried, tested and calibrated against.

Each server runs in its own process (`loadgen serve ...` or `python -m servers.<name>`); they share
only servers/core. Never imported by the generator's hot path.
"""

from servers.calibration import ServerConfig, TimingConfig, TimingModel

__all__ = ["ServerConfig", "TimingConfig", "TimingModel"]
