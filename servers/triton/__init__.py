"""Triton-compatible reference server: KServe v2 over HTTP (binary tensor extension) and gRPC, plus
Prometheus metrics with Triton's names.

Run it with `python -m servers.triton --http-port 0 [--grpc-port 0] [--metrics-port 0]` (or `loadgen
serve triton`); it hosts the built-in models of servers/models. tritonclient is the judge of its wire
behaviour (tests).
"""

from servers.triton._app import TritonApp

__all__ = ["TritonApp"]
