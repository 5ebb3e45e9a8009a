"""The Python backend: a model.py with class TritonPythonModel, run in the server's process.

Per model version, model.py is executed once as a fresh module under a unique name (two versions, or a
reload, never share module state); each execution instance makes its own TritonPythonModel and calls
`initialize(args)` with the dict of strings PROTOCOLS.md 3.4 lists. A batch of requests is handed to
`execute(requests)` as one list, as Triton does; each `InferenceResponse(error=...)` becomes a
RequestError for that request alone. `close()` calls `finalize()`.

Before model.py runs, `import triton_python_backend_utils` is made to find our pb_utils module.
Differences from Triton, which runs each instance in a stub process: instances share the server's
interpreter (and its GIL), the version folder is not put on sys.path, and every instance is KIND_CPU.
An exception raised by `execute`, or a reply that is not one InferenceResponse per request, fails the
whole batch (the caller sees the exception).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import itertools
import json
import re
import sys
import threading
import traceback
from collections.abc import Awaitable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2

from servers.core.model import Model, RequestError
from servers.triton.backends import BackendError, BackendModel, InstanceSpec, as_declared, load_each
from servers.triton.backends import triton_python_backend_utils as pb_utils

__all__ = ["PythonModel", "config_json", "gpu_count", "load"]

_module_numbers = itertools.count()


def gpu_count() -> int:
    """The in-process Python backend places every instance on the CPU (model.py may still use a GPU)."""
    return 0


def load(specs: list[InstanceSpec]) -> list[Model]:
    """The instances of one model version; model.py is executed once for all of them."""
    module = _exec_model_py(specs[0])
    try:
        if not isinstance(getattr(module.module, "TritonPythonModel", None), type):
            raise BackendError(f"{_shown(specs[0])} defines no class TritonPythonModel")
        return load_each(specs, lambda spec: PythonModel(spec, module))
    except BaseException:
        module.forget()
        raise


class _ModelModule:
    """One execution of model.py, shared by the instances of a version; leaves sys.modules with the last."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.users = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                self.forget()

    def forget(self) -> None:
        sys.modules.pop(self.module.__name__, None)


def _exec_model_py(spec: InstanceSpec) -> _ModelModule:
    sys.modules["triton_python_backend_utils"] = pb_utils
    safe = re.sub(r"\W", "_", spec.model_name)
    name = f"_triton_python_model_{safe}_v{spec.version}_{next(_module_numbers)}"
    module_spec = importlib.util.spec_from_file_location(name, spec.model_file)
    if module_spec is None or module_spec.loader is None:
        raise BackendError(f"{_shown(spec)} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and typing in model.py look their module up here
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise BackendError(f"{_shown(spec)}{_line_of(exc, spec.model_file)}: {type(exc).__name__}: {exc}") from exc
    return _ModelModule(module)


def _shown(spec: InstanceSpec) -> str:
    return f"{spec.version}/{spec.model_file.name}"


def _line_of(exc: BaseException, path: Path) -> str:
    """' line N' of the deepest frame in `path` (or of a SyntaxError there), else ''."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f" line {exc.lineno}"
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == path]
    return f" line {lines[-1]}" if lines else ""


class PythonModel(BackendModel):
    """One execution instance: a TritonPythonModel; one batch at a time, as a Triton stub runs it."""

    def __init__(self, spec: InstanceSpec, module: _ModelModule) -> None:
        super().__init__(spec)
        self._module = module
        self._lock = threading.Lock()
        self._closed = False
        self._config = config_json(spec.config)
        self._impl = module.module.TritonPythonModel()
        initialize = getattr(self._impl, "initialize", None)
        if initialize is not None:
            try:
                _run(initialize(self._args()))
            except Exception as exc:
                raise BackendError(f"{_shown(spec)}{_line_of(exc, spec.model_file)}: initialize failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        module.acquire()

    def _args(self) -> dict[str, str]:
        spec = self.spec
        return {
            "model_config": self._config,
            "model_instance_kind": spec.kind.removeprefix("KIND_"),
            "model_instance_name": spec.instance_name,
            "model_instance_device_id": str(spec.device_id),
            "model_repository": str(spec.model_dir),
            "model_version": spec.version,
            "model_name": spec.model_name,
        }

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.infer_batch([inputs])[0]
        if isinstance(result, RequestError):
            raise result
        return result

    def infer_batch(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | RequestError]:
        wanted = [spec.name for spec in self.outputs]
        batch = [pb_utils.InferenceRequest([pb_utils.Tensor(name, array) for name, array in request.items()],
                                           requested_output_names=wanted, model_name=self.name)
                 for request in requests]
        with self._lock:
            responses = _run(self._impl.execute(batch))
        if not isinstance(responses, list | tuple) or len(responses) != len(requests):
            got = f"{len(responses)} responses" if isinstance(responses, list | tuple) else repr(type(responses))
            raise RuntimeError(f"model '{self.name}': execute returned {got} for {len(requests)} requests "
                               "(one InferenceResponse per request, in order)")
        return [self._outputs(response) for response in responses]

    def _outputs(self, response: Any) -> dict[str, np.ndarray] | RequestError:
        if not isinstance(response, pb_utils.InferenceResponse):
            raise TypeError(f"model '{self.name}': execute returned a {type(response).__name__} where "
                               "an InferenceResponse belongs")
        if response.has_error():
            return RequestError(response.error().message())
        produced = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}
        try:
            return {spec.name: as_declared(produced[spec.name], spec) for spec in self.outputs
                    if spec.name in produced}
        except TypeError as exc:
            return RequestError(f"model '{self.name}': {exc}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            finalize = getattr(self._impl, "finalize", None)
            if finalize is not None:
                _run(finalize())
        finally:
            self._module.release()


def _run(result: Any) -> Any:
    """The value of a call to a model method; `async def` methods (Triton 24.04+) run to completion here."""
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def config_json(config: model_config_pb2.ModelConfig) -> str:
    """The config as Triton hands it to model.py: JSON with the proto's field names, every field
    present, and 64-bit integers (dims, delays) as JSON numbers, not the strings protobuf's JSON uses."""
    data = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    _numbers_for_int64(config.DESCRIPTOR, data)
    return json.dumps(data)


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _numbers_for_int64(descriptor: Descriptor, data: dict[str, Any]) -> None:
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            data[key] = {name: _fixed(value_field, item) for name, item in value.items()}
        elif field.is_repeated:
            data[key] = [_fixed(field, item) for item in value]
        else:
            data[key] = _fixed(field, value)


def _fixed(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        _numbers_for_int64(field.message_type, value)
        return value
    return int(value) if field.type in _INT64 else value
