"""The clients of a mix: one protocol client per [[mix]] entry, prepared together before the run.

`client_of(scenario, seed)` is what every process that sends load (a single run, a Locust worker, the
locustfile) builds its client with: the target's own client without a mix, a MixClient with one. A
MixClient is a Client for prepare and close (every entry's client is checked, built and warmed up before
any load is sent; a target error names the entry); LoadContext sends each request with the client of the
entry the arrival drew (`clients[i]`) and records it under that entry's name.
"""

from __future__ import annotations

from typing import Any

from loadgen.errors import TargetError
from loadgen.protocols import make_client
from loadgen.protocols.base import Client
from loadgen.scenario import Scenario

__all__ = ["MixClient", "client_of"]


class MixClient:
    """Every entry's client, in the scenario's [[mix]] order, and the entries' names."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        assert scenario.mix, "a MixClient needs a scenario with [[mix]] entries"
        self.names = scenario.mix_names
        self.weights = [entry.weight for entry in scenario.mix]
        self.clients: list[Client] = [make_client(entry.target, seed=seed, trace=scenario.trace)
                                      for entry in scenario.mix]
        self.request_name = " | ".join(client.request_name for client in self.clients)

    @property
    def warmup_requests(self) -> int:
        return sum(client.warmup_requests for client in self.clients)

    def prepare(self) -> dict[str, Any]:
        """Prepare every entry's client; the first entry's metadata, with each entry's under "mix"."""
        found: dict[str, Any] = {}
        for name, client in zip(self.names, self.clients, strict=True):
            try:
                found[name] = client.prepare() or {}
            except TargetError as exc:
                self.close()
                exc.args = (f"mix entry {name}: {exc}", *exc.args[1:])
                raise
        first = found[self.names[0]]
        return {**first, "mix": found}

    def send(self, intended_t: float) -> Any:
        raise TypeError("a mix sends through LoadContext, which picks each request's entry")

    def close(self) -> None:
        for client in self.clients:
            client.close()


def client_of(scenario: Scenario, seed: int) -> Client | MixClient:
    """The client a process sends `scenario`'s load with (not yet prepared)."""
    if scenario.mix:
        return MixClient(scenario, seed)
    return make_client(scenario.target, seed=seed, trace=scenario.trace)
