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

A load request may carry Triton's load parameters (PROTOCOLS.md 1.12), the same from HTTP (strings,
files in base64) and gRPC (ModelRepositoryParameter: string_param, files in bytes_param): "config",
a ModelConfig in JSON that replaces the model's config.pbtxt, and "file:<version>/<path>" files that,
with "config", make the whole model folder instead of the repository's (then the model need not be
in the repository). Such files are written to a temporary folder that lives as long as the model
is loaded from it. A load without parameters loads the repository's folder again. A bad parameter
is refused before anything loads, with a RepositoryError naming it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
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
                 control_mode: str = "none", strict_readiness: bool = True,
                 allow_python_backend: bool = False) -> None:
        self.repository = repository
        self.allow_python_backend = allow_python_backend
        """Whether python backend models (code in model.py) may load, from the repository or a request."""
        self.control_mode = control_mode
        self.strict_readiness = strict_readiness
        self._entries: dict[str, _Entry] = {}
        self._folders: dict[str, Path] = {}  # temporary model folders made from load parameters, by model
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
            loaded, reason, _, memory = _load(self.repository, name, None, self.allow_python_backend)
            self._install(name, loaded, reason, memory)

    async def load(self, name: str, parameters: Mapping[str, str | bytes] | None = None) -> None:
        """Load (or reload) one model without stopping the loop; raises RepositoryError.

        `parameters` are Triton's load parameters (module docstring): {"config": JSON text,
        "file:<version>/<path>": base64 text (HTTP) or bytes (gRPC)}. From gRPC's
        RepositoryModelLoadRequest: {key: getattr(value, value.WhichOneof("parameter_choice") or
        "string_param") for key, value in request.parameters.items()}.
        """
        override = _Override.parse(parameters) if parameters else None
        self._check_control(name, "load", in_repository=override is None or not override.files)
        if override is not None and override.files and (name in ("", ".", "..") or "/" in name or "\\" in name):
            raise RepositoryError(f"failed to load '{name}': a model name is one folder name")
        entry = self._entries.setdefault(name, _Entry(name, state="UNKNOWN"))
        if entry.state != "READY":
            entry.state = "LOADING"
        loaded, reason, folder, memory = await asyncio.get_running_loop().run_in_executor(
            None, _load, self.repository, name, override, self.allow_python_backend)
        self._install(name, loaded, reason, memory)
        if loaded is None:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise RepositoryError(f"failed to load '{name}': {reason}")
        self._keep_folder(name, folder)

    def unload(self, name: str) -> None:
        """Unload one repository model: new requests are refused, queued ones fail; raises RepositoryError."""
        self._check_control(name, "unload", in_repository=name not in self._entries)
        entry = self._entries.get(name)
        if entry is None:
            return  # Triton answers success for a model that is not loaded
        for served in entry.versions.values():
            served.close()
        entry.versions = {}
        entry.state, entry.reason = "UNAVAILABLE", "unloaded"
        self._keep_folder(name, None)

    def close(self) -> None:
        for entry in self._entries.values():
            for served in entry.versions.values():
                served.close()
        for name in list(self._folders):
            self._keep_folder(name, None)

    def _keep_folder(self, name: str, folder: Path | None) -> None:
        """Remember the temporary folder the model now serves from (None: the repository's), and
        remove the one it served from before."""
        old = self._folders.pop(name, None)
        if folder is not None:
            self._folders[name] = folder
        if old is not None and old != folder:
            shutil.rmtree(old, ignore_errors=True)

    def _check_control(self, name: str, action: str, in_repository: bool = True) -> None:
        if self.repository is None or self.control_mode != "explicit":
            raise RepositoryError(f"explicit model {action} is not allowed: start the server with "
                                  "--model-repository DIR --model-control-mode explicit")
        if in_repository and name not in _model_names(self.repository):
            raise RepositoryError(f"failed to {action} '{name}', failed to poll from model repository")

    def _install(self, name: str, loaded: Any, reason: str, memory: list[dict[str, Any]] | None = None) -> None:
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
            stats = ModelStats(instances[0], memory)
            versions[version] = ServedModel(instances[0], loaded.config, stats,
                                            Scheduler(instances, stats, batching))
        self._entries[name] = _Entry(name, versions)
        if old is not None:
            for served in old.versions.values():
                served.close()


