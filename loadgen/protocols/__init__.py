"""Protocol clients, one module each; `make_client` picks one by the target's protocol name.

A client has `prepare() -> metadata` (readiness check, raises TargetError), `send(intended_t)
-> Outcome` (never raises for a failed request) and `close()`. A client whose `streams` attribute is
true returns StreamOutcomes (token timings too) and the driver records them as such.
"""

from __future__ import annotations

from typing import Any

from loadgen.scenario import Target

__all__ = ["PROTOCOLS", "make_client"]

PROTOCOLS = ("kserve-http", "kserve-grpc", "torchserve-http", "torchserve-grpc", "openai")


def make_client(target: Target, seed: int = 0) -> Any:
    if target.protocol == "kserve-http":
        from loadgen.protocols.kserve_http import KServeHttpClient

        return KServeHttpClient(target, seed)
    if target.protocol == "kserve-grpc":
        from loadgen.protocols.kserve_grpc import KServeGrpcClient

        return KServeGrpcClient(target, seed)
    if target.protocol == "torchserve-http":
        from loadgen.protocols.torchserve import TorchServeHttpClient

        return TorchServeHttpClient(target, seed)
    if target.protocol == "torchserve-grpc":
        from loadgen.protocols.torchserve import TorchServeGrpcClient

        return TorchServeGrpcClient(target, seed)
    if target.protocol == "openai":
        from loadgen.protocols.openai import OpenAIClient

        return OpenAIClient(target, seed)
    raise ValueError(f"unknown protocol {target.protocol!r}; known: {', '.join(PROTOCOLS)}")
