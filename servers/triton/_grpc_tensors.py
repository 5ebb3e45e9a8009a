"""Tensors on the KServe v2 gRPC wire: ModelInferRequest -> numpy inputs, numpy outputs -> ModelInferResponse.

Inputs come either all in `raw_input_contents` (one entry per input, in `inputs` order; tritonclient
always sends this way) or each in its typed `contents` field (PROTOCOLS.md 2.3); mixing the two is
refused. Outputs always leave in `raw_output_contents`, as Triton sends them. The checks and the
BYTES layout are the HTTP path's (_infer.py); every problem raises InferError.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from servers.core.model import NUMPY_DTYPES, Model, TensorSpec
from servers.triton._infer import (
    InferError,
    InferRequest,
    check_complete,
    check_input,
    pack_tensor,
    request_tag,
    unpack_fixed,
)
from servers.triton._tensors import MAX_ELEMENTS

__all__ = ["decode_request", "encode_response"]

TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Datatype -> InferTensorContents field (PROTOCOLS.md 1.8); FP16 and BF16 travel raw only."""


def decode_request(message: service_pb2.ModelInferRequest, model: Model) -> InferRequest:
    """Decode and check one ModelInferRequest for `model`."""
    request_id = message.id or None
    tag = request_tag(request_id)
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InferError(f"{tag}expected {len(message.inputs)} raw_input_contents entries, one per input, "
                         f"got {len(raw)}")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        shape = tuple(tensor.shape)
        if any(dim < 0 for dim in shape):
            raise InferError(f"{tag}input '{tensor.name}' needs a shape of integers >= 0, got {list(shape)}")
        if math.prod(shape) > MAX_ELEMENTS:  # numpy's int64 element count would wrap around
            raise InferError(f"{tag}input '{tensor.name}' has shape {list(shape)}, more than {MAX_ELEMENTS} "
                             "elements")
        if tensor.name in inputs:
            raise InferError(f"{tag}input '{tensor.name}' already exists in request")
        spec = check_input(tensor.name, tensor.datatype, shape, model, tag)
        if raw:
            if tensor.HasField("contents"):
                raise InferError(f"{tag}input '{tensor.name}' sets contents while raw_input_contents is used")
            inputs[tensor.name] = unpack_fixed(raw[index], spec, shape, tag)
        else:
            inputs[tensor.name] = _from_contents(tensor, spec, shape, tag)
    batch = check_complete(inputs, model, tag)
    return InferRequest(request_id, inputs, _requested_outputs(message, model, tag), batch)


def _from_contents(tensor: Any, spec: TensorSpec, shape: tuple[int, ...], tag: str) -> np.ndarray:
    field = TYPED_FIELDS.get(spec.datatype)
    if field is None:
        raise InferError(f"{tag}input '{spec.name}' of {spec.datatype} must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InferError(f"{tag}unexpected number of elements for input '{spec.name}': shape "
                         f"{list(shape)} needs {count}, contents has {len(values)}")
    if spec.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=NUMPY_DTYPES[spec.datatype]).reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise InferError(f"{tag}input '{spec.name}' contents do not fit {spec.datatype}: {exc}") from None


def _requested_outputs(message: service_pb2.ModelInferRequest, model: Model,
                       tag: str) -> tuple[tuple[str, bool], ...]:
    if not message.outputs:
        return tuple((spec.name, True) for spec in model.outputs)
    known = {spec.name for spec in model.outputs}
    chosen: list[str] = []
    for output in message.outputs:
        if output.name not in known:
            raise InferError(f"{tag}unexpected inference output '{output.name}' for model '{model.name}'")
        if output.name in chosen:
            raise InferError(f"{tag}output '{output.name}' already requested")
        chosen.append(output.name)
    return tuple((name, True) for name in chosen)


def encode_response(model: Model, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
    """The ModelInferResponse for the requested outputs, their data in raw_output_contents."""
    specs = {spec.name: spec for spec in model.outputs}
    response = service_pb2.ModelInferResponse(model_name=model.name, model_version=model.version,
                                              id=request.id or "")
    for name, _ in request.outputs:
        array = np.asarray(outputs[name])
        datatype = specs[name].datatype
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(pack_tensor(array, datatype))
    return response
