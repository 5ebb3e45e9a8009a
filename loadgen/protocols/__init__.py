"""Protocol clients, one module each; `make_client` picks one by the target's protocol name.

A client has `prepare() -> metadata` (readiness check, raises TargetError), `send(intended_t)
-> Outcome` (never raises for a failed request) and `close()`. A client whose `streams` attribute is
true returns StreamOutcomes (token timings too) and the driver records them as such.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from loadgen.errors import ProtocolMismatch
from loadgen.scenario import Target

__all__ = ["PROTOCOLS", "WARMUP_REQUESTS", "make_client", "warm_up"]

WARMUP_REQUESTS = 8

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


def warm_up(client: Any, what: str, tolerated: Collection[str] = ("invalid_response",),
            count: int = WARMUP_REQUESTS) -> None:
    """Unmeasured requests through the client's own `send`: open a connection, warm both sides' code
    paths, and learn before the run (not thousands of errors into it) that the target rejects the
    request built. Error kinds in `tolerated` are the behaviour under test (a wrong answer, a cut
    stream), counted by the run rather than fatal here."""
    for _ in range(count):
        outcome = client.send(time.monotonic())
        client.warmup_requests += 1
        if outcome.error is not None and outcome.error not in tolerated:
            raise ProtocolMismatch(f"the warm-up request to {what} failed "
                                   f"({outcome.error}: {outcome.message or 'no detail'})")
