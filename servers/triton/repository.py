"""A Triton model repository on disk -> ready `Model` instances (PROTOCOLS.md 3).

    <repository>/<model>/config.pbtxt      ModelConfig in protobuf text format
    <repository>/<model>/<version>/<file>  version folders are positive integers; others are ignored

`load_model` reads one model folder in this order, and the first problem found raises ModelLoadError,
whose message names the model and the field or file at fault:

1. config.pbtxt is parsed with protobuf's text_format into tritonclient's ModelConfig (it may be
   absent for an ONNX model: the ONNX backend fills the config in from the graph); a config passed
   in (a load request's "config" parameter) takes its place, and config.pbtxt is not read;
2. platform/backend are resolved to one supported backend and both written as Triton reports them;
3. the version policy (default latest 1) selects version folders, each must hold the model file
   (`default_model_filename` or the backend's default name);
4. the tensors and fields are checked, and each instance group is completed: name "<model>_<i>",
   count (default 1 for every backend: Triton gives the onnxruntime CPU kind 2), kind resolved to
   KIND_GPU when the backend can use a GPU here, else KIND_CPU (a GPU that is absent means CPU);
5. the backend (servers/triton/backends, imported only now) makes one Model per execution instance:
   `count` per group on the CPU, `count` per listed GPU (all visible GPUs when none are listed).

The completed config is what the server reports and serves from; `dynamic_batching` is kept as written
for the scheduler. Nothing here is cached: each call reads the folder afresh (load/unload).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from servers.core.model import CONFIG_TYPES, Model, TensorSpec
from servers.triton.backends import BackendError, InstanceSpec

__all__ = ["LoadedModel", "LoadedVersion", "ModelLoadError", "load_model", "model_names"]

_DATATYPES = {config_type: datatype for datatype, config_type in CONFIG_TYPES.items()}
"""config data_type name -> KServe v2 datatype."""
_Kind = model_config_pb2.ModelInstanceGroup.Kind


class ModelLoadError(Exception):
    """A model of the repository cannot be loaded; str() names the model and the field or file at fault."""

    def __init__(self, model: str, problem: str) -> None:
        super().__init__(f"model '{model}': {problem}")
        self.model = model
        self.problem = problem


@dataclass
class LoadedVersion:
    version: str
    instances: list[Model]
    """One ready Model per execution instance."""


@dataclass
class LoadedModel:
    name: str
    config: model_config_pb2.ModelConfig
    """The completed config (see the module docstring)."""
    versions: dict[str, LoadedVersion]
    """The versions the version policy selects, all loaded, by version string."""


@dataclass(frozen=True)
class _Backend:
    name: str
    platform: str
    """The platform Triton reports for models of this backend."""
    platforms: tuple[str, ...]
    """Platform strings a config may name for this backend."""
    default_filename: str
    module: str


_BACKENDS = {backend.name: backend for backend in (
    _Backend("onnxruntime", "onnxruntime_onnx", ("onnxruntime_onnx",), "model.onnx", "onnx"),
    _Backend("python", "", (), "model.py", "python"),
    _Backend("pytorch", "pytorch_libtorch", ("pytorch_libtorch", "libtorch"), "model.pt", "torchscript"),
)}
_PLATFORMS = {platform: backend for backend in _BACKENDS.values() for platform in backend.platforms}
_NEEDS = {"onnxruntime": "onnxruntime", "pytorch": "torch"}
_Result = TypeVar("_Result")


def model_names(repository: Path) -> list[str]:
    """The model folders of `repository`, sorted; plain files and folders whose name starts with "." or
    "_" are not models (make-repo keeps its test data in `_data/`).

    >>> model_names(Path("/nonexistent"))
    []
    """
    if not repository.is_dir():
        return []
    return sorted(entry.name for entry in repository.iterdir()
                  if entry.is_dir() and not entry.name.startswith((".", "_")))


PYTHON_BACKEND_REFUSED = ("a python backend model runs the code in its model.py; this server loads one only "
                          "when started with --allow-python-backend")


def load_model(repository: Path, name: str, config: model_config_pb2.ModelConfig | None = None, *,
               allow_python_backend: bool = False) -> LoadedModel:
    """Read, check and load the model folder `repository/name`; raises ModelLoadError for any problem.
    `config`, when given, is used instead of the folder's config.pbtxt (and is not changed). A python
    backend model (its model.py is imported and run) is refused before any of its code is read unless
    `allow_python_backend`: a repository, or a load request that carries files, must not be a way to run
    code on the server by default.

    Example:
        loaded = load_model(Path("models"), "mlp")  # allow_python_backend=True for model.py models
        model = loaded.versions["1"].instances[0]
        model.infer({"INPUT0": np.zeros((1, 16), np.float32)})
    """
    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        raise ModelLoadError(name, f"no model folder {model_dir}")
    versions = _version_folders(model_dir)
    if not versions:
        raise ModelLoadError(name, "no version folder (1/, 2/, ...)")
    if config is None:
        config = _read_config(model_dir, name, versions)
    else:
        config = _overriding_config(config, name)
    backend = _resolve_backend(config, name)
    if backend.name == "python" and not allow_python_backend:
        raise ModelLoadError(name, PYTHON_BACKEND_REFUSED)
    selected = _select_versions(config, versions, name)
    files = {version: _model_file(versions[version], config, backend, name) for version in selected}
    module = _backend_module(backend, name)
    if backend.name == "onnxruntime" and (not config.input or not config.output):
        _guarded(name, "", lambda: module.auto_complete(config, files[selected[-1]]))
    inputs, outputs = _check_config(config, name)
    _complete_instance_groups(config, name, _guarded(name, "", module.gpu_count))
    loaded: dict[str, LoadedVersion] = {}
    try:
        for version in selected:
            specs = _instance_specs(config, model_dir, str(version), files[version], inputs, outputs)
            instances = _guarded(name, f"version {version}: ", partial(module.load, specs), files[version])
            loaded[str(version)] = LoadedVersion(str(version), instances)
    except BaseException:
        for done in loaded.values():
            for instance in done.instances:
                instance.close()
        raise
    return LoadedModel(name, config, loaded)


def _version_folders(model_dir: Path) -> dict[int, Path]:
    """Positive whole-number folders by version; "0", "01", "latest" and files are ignored, as Triton does."""
    return {int(entry.name): entry for entry in model_dir.iterdir()
            if entry.is_dir() and re.fullmatch(r"[1-9][0-9]*", entry.name)}


def _read_config(model_dir: Path, name: str, versions: dict[int, Path]) -> model_config_pb2.ModelConfig:
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        if any((folder / "model.onnx").exists() for folder in versions.values()):
            return model_config_pb2.ModelConfig(backend="onnxruntime")  # the graph completes it
        raise ModelLoadError(name, "config.pbtxt not found (only an ONNX model, <version>/model.onnx, may go "
                                   "without one)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(name, f"config.pbtxt cannot be read: {exc}") from exc
    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        message = re.sub(r"^\d+:\d+ : ", "", str(exc))
        where = f"line {exc.GetLine()} column {exc.GetColumn()}" if exc.GetLine() else "parse error"
        raise ModelLoadError(name, f"config.pbtxt {where}: {message}") from exc
    if config.name and config.name != name:
        raise ModelLoadError(name, f"config.pbtxt name: '{config.name}' differs from the folder name '{name}'")
    config.name = name
    return config


def _overriding_config(override: model_config_pb2.ModelConfig, name: str) -> model_config_pb2.ModelConfig:
    if override.name and override.name != name:
        raise ModelLoadError(name, f"config name: '{override.name}' differs from the model name '{name}'")
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(override)
    config.name = name
    return config


def _resolve_backend(config: model_config_pb2.ModelConfig, name: str) -> _Backend:
    by_backend = _BACKENDS.get(config.backend) if config.backend else None
    by_platform = _PLATFORMS.get(config.platform) if config.platform else None
    if config.backend and by_backend is None:
        raise ModelLoadError(name, f"backend '{config.backend}' is not supported (supported: "
                                   f"{', '.join(sorted(_BACKENDS))})")
    if config.platform and by_platform is None:
        raise ModelLoadError(name, f"platform '{config.platform}' is not supported (supported: "
                                   f"{', '.join(sorted(_PLATFORMS))}; the python backend has none)")
    backend = by_backend or by_platform
    if backend is None:
        raise ModelLoadError(name, "config.pbtxt names neither a platform nor a backend (e.g. backend: "
                                   "\"python\" or platform: \"onnxruntime_onnx\")")
    if by_backend and by_platform and by_backend is not by_platform:
        raise ModelLoadError(name, f"platform '{config.platform}' and backend '{config.backend}' disagree")
    config.platform, config.backend = backend.platform, backend.name
    return backend


def _select_versions(config: model_config_pb2.ModelConfig, versions: dict[int, Path], name: str) -> list[int]:
    """The versions the policy picks, oldest first; the default policy, latest 1, is written in."""
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which is None:
        policy.latest.num_versions = 1
        which = "latest"
    if which == "all":
        return sorted(versions)
    if which == "latest":
        if policy.latest.num_versions < 1:
            raise ModelLoadError(name, "version_policy.latest.num_versions must be >= 1")
        return sorted(versions)[-policy.latest.num_versions:]
    wanted = sorted(set(policy.specific.versions))
    if not wanted:
        raise ModelLoadError(name, "version_policy.specific.versions is empty")
    missing = [str(version) for version in wanted if version not in versions]
    if missing:
        raise ModelLoadError(name, f"version_policy.specific.versions: no version folder {', '.join(missing)} "
                                   f"(folders: {', '.join(str(v) for v in sorted(versions))})")
    return wanted


def _model_file(folder: Path, config: model_config_pb2.ModelConfig, backend: _Backend, name: str) -> Path:
    filename = config.default_model_filename or backend.default_filename
    path = folder / filename
    if not path.resolve().is_relative_to(folder.resolve()):  # "../x", "/etc/x", or a link out of it
        raise ModelLoadError(name, f"default_model_filename '{filename}' is not a file inside the version "
                                   f"folder {folder.name}/")
    if not path.exists():
        field = " (default_model_filename)" if config.default_model_filename else ""
        raise ModelLoadError(name, f"model file {folder.name}/{filename}{field} not found")
    return path


def _backend_module(backend: _Backend, name: str) -> ModuleType:
    try:
        return importlib.import_module(f"servers.triton.backends.{backend.module}")
    except ImportError as exc:
        package = _NEEDS.get(backend.name, exc.name)
        raise ModelLoadError(name, f"backend '{backend.name}' needs {package}, which does not import here "
                                   f"({exc}); pip install 'loadgen[models]'") from exc


def _guarded(name: str, prefix: str, call: Callable[[], _Result], model_file: Path | None = None) -> _Result:
    """call(); a BackendError or any framework error becomes a ModelLoadError of the model."""
    try:
        return call()
    except ModelLoadError:
        raise
    except BackendError as exc:
        raise ModelLoadError(name, f"{prefix}{exc}") from exc
    except Exception as exc:
        what = f"cannot load {model_file.parent.name}/{model_file.name}" if model_file else "backend failed"
        raise ModelLoadError(name, f"{prefix}{what}: {type(exc).__name__}: {exc}") from exc


def _check_config(config: model_config_pb2.ModelConfig, name: str) -> tuple[tuple[TensorSpec, ...], ...]:
    """Check the fields this server acts on; returns the input and output TensorSpecs."""
    if config.max_batch_size < 0:
        raise ModelLoadError(name, f"max_batch_size must be >= 0, got {config.max_batch_size}")
    for field, unsupported in (("model_transaction_policy.decoupled", config.model_transaction_policy.decoupled),
                               ("sequence_batching", config.HasField("sequence_batching")),
                               ("ensemble_scheduling", config.HasField("ensemble_scheduling")),
                               ("batch_input", len(config.batch_input) > 0),
                               ("batch_output", len(config.batch_output) > 0)):
        if unsupported:
            raise ModelLoadError(name, f"{field} is not supported by this server")
    for size in config.dynamic_batching.preferred_batch_size:
        if not 1 <= size <= max(config.max_batch_size, 1):
            raise ModelLoadError(name, f"dynamic_batching.preferred_batch_size: {size} is not within "
                                       f"1..max_batch_size ({config.max_batch_size})")
    return _tensor_specs(config.input, "input", name), _tensor_specs(config.output, "output", name)


def _tensor_specs(tensors, field: str, name: str) -> tuple[TensorSpec, ...]:
    if not tensors:
        raise ModelLoadError(name, f"config declares no {field}; at least one is required")
    specs: list[TensorSpec] = []
    for index, tensor in enumerate(tensors):
        where = f"{field}[{index}]"
        if not tensor.name:
            raise ModelLoadError(name, f"{where}.name is empty")
        if any(spec.name == tensor.name for spec in specs):
            raise ModelLoadError(name, f"{where}.name: '{tensor.name}' is declared twice")
        specs.append(TensorSpec(tensor.name, _datatype(tensor.data_type, where, name), _dims(tensor, where, name)))
        for flag in ("optional", "is_shape_tensor", "allow_ragged_batch"):
            if getattr(tensor, flag, False):
                raise ModelLoadError(name, f"{where}.{flag} is not supported by this server")
        if tensor.HasField("reshape"):
            raise ModelLoadError(name, f"{where}.reshape is not supported by this server")
    return tuple(specs)


def _datatype(value: int, where: str, name: str) -> str:
    type_name = model_config_pb2.DataType.Name(value)
    if type_name == "TYPE_INVALID":
        raise ModelLoadError(name, f"{where}.data_type: TYPE_INVALID is not a data type (is data_type missing?)")
    if type_name not in _DATATYPES:
        raise ModelLoadError(name, f"{where}.data_type: {type_name} is not supported here (supported: "
                                   f"{', '.join(_DATATYPES)})")
    return _DATATYPES[type_name]


def _dims(tensor, where: str, name: str) -> tuple[int, ...]:
    dims = tuple(tensor.dims)
    if not dims:
        raise ModelLoadError(name, f"{where}.dims is empty (a single value is dims: [ 1 ])")
    if any(dim < 1 and dim != -1 for dim in dims):
        raise ModelLoadError(name, f"{where}.dims: {list(dims)}; each dim is >= 1, or -1 for a variable one")
    return dims


def _complete_instance_groups(config: model_config_pb2.ModelConfig, name: str, gpu_count: int) -> None:
    if not config.instance_group:
        config.instance_group.add()
    for index, group in enumerate(config.instance_group):
        where = f"instance_group[{index}]"
        group.name = group.name or f"{name}_{index}"
        if group.count < 0:
            raise ModelLoadError(name, f"{where}.count must be >= 1, got {group.count}")
        group.count = group.count or 1
        if group.kind == _Kind.KIND_MODEL:
            raise ModelLoadError(name, f"{where}.kind: KIND_MODEL is not supported (use KIND_AUTO, KIND_GPU or "
                                       "KIND_CPU)")
        if group.kind in (_Kind.KIND_AUTO, _Kind.KIND_GPU) and gpu_count > 0:
            group.kind = _Kind.KIND_GPU
            if not group.gpus:
                group.gpus.extend(range(gpu_count))
            absent = [gpu for gpu in group.gpus if not 0 <= gpu < gpu_count]
            if absent:
                raise ModelLoadError(name, f"{where}.gpus: {absent} not among the {gpu_count} visible GPU(s)")
        else:
            group.kind = _Kind.KIND_CPU
            del group.gpus[:]


def _instance_specs(config: model_config_pb2.ModelConfig, model_dir: Path, version: str, model_file: Path,
                    inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> list[InstanceSpec]:
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    specs = []
    for group in config.instance_group:
        kind = _Kind.Name(group.kind)
        devices = list(group.gpus) if group.kind == _Kind.KIND_GPU else [0]
        slots = [(device, copy) for device in devices for copy in range(group.count)]
        for number, (device, _) in enumerate(slots):
            specs.append(InstanceSpec(
                model_name=config.name, version=version, platform=config.platform, backend=config.backend,
                max_batch_size=config.max_batch_size, inputs=inputs, outputs=outputs, config=config,
                model_dir=model_dir, model_file=model_file, instance_name=f"{group.name}_{number}", kind=kind,
                device_id=device, parameters=parameters))
    return specs
