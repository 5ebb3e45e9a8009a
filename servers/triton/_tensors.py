"""Tensors on the KServe v2 HTTP wire: infer request body -> numpy inputs, numpy outputs -> response body.

Covers JSON `data` and the binary tensor data extension (PROTOCOLS.md 1.7, 1.8, 1.10): a JSON header of
`Inference-Header-Content-Length` bytes followed by one blob per tensor carrying `binary_data_size`,
in the order the tensors appear; BYTES elements are a 4-byte little-endian length then the bytes.
Requests are checked against the model's declared tensors with Triton's wording; every problem raises
InferError, whose message the server returns as {"error": ...} with status 400.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from servers.core.model import NUMPY_DTYPES, Model, TensorSpec

_LENGTH = struct.Struct("<I")


class InferError(ValueError):
    """An infer request the server refuses; the message is what the client reads."""


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request: inputs by name, the outputs to return and whether each is binary."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[tuple[str, bool], ...]
    batch_size: int


def parse_infer(body: bytes, header_length: str | None, model: Model) -> InferRequest:
    """Split, decode and check one infer request body for `model`."""
    head, blobs = _split(body, header_length)
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferError(f"failed to parse the request JSON buffer: {exc}") from None
    except RecursionError:
        raise InferError("failed to parse the request JSON buffer: nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InferError("inference request JSON must be an object with an 'inputs' array")
    request_id = request.get("id")
    tag = f"[request id: {request_id if request_id is not None else '<id_unknown>'}] "
    inputs = _decode_inputs(request["inputs"], blobs, model, tag)
    outputs = _requested_outputs(request, model, tag)
    batch = next(iter(inputs.values())).shape[0] if model.max_batch_size > 0 and inputs else 1
    return InferRequest(None if request_id is None else str(request_id), inputs, outputs, batch)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or not header_length.isascii():
        raise InferError(f"invalid Inference-Header-Content-Length: {header_length[:40]!r}")
    length = int(header_length)
    if length == 0:
        raise InferError("raw binary requests (Inference-Header-Content-Length: 0) are not supported yet")
    if length > len(body):
        raise InferError(f"Inference-Header-Content-Length {length} exceeds the body of {len(body)} bytes")
    return body[:length], memoryview(body)[length:]


def _decode_inputs(tensors: list[Any], blobs: memoryview, model: Model, tag: str) -> dict[str, np.ndarray]:
    specs = {spec.name: spec for spec in model.inputs}
    decoded: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InferError(f"{tag}each input must be an object with a 'name'")
        name = tensor["name"]
        spec = specs.get(name)
        if spec is None:
            raise InferError(f"{tag}unexpected inference input '{name}' for model '{model.name}'")
        shape = _shape(tensor, name, tag)
        _check_datatype(tensor.get("datatype"), spec, model.name, tag)
        _check_shape(shape, spec, model, tag)
        size = _binary_size(tensor, name, tag)
        if size is None:
            decoded[name] = _from_json(tensor, spec, shape, tag)
        else:
            if offset + size > len(blobs):
                raise InferError(f"{tag}unexpected end of binary data for input '{name}'")
            decoded[name] = _from_binary(blobs[offset:offset + size], spec, shape, tag)
            offset += size
    if len(decoded) != len(specs):
        raise InferError(f"{tag}expected {len(specs)} inputs but got {len(decoded)} inputs for model "
                         f"'{model.name}'")
    if offset != len(blobs):
        raise InferError(f"{tag}{len(blobs) - offset} bytes of binary data are not claimed by any input")
    _check_batches_agree(decoded, model, tag)
    return decoded


def _shape(tensor: dict[str, Any], name: str, tag: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise InferError(f"{tag}input '{name}' needs a 'shape' of integers >= 0, got {shape!r}")
    return tuple(shape)


def _check_datatype(datatype: Any, spec: TensorSpec, model_name: str, tag: str) -> None:
    if datatype != spec.datatype:
        raise InferError(f"{tag}inference input '{spec.name}' data-type is '{datatype}', but model "
                         f"'{model_name}' expects '{spec.datatype}'")


def _check_shape(shape: tuple[int, ...], spec: TensorSpec, model: Model, tag: str) -> None:
    dims = shape
    if model.max_batch_size > 0:
        if not shape or not 1 <= shape[0] <= model.max_batch_size:
            raise InferError(f"{tag}inference request batch-size must be <= {model.max_batch_size} for "
                             f"'{model.name}'")
        dims = shape[1:]
    if len(dims) != len(spec.dims) or any(want not in (-1, got) for want, got in zip(spec.dims, dims)):
        expected = ",".join(str(d) for d in spec.shape(model.max_batch_size))
        raise InferError(f"{tag}unexpected shape for input '{spec.name}' for model '{model.name}'. "
                         f"Expected [{expected}], got [{','.join(str(d) for d in shape)}]")


def _check_batches_agree(inputs: dict[str, np.ndarray], model: Model, tag: str) -> None:
    if model.max_batch_size > 0 and len({array.shape[0] for array in inputs.values()}) > 1:
        raise InferError(f"{tag}inputs of model '{model.name}' have different batch sizes")


def _binary_size(tensor: dict[str, Any], name: str, tag: str) -> int | None:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InferError(f"{tag}'parameters' of input '{name}' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise InferError(f"{tag}binary_data_size of input '{name}' must be an integer >= 0, got {size!r}")
    return size


def _from_json(tensor: dict[str, Any], spec: TensorSpec, shape: tuple[int, ...], tag: str) -> np.ndarray:
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InferError(f"{tag}input '{spec.name}' needs 'data' as a JSON array or a binary_data_size")
    try:
        flat = _flatten(data)
    except RecursionError:
        raise InferError(f"{tag}input '{spec.name}' data is nested too deeply") from None
    if len(flat) != math.prod(shape):
        raise InferError(f"{tag}unexpected number of elements for input '{spec.name}': shape "
                         f"{list(shape)} needs {math.prod(shape)}, data has {len(flat)}")
    try:
        if spec.datatype == "BYTES":
            array = np.empty(len(flat), dtype=object)
            array[:] = [item.encode() if isinstance(item, str) else _bad_bytes(item) for item in flat]
        else:
            array = np.array(flat, dtype=NUMPY_DTYPES[spec.datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise InferError(f"{tag}input '{spec.name}' data does not fit {spec.datatype}: {exc}") from None
    return array.reshape(shape)


def _bad_bytes(item: Any) -> bytes:
    raise TypeError(f"BYTES elements must be JSON strings, got {type(item).__name__}")


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _from_binary(blob: memoryview, spec: TensorSpec, shape: tuple[int, ...], tag: str) -> np.ndarray:
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        return _unpack_bytes(blob, count, spec.name, tag).reshape(shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    if len(blob) != count * dtype.itemsize:
        raise InferError(f"{tag}input '{spec.name}' has {len(blob)} bytes of binary data; shape "
                         f"{list(shape)} of {spec.datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def _unpack_bytes(blob: memoryview, count: int, name: str, tag: str) -> np.ndarray:
    if count * 4 > len(blob):  # before allocating: the shape is the client's word
        raise InferError(f"{tag}BYTES input '{name}' has {len(blob)} bytes of binary data, too few for "
                         f"{count} elements")
    array = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(blob):
            raise InferError(f"{tag}binary data of BYTES input '{name}' ends before element {index}")
        (length,) = _LENGTH.unpack_from(blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise InferError(f"{tag}binary data of BYTES input '{name}' ends inside element {index}")
        array[index] = bytes(blob[offset:offset + length])
        offset += length
    if offset != len(blob):
        raise InferError(f"{tag}BYTES input '{name}' has {len(blob) - offset} bytes after {count} elements")
    return array


def _requested_outputs(request: dict[str, Any], model: Model, tag: str) -> tuple[tuple[str, bool], ...]:
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InferError(f"{tag}request 'parameters' must be an object")
    default_binary = parameters.get("binary_data_output") is True
    requested = request.get("outputs")
    if requested is None:
        return tuple((spec.name, default_binary) for spec in model.outputs)
    if not isinstance(requested, list):
        raise InferError(f"{tag}'outputs' must be an array")
    known = {spec.name for spec in model.outputs}
    chosen = []
    for output in requested:
        if not isinstance(output, dict) or output.get("name") not in known:
            name = output.get("name") if isinstance(output, dict) else output
            raise InferError(f"{tag}unexpected inference output '{name}' for model '{model.name}'")
        params = output.get("parameters") or {}
        binary = params.get("binary_data", default_binary) if isinstance(params, dict) else default_binary
        chosen.append((output["name"], binary is True))
    return tuple(chosen)


def encode_response(model: Model, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary blobs, the length of its JSON part."""
    specs = {spec.name: spec for spec in model.outputs}
    tensors, blobs = [], []
    for name, binary in request.outputs:
        array = np.asarray(outputs[name])
        tensor: dict[str, Any] = {"name": name, "datatype": specs[name].datatype, "shape": list(array.shape)}
        if binary:
            blob = _to_binary(array, specs[name].datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _to_json(array, specs[name].datatype)
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = tensors
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts += (_LENGTH.pack(len(raw)), raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def _to_json(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in array.ravel()]
    return array.ravel().tolist()
