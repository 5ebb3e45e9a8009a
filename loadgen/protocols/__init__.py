"""The protocol registry: every protocol plug-in by name, and the client for a target.

A protocol is a module directly in this package that defines `PROTOCOL` (a ProtocolSpec, see
base.py): its target options model, its flags and its client. Adding one is adding such a module (and
its tests): the registry finds it, the scenario's `[target]` accepts its `protocol = "<name>"` with its
keys, and `run`, `sweep` and every other verb that sends load offer its flags. Protocols from other
packages register through the `loadgen.protocols` entry-point group (each entry point names a
ProtocolSpec). Helpers shared by several protocols live in common/, and nothing there is a protocol.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from loadgen.patterns.trace import Trace
from loadgen.protocols.base import Client, ProtocolSpec, TargetOptions

__all__ = ["DEFAULT_PROTOCOL", "make_client", "owners_of", "protocol_names", "protocols", "spec_of"]

DEFAULT_PROTOCOL = "kserve-http"
_NOT_PROTOCOLS = {"base", "common"}


@cache
def protocols() -> dict[str, ProtocolSpec]:
    """Every protocol by name: the modules of this package, then the `loadgen.protocols` entry points."""
    found: dict[str, ProtocolSpec] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg or module.name.startswith("_") or module.name in _NOT_PROTOCOLS:
            continue
        spec = importlib.import_module(f"{__name__}.{module.name}").PROTOCOL
        found[spec.name] = spec
    for entry in entry_points(group="loadgen.protocols"):
        spec = entry.load()
        found.setdefault(spec.name, spec)
    return dict(sorted(found.items(), key=lambda item: (item[0] != DEFAULT_PROTOCOL, item[0])))


def protocol_names() -> tuple[str, ...]:
    return tuple(protocols())


def spec_of(name: str) -> ProtocolSpec:
    """The protocol called `name`; ValueError naming the known ones otherwise."""
    try:
        return protocols()[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(protocols())}") from None


def make_client(target: TargetOptions, seed: int = 0, trace: Trace | None = None) -> Client:
    """The client of `target`'s protocol (not yet prepared); with a trace to replay, a sized protocol's
    client builds its requests from the trace's rows."""
    spec = spec_of(target.protocol)
    client = spec.client(target, seed)
    if trace is not None and spec.sized:
        client.use_trace(trace)
    return client


def owners_of(key: str) -> list[str]:
    """The protocols whose `[target]` table has `key` (for naming the owner of a misplaced key)."""
    return [name for name, spec in protocols().items() if key in spec.options.model_fields]