@dataclass(frozen=True)
class _Override:
    """Checked load parameters: the config that replaces config.pbtxt, and the files of the folder."""

    config: model_config_pb2.ModelConfig | None
    files: dict[PurePosixPath, bytes]

    @classmethod
    def parse(cls, parameters: Mapping[str, Any]) -> _Override:
        """Check every parameter; raises RepositoryError naming the first bad one."""
        config = None
        files: dict[PurePosixPath, bytes] = {}
        for key, value in parameters.items():
            if key == "config":
                config = _config_parameter(value)
            elif isinstance(key, str) and key.startswith("file:"):
                files[_file_path(key)] = _file_content(key, value)
            else:
                raise RepositoryError(f"load parameter '{key}' is not supported (supported: 'config', "
                                      "'file:<version>/<filename>')")
        if files and config is None:
            raise RepositoryError(f"load parameter '{next(iter(parameters))}' needs the 'config' parameter too: "
                                  "files make a new model folder, and its config comes only from 'config'")
        return cls(config, files)


def _config_parameter(value: Any) -> model_config_pb2.ModelConfig:
    if not isinstance(value, str):
        raise RepositoryError(f"load parameter 'config' must be a string, a ModelConfig in JSON; got "
                              f"{type(value).__name__}")
    try:
        return json_format.Parse(value, model_config_pb2.ModelConfig())
    except json_format.ParseError as exc:
        raise RepositoryError(f"load parameter 'config' is not a ModelConfig in JSON: {exc}") from None


def _file_path(key: str) -> PurePosixPath:
    path = PurePosixPath(key[len("file:"):])
    parts = path.parts
    if len(parts) < 2 or path.is_absolute() or any(part in ("", ".", "..") for part in parts):
        raise RepositoryError(f"load parameter '{key}': the path must be <version>/<filename> inside the "
                              "model folder")
    return path


def _file_content(key: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise RepositoryError(f"load parameter '{key}' must be the file's contents in base64, got "
                              f"{type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RepositoryError(f"load parameter '{key}' is not valid base64: {exc}") from None


def _load(repository: Path, name: str, override: _Override | None = None,
          allow_python_backend: bool = False) -> tuple[Any, str, Path | None, list[dict[str, Any]]]:
    """(LoadedModel, "", folder, memory) or (None, reason, folder, []); never raises for a problem of the
    model. `folder` is the temporary folder made from the override's files (None without files);
    `memory` is what the load took (memory_usage of Triton's statistics: the process's resident memory
    grew by the CPU byte_size, the GPU's allocated memory by the GPU one)."""
    _import_runtime(repository / name if repository is not None else None)
    before = _memory_now()
    loaded, reason, folder = _load_model(repository, name, override, allow_python_backend)
    if loaded is None:
        return loaded, reason, folder, []
    after = _memory_now()
    memory = [{"type": kind, "id": 0, "byte_size": max(0, after[kind] - before.get(kind, 0))} for kind in after]
    return loaded, reason, folder, memory


def _import_runtime(folder: Path | None) -> None:
    """Import the runtime a model folder's files need (torch for .pt, onnxruntime for .onnx) before its
    memory is measured, so that the first model of a backend is not charged with the library."""
    if folder is None or not folder.is_dir():
        return
    suffixes = {path.suffix for path in folder.rglob("*") if path.is_file()}
    for suffix, module in ((".pt", "torch"), (".onnx", "onnxruntime")):
        if suffix in suffixes:
            try:
                __import__(module)
            except ImportError:
                pass  # the load itself says what is missing


def _memory_now() -> dict[str, int]:
    """The process's resident bytes (CPU) and, when torch is in use with CUDA, the GPU bytes allocated."""
    usage = {}
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            usage["CPU"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        usage["GPU"] = int(torch.cuda.memory_allocated())
    return usage


def _load_model(repository: Path, name: str, override: _Override | None,
                allow_python_backend: bool) -> tuple[Any, str, Path | None]:
    from servers.triton.repository import ModelLoadError, load_model

    folder = None
    try:
        if override is not None and override.files:
            folder = Path(tempfile.mkdtemp(prefix="triton-load-"))
            repository = folder
            for path, content in override.files.items():
                target = folder / name / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
        config = override.config if override else None
        return load_model(repository, name, config, allow_python_backend=allow_python_backend), "", folder
    except ModelLoadError as exc:
        return None, str(exc), folder
    except Exception as exc:  # noqa: BLE001 - a model's own code failing must not stop the server
        return None, f"model '{name}': {type(exc).__name__}: {exc}", folder


def _model_names(repository: Path) -> list[str]:
    from servers.triton.repository import model_names

    return model_names(repository)


def _batching(config: model_config_pb2.ModelConfig) -> Batching | None:
    if not config.HasField("dynamic_batching") or config.max_batch_size <= 0:
        return None
    block = config.dynamic_batching
    return Batching(tuple(sorted(block.preferred_batch_size)), int(block.max_queue_delay_microseconds),
                    int(block.default_queue_policy.max_queue_size))


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
