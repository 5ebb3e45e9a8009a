"""The models a Triton-compatible server serves: versions, states, configs, statistics and schedulers.

One ModelHost is shared by every front end (HTTP, gRPC, metrics), all on one asyncio loop. It serves
either the built-in models (a dict of Model, one version each, run as the models say: inline on the
loop or in the worker pool) or a Triton model repository (servers/triton/repository.py), whose models
run on their instances through a Scheduler (_scheduler.py, dynamic batching when configured).

Repository models follow Triton's model control modes: `none` loads every model at start and refuses
load/unload requests; `explicit` loads only the models named at start (`*` = all) and accepts
load/unload. A model that fails to load is kept in the index as UNAVAILABLE with the loader's reason
(which names the model and the field), and the other models load and serve as usual. With strict
readiness (Triton's default) the server is ready only when every model it was asked to load is READY.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, json_format
from tritonclient.grpc import model_config_pb2

from servers.core.model import Model
from servers.triton._scheduler import Batching, Scheduler
from servers.triton._stats import ModelStats

__all__ = ["ModelHost", "RepositoryError", "ServedModel", "UnknownModel", "config_json"]


class UnknownModel(LookupError):
    """A model name or version that is not served; the message is Triton's."""


class RepositoryError(RuntimeError):
    """A load or unload request the server refuses (wrong control mode, a model that fails to load)."""


@dataclass
class ServedModel:
    """One ready version of a model: its first instance (specs and metadata), config, stats, scheduler.

    `scheduler` is None for built-in models, which run inline or in the worker pool as `model.inline` says.
    """

    model: Model
    config: model_config_pb2.ModelConfig
    stats: ModelStats
    scheduler: Scheduler | None = None
    config_dict: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.config_dict = config_json(self.config)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


@dataclass
class _Entry:
    """A model of the repository (or a built-in): its ready versions, or why it has none."""

    name: str
    versions: dict[str, ServedModel] = field(default_factory=dict)
    state: str = "READY"
    reason: str = ""

    def default(self) -> ServedModel | None:
        """The version served when a request names none: the highest ready one (Triton's choice)."""
        if self.state != "READY" or not self.versions:
            return None
        return self.versions[max(self.versions, key=int)]


