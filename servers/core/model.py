"""The Model interface both reference servers host: named numpy tensors in, named numpy tensors out.

A model declares its tensors as TensorSpec (name, KServe v2 datatype such as "FP32" or "BYTES", dims
without the batch dimension) and its max_batch_size (0 = no batch dimension; n >= 1 = a leading batch
dimension of at most n). The servers turn these into wire metadata: `metadata()` is KServe v2 model
metadata (PROTOCOLS.md 1.5) and `config()` is Triton's ModelConfig as JSON (1.6). BYTES tensors are
numpy object arrays of `bytes`, as tritonclient builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loadgen.lowlevel.dtypes import NUMPY_DTYPES

__all__ = ["CONFIG_TYPES", "NUMPY_DTYPES", "Model", "RequestError", "TensorSpec"]

CONFIG_TYPES: dict[str, str] = {name: f"TYPE_{name}" for name in NUMPY_DTYPES}
CONFIG_TYPES["BYTES"] = "TYPE_STRING"
"""KServe v2 datatype -> Triton ModelConfig data_type (BYTES is TYPE_STRING in config.pbtxt)."""


class RequestError(Exception):
    """One request of a batch failed inside the model (e.g. a Python-backend model answered it with
    an error); the other requests of the batch are unaffected. The message is what the client reads."""


@dataclass(frozen=True)
class TensorSpec:
    """One declared tensor: dims exclude the batch dimension; -1 is a variable dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    def shape(self, max_batch_size: int) -> list[int]:
        """The full shape as metadata shows it: a leading -1 when the model batches."""
        return [-1, *self.dims] if max_batch_size > 0 else list(self.dims)


class Model:
    """Base of every hosted model; subclasses set the class attributes (or assign them in __init__)
    and implement `infer`.

    Example:
        class Echo(Model):
            platform = "python"
            inputs = (TensorSpec("IN", "FP32", (-1,)),)
            outputs = (TensorSpec("OUT", "FP32", (-1,)),)
            def infer(self, inputs):
                return {"OUT": inputs["IN"]}
    """

    name: str = ""
    version: str = "1"
    platform: str = ""
    backend: str = "python"
    max_batch_size: int = 0
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    inline: bool = True
    """True for models fast enough to run on the event loop; False sends `infer` to a worker thread."""
    device: str = "cpu"
    """Where this instance computes: "cpu" or a torch device such as "cuda:0"."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for checked inputs (names, datatypes and shapes as declared)."""
        raise NotImplementedError

    def infer_batch(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | RequestError]:
        """The outputs of several requests run as one execution, in request order.

        The default stacks the requests along the batch dimension (max_batch_size > 0), runs `infer`
        once and gives each request its own rows back. Backends that take a list of requests
        themselves (the Python backend) override it; an item may be a RequestError for a request the
        model refused.
        """
        if len(requests) == 1:
            return [self.infer(requests[0])]
        sizes = [next(iter(request.values())).shape[0] for request in requests]
        stacked = {name: np.concatenate([request[name] for request in requests]) for name in requests[0]}
        outputs = self.infer(stacked)
        bounds = np.cumsum(sizes)[:-1]
        split = {name: np.split(array, bounds) for name, array in outputs.items()}
        return [{name: parts[index] for name, parts in split.items()} for index in range(len(requests))]

    def close(self) -> None:
        """Release what the instance holds (the model is being unloaded); the default holds nothing."""

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata (PROTOCOLS.md 1.5)."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform or self.backend,
            "inputs": [_tensor_metadata(spec, self.max_batch_size) for spec in self.inputs],
            "outputs": [_tensor_metadata(spec, self.max_batch_size) for spec in self.outputs],
        }

    def config(self) -> dict[str, Any]:
        """Triton's ModelConfig rendered as JSON (PROTOCOLS.md 1.6), the fields Triton always prints."""
        return {
            "name": self.name,
            "platform": self.platform,
            "backend": self.backend,
            "runtime": "",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": self.max_batch_size,
            "input": [_config_input(spec) for spec in self.inputs],
            "output": [_config_output(spec) for spec in self.outputs],
            "batch_input": [],
            "batch_output": [],
            "optimization": {"priority": "PRIORITY_DEFAULT", "input_pinned_memory": {"enable": True},
                             "output_pinned_memory": {"enable": True}},
            "instance_group": [{"name": f"{self.name}_0", "kind": "KIND_CPU", "count": 1, "gpus": [],
                                "secondary_devices": [], "profile": [], "passive": False,
                                "host_policy": ""}],
            "default_model_filename": "",
            "cc_model_filenames": {},
            "metric_tags": {},
            "parameters": {},
            "model_warmup": [],
        }


def _tensor_metadata(spec: TensorSpec, max_batch_size: int) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape(max_batch_size)}


def _config_input(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name, "data_type": CONFIG_TYPES[spec.datatype], "format": "FORMAT_NONE",
        "dims": list(spec.dims), "is_shape_tensor": False, "allow_ragged_batch": False,
        "optional": False, "is_non_linear_format_io": False,
    }


def _config_output(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name, "data_type": CONFIG_TYPES[spec.datatype], "dims": list(spec.dims),
        "label_filename": "", "is_shape_tensor": False, "is_non_linear_format_io": False,
    }
