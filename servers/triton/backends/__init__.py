"""Backends of the Triton model repository: each turns a model file into ready `Model` instances.

servers/triton/repository.py reads and checks config.pbtxt, picks the versions, resolves each instance
group to CPU or GPU and then hands every backend the same record per execution instance, an
InstanceSpec. A backend module (torchscript.py, onnx.py, python.py) offers two functions:

    gpu_count() -> int                          # GPUs this backend can use here; 0 = CPU only
    load(specs: list[InstanceSpec]) -> list[Model]   # the instances of one model version

and raises BackendError for a problem of the model (the message names the field or file); any other
exception from the framework (a corrupt file) is reported by the repository with the file's name.
Backend modules import their framework (torch, onnxruntime) at the top, and the repository imports a
backend module only when a model of that backend loads, so the server starts without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2

from servers.core.model import NUMPY_DTYPES, Model, TensorSpec

__all__ = ["BackendError", "BackendModel", "InstanceSpec", "as_declared", "load_each"]


class BackendError(Exception):
    """A problem of the model a backend found (a field, a file); the repository prefixes the model name."""


@dataclass(frozen=True)
class InstanceSpec:
    """What one execution instance of one model version is: its tensors, its file and its device."""

    model_name: str
    version: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    config: model_config_pb2.ModelConfig
    """The completed config (shared by every instance of the model: read it, never change it)."""
    model_dir: Path
    model_file: Path
    instance_name: str
    """Triton's instance name: the group name and the index in the group, e.g. "mlp_0_0"."""
    kind: str
    """"KIND_CPU" or "KIND_GPU"."""
    device_id: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    """config `parameters`: key -> string_value."""

    @property
    def device(self) -> str:
        """Where the instance computes, as torch names it: "cpu" or "cuda:N"."""
        return f"cuda:{self.device_id}" if self.kind == "KIND_GPU" else "cpu"


class BackendModel(Model):
    """A repository model instance: the declared tensors and identity come from its InstanceSpec.

    Repository models run in worker threads (`inline = False`): they take milliseconds, not microseconds.
    """

    inline = False

    def __init__(self, spec: InstanceSpec) -> None:
        self.spec = spec
        self.name = spec.model_name
        self.version = spec.version
        self.platform = spec.platform
        self.backend = spec.backend
        self.max_batch_size = spec.max_batch_size
        self.inputs = spec.inputs
        self.outputs = spec.outputs
        self.device = spec.device


def load_each(specs: list[InstanceSpec], make: Callable[[InstanceSpec], Model]) -> list[Model]:
    """`make(spec)` for every spec; if one fails, the instances already made are closed first."""
    made: list[Model] = []
    try:
        for spec in specs:
            made.append(make(spec))
    except BaseException:
        for model in made:
            model.close()
        raise
    return made


def as_declared(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """`array` in the declared datatype of output `spec`; BYTES become an object array of bytes.

    Widening or narrowing within a kind (float64 -> FP32) is a cast, as a client would do; a change of
    kind that loses meaning (float -> INT32) raises TypeError naming the output.
    """
    want = NUMPY_DTYPES[spec.datatype]
    if spec.datatype == "BYTES":
        return _as_bytes(array, spec.name)
    if array.dtype == want:
        return array
    if not np.can_cast(array.dtype, want, casting="same_kind"):
        raise TypeError(f"output '{spec.name}' is {array.dtype}, but the config declares "
                        f"{spec.datatype}")
    return array.astype(want)


def _as_bytes(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind not in "OSU":
        raise TypeError(f"output '{name}' is {array.dtype}, but the config declares BYTES (TYPE_STRING)")
    if array.dtype.kind == "O" and all(isinstance(item, bytes) for item in array.flat):
        return array
    out = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        if isinstance(item, str):
            out[index] = item.encode()
        elif isinstance(item, bytes):
            out[index] = bytes(item)
        else:
            raise TypeError(f"output '{name}' holds a {type(item).__name__}; BYTES elements are bytes or str")
    return out
