"""The ONNX Runtime backend: `model.onnx` in an InferenceSession per instance, fed by tensor name.

A KIND_GPU instance asks for CUDAExecutionProvider on its device first and keeps the CPU provider as
the fallback; a KIND_CPU instance uses CPUExecutionProvider only. At load the config's tensors are held
against the graph: every config input and output must be a graph tensor of the same datatype, and of
the same rank once the batch dimension is counted. BYTES tensors cross as numpy arrays of str (what
onnxruntime takes) and come back as bytes.

Auto-complete (`auto_complete`): without config.pbtxt, or with a config that declares no tensors, the
inputs and outputs come from the graph, as Triton's onnxruntime backend fills them in; when every graph
tensor has a variable first dimension the model batches, with Triton's default max_batch_size of 4 and
dynamic batching switched on.

Parameters honoured: `intra_op_thread_count` and `inter_op_thread_count` (Triton's names).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2

from servers.core.model import CONFIG_TYPES, Model
from servers.triton.backends import BackendError, BackendModel, InstanceSpec, as_declared, load_each

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "OnnxModel", "auto_complete", "gpu_count", "load"]

DEFAULT_MAX_BATCH_SIZE = 4
"""Triton's `--backend-config=default-max-batch-size` default, used when auto-complete finds a batch dim."""

_ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
"""onnxruntime's type names -> KServe v2 datatypes."""


def gpu_count() -> int:
    """CUDA devices onnxruntime can use: 0 without its CUDA provider, else the visible GPUs."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip() and device.strip() != "-1"])
    try:
        import pynvml
    except ImportError:
        return 1  # the CUDA provider is there, so at least one GPU is
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 1
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def load(specs: list[InstanceSpec]) -> list[Model]:
    """One OnnxModel per instance of one model version."""
    return load_each(specs, OnnxModel)


def auto_complete(config: model_config_pb2.ModelConfig, model_file: Path) -> None:
    """Fill the config's missing inputs and outputs (and max_batch_size when it declares no tensors at
    all) from the graph of `model_file`; raises BackendError when the graph cannot say."""
    session = _session(model_file, _options({}), ["CPUExecutionProvider"])
    graph_in, graph_out = session.get_inputs(), session.get_outputs()
    declares_nothing = not config.input and not config.output and config.max_batch_size == 0
    if declares_nothing and all(_batchable(node.shape) for node in (*graph_in, *graph_out)):
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        if not config.HasField("dynamic_batching") and not config.HasField("sequence_batching"):
            config.dynamic_batching.SetInParent()
    skip = 1 if config.max_batch_size > 0 else 0
    for field, nodes in (("input", graph_in), ("output", graph_out)):
        tensors = getattr(config, field)
        if tensors:
            continue
        for node in nodes:
            if not isinstance(node.shape, list) or len(node.shape) <= skip:
                raise BackendError(f"cannot auto-complete {field} '{node.name}': its shape {node.shape} is "
                                   "unknown or too short; declare it in config.pbtxt")
            tensor = tensors.add(name=node.name, data_type=_config_type(node.type, field, node.name))
            tensor.dims.extend(_dim(dim) for dim in node.shape[skip:])


def _batchable(shape: object) -> bool:
    return isinstance(shape, list) and len(shape) > 1 and _dim(shape[0]) == -1


def _dim(dim: object) -> int:
    return dim if isinstance(dim, int) and dim > 0 else -1


def _config_type(ort_type: str, field: str, name: str) -> int:
    datatype = _ORT_TYPES.get(ort_type)
    if datatype is None:
        raise BackendError(f"{field} '{name}' of the graph is {ort_type}, which no config data_type matches")
    return model_config_pb2.DataType.Value(CONFIG_TYPES[datatype])


def _options(parameters: dict[str, str]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    for key, attribute in (("intra_op_thread_count", "intra_op_num_threads"),
                           ("inter_op_thread_count", "inter_op_num_threads")):
        value = parameters.get(key)
        if value is None:
            continue
        if not value.strip().isdigit():
            raise BackendError(f"parameters.{key}: {value!r} is not a whole number")
        setattr(options, attribute, int(value))
    return options


def _session(model_file: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    path = model_file / "model.onnx" if model_file.is_dir() else model_file
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


class OnnxModel(BackendModel):
    """One instance: an InferenceSession on the CPU or on one GPU."""

    def __init__(self, spec: InstanceSpec) -> None:
        super().__init__(spec)
        providers: list = ["CPUExecutionProvider"]
        if spec.kind == "KIND_GPU":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": spec.device_id}))
        self._session = _session(spec.model_file, _options(spec.parameters), providers)
        self._check_graph()
        self._output_names = [output.name for output in self.outputs]

    def _check_graph(self) -> None:
        batch = 1 if self.max_batch_size > 0 else 0
        for field, declared, nodes in (("input", self.inputs, self._session.get_inputs()),
                                       ("output", self.outputs, self._session.get_outputs())):
            graph = {node.name: node for node in nodes}
            for index, spec in enumerate(declared):
                node = graph.get(spec.name)
                where = f"{field}[{index}]"
                if node is None:
                    raise BackendError(f"{where}.name: '{spec.name}' is not a graph {field} of "
                                       f"{self.spec.model_file.name} (it has: {', '.join(graph)})")
                if _ORT_TYPES.get(node.type) != spec.datatype:
                    raise BackendError(f"{where}.data_type: {CONFIG_TYPES[spec.datatype]}, but the graph's "
                                       f"'{spec.name}' is {node.type}")
                if isinstance(node.shape, list) and len(node.shape) != len(spec.dims) + batch:
                    raise BackendError(f"{where}.dims: {list(spec.dims)} with max_batch_size "
                                       f"{self.max_batch_size} is rank {len(spec.dims) + batch}, but the "
                                       f"graph's '{spec.name}' has shape {node.shape}")

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {spec.name: _fed(inputs[spec.name], spec.datatype) for spec in self.inputs}
        results = self._session.run(self._output_names, feeds)
        return {spec.name: as_declared(np.asarray(result), spec) for spec, result in zip(self.outputs, results)}

    def close(self) -> None:
        self._session = None


def _fed(array: np.ndarray, datatype: str) -> np.ndarray:
    if datatype != "BYTES":
        return array
    return np.vectorize(lambda item: item.decode() if isinstance(item, bytes) else str(item),
                        otypes=[object])(array)
