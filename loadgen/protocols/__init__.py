"""Protocol clients, one module each; `make_client` picks one by the target's protocol name.

A client has `prepare() -> metadata` (readiness check, raises TargetError), `send(intended_t)
-> Outcome` (never raises for a failed request) and `close()`.
"""

from __future__ import annotations

from typing import Any

from loadgen.scenario import Target

__all__ = ["PROTOCOLS", "make_client"]

PROTOCOLS = ("kserve-http",)


def make_client(target: Target, seed: int = 0) -> Any:
    if target.protocol == "kserve-http":
        from loadgen.protocols.kserve_http import KServeHttpClient

        return KServeHttpClient(target, seed)
    raise ValueError(f"unknown protocol {target.protocol!r}; known: {', '.join(PROTOCOLS)}")
