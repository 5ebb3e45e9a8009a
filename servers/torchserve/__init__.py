"""TorchServe-compatible reference server: the inference, management and metrics APIs over HTTP and the
gRPC inference and management services of TorchServe 0.12, serving .mar archives made by the real
torch-model-archiver with their handlers (BaseHandler subclasses included), with TorchServe's workers
and batching.

Run it with `python -m servers.torchserve --model-store DIR --models name=file.mar` (or `loadgen serve
torchserve`). The recorded exchanges of a real TorchServe (../shared/torchserve-captures) are the judge
of its wire behaviour (tests/test_torchserve_*.py).
"""

from servers.torchserve._config import Settings, load_settings, read_properties

__all__ = ["Settings", "load_settings", "read_properties"]