class ModelHost:
    """The served models and their statistics, shared by every front end of one server."""

    def __init__(self, models: dict[str, Model] | None = None, *, repository: Path | None = None,
                 control_mode: str = "none", strict_readiness: bool = True) -> None:
        self.repository = repository
        self.control_mode = control_mode
        self.strict_readiness = strict_readiness
        self._entries: dict[str, _Entry] = {}
        for model in (models or {}).values():
            config = json_format.ParseDict(model.config(), model_config_pb2.ModelConfig())
            served = ServedModel(model, config, ModelStats(model))
            self._entries[model.name] = _Entry(model.name, {model.version: served})

    # -- lookups ---------------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, Model]:
        """The default version of every ready model, by name."""
        return {name: served.model for name, served in self._defaults()}

    @property
    def stats(self) -> dict[str, ModelStats]:
        """The statistics of the default version of every ready model, by name."""
        return {name: served.stats for name, served in self._defaults()}

    def all_stats(self) -> list[ModelStats]:
        """The statistics of every ready version of every model."""
        return [served.stats for entry in self._entries.values() for served in entry.versions.values()]

    def _defaults(self) -> Iterable[tuple[str, ServedModel]]:
        for name, entry in self._entries.items():
            served = entry.default()
            if served is not None:
                yield name, served

    def lookup(self, name: str, version: str | None = None) -> ServedModel:
        """The ready version `version` of `name` (the default one when empty); raises UnknownModel."""
        entry = self._entries.get(name)
        if entry is None or entry.state != "READY":
            detail = "is not found" if entry is None or entry.state == "UNKNOWN" else "has no available versions"
            raise UnknownModel(f"Request for unknown model: '{name}' {detail}")
        if not version:
            served = entry.default()
        else:
            served = entry.versions.get(version)
        if served is None:
            raise UnknownModel(f"Request for unknown model: '{name}' version {version} is not found")
        return served

    def versions(self, name: str) -> list[str]:
        """The ready versions of a model, ascending (the `versions` of its metadata)."""
        entry = self._entries.get(name)
        return sorted(entry.versions, key=int) if entry is not None else []

    def metadata(self, served: ServedModel, version: str | None) -> dict[str, Any]:
        """KServe v2 model metadata: `versions` lists the asked version, else every ready one."""
        metadata = served.model.metadata()
        metadata["versions"] = [version] if version else self.versions(served.name)
        return metadata

    def ready(self) -> bool:
        """Server readiness: with strict readiness, every model asked for is READY."""
        if not self.strict_readiness:
            return True
        return all(entry.state == "READY" for entry in self._entries.values() if entry.state != "UNKNOWN")

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: one row per model version (one per model without a ready version)."""
        names = set(self._entries)
        if self.repository is not None:
            names.update(_model_names(self.repository))
        rows: list[dict[str, str]] = []
        for name in sorted(names):
            entry = self._entries.get(name)
            if entry is None or entry.state == "UNKNOWN":
                if not ready_only:
                    rows.append({"name": name})
                continue
            if entry.state == "READY":
                rows += [{"name": name, "version": version, "state": "READY"}
                         for version in sorted(entry.versions, key=int)]
            elif not ready_only:
                rows.append({"name": name, "state": entry.state, "reason": entry.reason})
        return rows

    # -- repository ------------------------------------------------------------------------------

    def load_repository(self, names: Iterable[str] | None = None) -> None:
        """Load repository models now (at start, before serving): all of them, or `names`."""
        assert self.repository is not None
        wanted = _model_names(self.repository) if names is None or "*" in names else list(names)
        for name in wanted:
            self._install(name, *_load(self.repository, name))

    async def load(self, name: str) -> None:
        """Load (or reload) one repository model without stopping the loop; raises RepositoryError."""
        self._check_control(name, "load")
        entry = self._entries.setdefault(name, _Entry(name, state="UNKNOWN"))
        if entry.state != "READY":
            entry.state = "LOADING"
        loaded, reason = await asyncio.get_running_loop().run_in_executor(None, _load, self.repository, name)
        self._install(name, loaded, reason)
        if loaded is None:
            raise RepositoryError(f"failed to load '{name}': {reason}")

    def unload(self, name: str) -> None:
        """Unload one repository model: new requests are refused, queued ones fail; raises RepositoryError."""
        self._check_control(name, "unload")
        entry = self._entries.get(name)
        if entry is None:
            return  # Triton answers success for a model that is not loaded
        for served in entry.versions.values():
            served.close()
        entry.versions = {}
        entry.state, entry.reason = "UNAVAILABLE", "unloaded"

    def close(self) -> None:
        for entry in self._entries.values():
            for served in entry.versions.values():
                served.close()

    def _check_control(self, name: str, action: str) -> None:
        if self.repository is None or self.control_mode != "explicit":
            raise RepositoryError(f"explicit model {action} is not allowed: start the server with "
                                  "--model-repository DIR --model-control-mode explicit")
        if name not in _model_names(self.repository):
            raise RepositoryError(f"failed to {action} '{name}', failed to poll from model repository")

    def _install(self, name: str, loaded: Any, reason: str) -> None:
        old = self._entries.get(name)
        if loaded is None:
            if old is not None and old.state == "READY":
                old.reason = reason  # a failed reload keeps the versions that serve (as Triton does)
                return
            self._entries[name] = _Entry(name, state="UNAVAILABLE", reason=reason)
            return
        batching = _batching(loaded.config)
        versions = {}
        for version, instances in ((v, lv.instances) for v, lv in loaded.versions.items()):
            stats = ModelStats(instances[0])
            versions[version] = ServedModel(instances[0], loaded.config, stats,
                                            Scheduler(instances, stats, batching))
        self._entries[name] = _Entry(name, versions)
        if old is not None:
            for served in old.versions.values():
                served.close()


def _load(repository: Path, name: str) -> tuple[Any, str]:
    """(LoadedModel, "") or (None, reason); never raises for a problem of the model."""
    from servers.triton.repository import ModelLoadError, load_model

    try:
        return load_model(repository, name), ""
    except ModelLoadError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a model's own code failing must not stop the server
        return None, f"model '{name}': {type(exc).__name__}: {exc}"


def _model_names(repository: Path) -> list[str]:
    from servers.triton.repository import model_names

    return model_names(repository)


def _batching(config: model_config_pb2.ModelConfig) -> Batching | None:
    if not config.HasField("dynamic_batching") or config.max_batch_size <= 0:
        return None
    block = config.dynamic_batching
    return Batching(tuple(sorted(block.preferred_batch_size)), int(block.max_queue_delay_microseconds))


_INT64_TYPES = {descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
                descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
                descriptor.FieldDescriptor.TYPE_SFIXED64}


def config_json(config: model_config_pb2.ModelConfig) -> dict[str, Any]:
    """ModelConfig as Triton's HTTP API prints it: proto field names, every field, 64-bit ints as numbers.

    >>> config_json(model_config_pb2.ModelConfig(name="m", max_batch_size=4))["max_batch_size"]
    4
    """
    data = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    _fix_int64(config.DESCRIPTOR, data)
    return data


def _fix_int64(message: descriptor.Descriptor, data: dict[str, Any]) -> None:
    for key, value in data.items():
        fd = message.fields_by_name.get(key)
        if fd is None:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.message_type is not None:
                for item in value.values():
                    _fix_int64(value_fd.message_type, item)
            continue
        items = value if isinstance(value, list) else [value]
        if fd.type in _INT64_TYPES:
            fixed = [int(item) for item in items]
            data[key] = fixed if isinstance(value, list) else fixed[0]
        elif fd.message_type is not None:
            for item in items:
                _fix_int64(fd.message_type, item)
