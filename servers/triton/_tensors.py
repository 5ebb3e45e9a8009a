"""Tensors on the KServe v2 HTTP wire: infer request body -> numpy inputs, numpy outputs -> response body.

Covers JSON `data` and the binary tensor data extension (PROTOCOLS.md 1.7, 1.8, 1.10): a JSON header of
`Inference-Header-Content-Length` bytes followed by one blob per tensor carrying `binary_data_size`,
in the order the tensors appear; BYTES elements are a 4-byte little-endian length then the bytes.
Requests are checked against the model's declared tensors with Triton's wording; every problem raises
InferError, whose message the server returns as {"error": ...} with status 400.

Decoding is most of a small request's cost in the server, so it is kept short: a JSON header that
came before for the same model, with every input binary and no request id, is not parsed or checked
again: what it decided (inputs, shapes, offsets, outputs, batch size) is kept as a _Plan, and only
the blobs are cut (perf_analyzer and tritonclient send the same header for every request of a shape:
15 us -> 3 us a request). The plans are bounded by bytes, not by count, since a client chooses the
size of its headers (up to the 64 MiB body limit): a model keeps plans worth at most
PLAN_BYTES_PER_MODEL (the header's bytes and a fixed allowance per input and output), the oldest
going first, and a header over MAX_PLAN_HEAD_BYTES is never kept (the usual one is a few hundred
bytes). A plan is a pure function of
the header's bytes and the model's declared tensors, so the answer, errors included, is the same
either way: a blob of another length, or a BYTES blob that does not parse, takes the full path.
A response's JSON is put together from pieces kept per model and output name, the same text as
json_body of the response object (servers/core/http1.py) without encoding the object each time.

A raw request (`Inference-Header-Content-Length: 0`) has no JSON at all: the body is the blob of the
model's only input, as a batch of 1, and every output comes back binary. Its shape is the declared
one with the variable dim (at most one) worked out from the body's size; a BYTES input must be
declared [1], and the body is that one element (the server adds its length prefix). Errors use
Triton's wording.
"""

from __future__ import annotations

import functools
import json
import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from servers.core.http1 import json_text
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

__all__ = ["MAX_ELEMENTS", "MAX_PLAN_HEAD_BYTES", "PLAN_BYTES_PER_MODEL", "InferError", "InferRequest",
           "encode_response", "parse_infer", "plan_bytes"]

MAX_ELEMENTS = 2**63 - 1
"""The most elements a tensor's shape may describe: Triton counts them in an int64, and so does numpy."""
PLAN_BYTES_PER_MODEL = 1 << 20
"""The most bytes of decoded binary headers (and their plans) kept per model; the oldest goes first."""
MAX_PLAN_HEAD_BYTES = 16 << 10
"""A binary request's JSON header longer than this is decoded every time, never kept."""
_PLAN_OVERHEAD_BYTES = 256
"""What a plan costs besides its header's bytes: per plan, and per input and output it names (a
generous reckoning of the tuples and objects it holds), and 40 bytes per dimension of its shapes."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a binary request's JSON header decided: per input (name, spec, shape, blob offset, size),
    the outputs, the batch size, and the blob bytes the header claims."""

    inputs: tuple[tuple[str, TensorSpec, tuple[int, ...], int, int], ...]
    outputs: tuple[tuple[str, bool], ...]
    batch: int
    blob_bytes: int

    def apply(self, blobs: memoryview) -> InferRequest:
        tag = request_tag(None)
        inputs = {name: unpack_fixed(blobs[offset:offset + size], spec, shape, tag)
                  for name, spec, shape, offset, size in self.inputs}
        return InferRequest(None, inputs, self.outputs, self.batch)


    def cost(self, head: bytes) -> int:
        """The bytes a plan for `head` is reckoned to hold."""
        dims = sum(len(shape) for _, _, shape, _, _ in self.inputs)
        return len(head) + _PLAN_OVERHEAD_BYTES * (1 + len(self.inputs) + len(self.outputs)) + 40 * dims


class _Plans(dict):
    """One model's plans by header, oldest first, and the bytes they are reckoned to hold."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


_PLANS: weakref.WeakKeyDictionary[Model, _Plans] = weakref.WeakKeyDictionary()


def plan_bytes(model: Model) -> int:
    """The bytes the plans kept for `model` are reckoned to hold (at most PLAN_BYTES_PER_MODEL)."""
    plans = _plans(model)
    return 0 if plans is None else plans.size


def parse_infer(body: bytes, header_length: str | None, model: Model) -> InferRequest:
    """Split, decode and check one infer request body for `model`."""
    head, blobs = _split(body, header_length)
    if head is None:
        return _parse_raw(body, model)
    plans = _plans(model) if blobs else None
    if plans is not None:
        plan = plans.get(head)
        if plan is not None and plan.blob_bytes == len(blobs):
            try:
                return plan.apply(blobs)
            except InferError:
                pass  # a BYTES blob that does not parse: the full path says so in its own order
    try:
        request = _load_json(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferError(f"failed to parse the request JSON buffer: {exc}") from None
    except RecursionError:
        raise InferError("failed to parse the request JSON buffer: nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InferError("inference request JSON must be an object with an 'inputs' array")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InferError(f"Unable to parse 'id': expected a JSON string, got {_json_type(request_id)}")
    tag = request_tag(request_id)
    layout: list[tuple[str, TensorSpec, tuple[int, ...], int, int]] = []
    inputs = _decode_inputs(request["inputs"], blobs, model, tag, layout)
    batch = check_complete(inputs, model, tag)
    outputs = _requested_outputs(request, model, tag)
    if request_id is None and blobs and len(layout) == len(inputs):
        _keep(model, bytes(head), _Plan(tuple(layout), outputs, batch, len(blobs)))
    return InferRequest(request_id, inputs, outputs, batch)


def _plans(model: Model) -> _Plans | None:
    try:
        return _PLANS.get(model)
    except TypeError:  # a model that cannot be weakly referenced or hashed keeps no plans
        return None


def _keep(model: Model, head: bytes, plan: _Plan) -> None:
    cost = plan.cost(head)
    if len(head) > MAX_PLAN_HEAD_BYTES or cost > PLAN_BYTES_PER_MODEL:
        return
    plans = _plans(model)
    if plans is None:
        try:
            plans = _PLANS.setdefault(model, _Plans())
        except TypeError:
            return
    old = plans.pop(head, None)
    if old is not None:
        plans.size -= old.cost(head)
    while plans and plans.size + cost > PLAN_BYTES_PER_MODEL:
        oldest = next(iter(plans))
        plans.size -= plans.pop(oldest).cost(oldest)
    plans[head] = plan
    plans.size += cost


_SCAN = json.JSONDecoder().scan_once


def _load_json(head: bytes) -> Any:
    """json.loads(head), shorter for the usual head: an object in UTF-8 with nothing around it.

    json.loads reads bytes as UTF-8 when they start with "{" then a byte that is not 0 (its encoding
    detection), then matches whitespace around the value and scans it; anything else, errors
    included, goes through json.loads itself."""
    if head[:1] == b"{" and head[1:2] != b"\0":
        text = head.decode("utf-8", "surrogatepass")
        try:
            value, end = _SCAN(text, 0)
        except (ValueError, StopIteration):
            pass
        else:
            if end == len(text):
                return value
    return json.loads(head)


def _split(body: bytes, header_length: str | None) -> tuple[bytes | None, memoryview]:
    """(JSON part, blobs); (None, all of it) for a raw request."""
    if header_length is None:
        return body, _NO_BLOBS
    if not header_length.isdigit() or not header_length.isascii():
        raise InferError(f"Unable to parse Inference-Header-Content-Length, got: {header_length[:40]}")
    length = int(header_length)
    if length == 0:
        return None, memoryview(body)
    if length > len(body):
        raise InferError(f"Inference-Header-Content-Length {length} exceeds the body of {len(body)} bytes")
    return body[:length], memoryview(body)[length:]


_NO_BLOBS = memoryview(b"")


def _parse_raw(body: bytes, model: Model) -> InferRequest:
    """A raw request: `body` is the blob of the model's only input, batch 1, all outputs binary."""
    tag = request_tag(None)
    if len(model.inputs) != 1:
        raise InferError(f"{tag}Raw request must only have 1 input (found 1) to be deduced but got "
                         f"{len(model.inputs)} inputs in '{model.name}' model configuration")
    spec = model.inputs[0]
    batch = (1,) if model.max_batch_size > 0 else ()
    variable = [index for index, dim in enumerate(spec.dims) if dim == -1]
    if spec.datatype == "BYTES":
        if spec.dims != (1,):
            raise InferError(f"{tag}For BYTE datatype raw input '{spec.name}', the model must have input "
                             "shape [1]")
        array = np.empty(1, dtype=object)
        array[0] = body
        inputs = {spec.name: array.reshape(batch + spec.dims)}
    else:
        if len(variable) > 1:
            raise InferError(f"{tag}The shape of the raw input '{spec.name}' can not be deduced because there "
                             "are more than one variable-sized dimension")
        dims = list(spec.dims)
        if variable:
            element = math.prod(dim for dim in dims if dim != -1) * NUMPY_DTYPES[spec.datatype].itemsize
            if len(body) % element:
                raise InferError(f"{tag}raw input '{spec.name}' has {len(body)} bytes, not a whole number of "
                                 f"{spec.datatype} elements of shape {list(spec.dims)} ({element} bytes each) "
                                 f"for model '{model.name}'")
            dims[variable[0]] = len(body) // element
        inputs = {spec.name: unpack_fixed(body, spec, batch + tuple(dims), tag)}
    return InferRequest(None, inputs, tuple((output.name, True) for output in model.outputs), 1)


def _decode_inputs(tensors: list[Any], blobs: memoryview, model: Model, tag: str,
                   layout: list[tuple[str, TensorSpec, tuple[int, ...], int, int]]) -> dict[str, np.ndarray]:
    """The inputs by name; each binary one is also added to `layout` as (name, spec, shape, offset, size)."""
    decoded: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InferError(f"{tag}each input must be an object with a 'name'")
        name = tensor["name"]
        if name in decoded:
            raise InferError(f"{tag}input '{name}' already exists in request")
        shape = _shape(tensor, name, tag)
        spec = check_input(name, tensor.get("datatype"), shape, model, tag)
        size = _binary_size(tensor, name, tag)
        if size is None:
            decoded[name] = _from_json(tensor, spec, shape, tag)
        else:
            if offset + size > len(blobs):
                raise InferError(f"{tag}unexpected size for input '{name}', expecting "
                                 f"{offset + size - len(blobs)} additional bytes for model '{model.name}'")
            decoded[name] = unpack_fixed(blobs[offset:offset + size], spec, shape, tag)
            layout.append((name, spec, shape, offset, size))
            offset += size
    if offset != len(blobs):
        raise InferError(f"{tag}unexpected additional input data for model '{model.name}': "
                         f"{len(blobs) - offset} bytes not claimed by any input")
    return decoded


def _shape(tensor: dict[str, Any], name: str, tag: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not _whole_numbers(shape):
        raise InferError(f"{tag}input '{name}' needs a 'shape' of integers >= 0, got {shape!r}")
    if math.prod(shape) > MAX_ELEMENTS:  # numpy's int64 element count would wrap around
        raise InferError(f"{tag}input '{name}' has shape {shape}, more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def _whole_numbers(values: list[Any]) -> bool:
    for value in values:  # a loop, not all(generator): this runs for every input of every request
        if type(value) is not int or value < 0:
            return False
    return True


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
    _check_elements(flat, spec, tag)
    try:
        if spec.datatype == "BYTES":
            array = np.empty(len(flat), dtype=object)
            array[:] = [item.encode() for item in flat]
        else:
            array = np.array(flat, dtype=NUMPY_DTYPES[spec.datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise InferError(f"{tag}input '{spec.name}' data does not fit {spec.datatype}: {exc}") from None
    return array.reshape(shape)


_JSON_ELEMENTS: dict[str, tuple[frozenset[type], str]] = {
    "BOOL": (frozenset({bool}), "true or false"),
    "BYTES": (frozenset({str}), "strings"),
    **{name: (frozenset({int}), "integers") for name in
       ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")},
    **{name: (frozenset({int, float}), "numbers") for name in ("FP16", "FP32", "FP64")},
}
"""What JSON `data` may hold per datatype, as Triton reads it: a bool is no number, a number no bool,
and 1.5 no integer (numpy would quietly turn each into the other)."""


def _check_elements(flat: list[Any], spec: TensorSpec, tag: str) -> None:
    if spec.datatype not in _JSON_ELEMENTS:
        raise InferError(f"{tag}input '{spec.name}' of {spec.datatype} must be sent as binary data")
    allowed, wording = _JSON_ELEMENTS[spec.datatype]
    if not set(map(type, flat)) <= allowed:
        wrong = next(item for item in flat if type(item) not in allowed)
        raise InferError(f"{tag}input '{spec.name}' data does not fit {spec.datatype}: its elements must be "
                         f"JSON {wording}, got {_json_type(wrong)}")


def _json_type(value: Any) -> str:
    """A JSON value's kind, in JSON's words."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


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
    chosen: dict[str, bool] = {}
    for output in requested:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InferError(f"{tag}Unable to parse 'name' of a requested output: each must be an object "
                             "with a string 'name'")
        name = output["name"]
        if name not in known:
            raise InferError(f"{tag}unexpected inference output '{name}' for model '{model.name}'")
        if name in chosen:
            raise InferError(f"{tag}output '{name}' already requested")
        params = output.get("parameters") or {}
        if not isinstance(params, dict):
            raise InferError(f"{tag}'parameters' of output '{name}' must be an object")
        chosen[name] = params.get("binary_data", default_binary) is True
    return tuple(chosen.items())


def encode_response(model: Model, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary blobs, the length of its JSON part.

    The JSON part is written from pieces kept per model and output name (json_text of the names),
    with the same text json_body would give for {"model_name", "model_version", ["id"], "outputs":
    [{"name", "datatype", "shape", "parameters": {"binary_data_size"} or "data"}]}."""
    specs = {spec.name: spec for spec in model.outputs}
    tensors, blobs = [], []
    for name, binary in request.outputs:
        array = np.asarray(outputs[name])
        datatype = specs[name].datatype
        start = f"{_tensor_start(name, datatype)}{','.join(map(str, array.shape))}]"
        if binary:
            blob = pack_tensor(array, datatype)
            tensors.append(f'{start},"parameters":{{"binary_data_size":{len(blob)}}}}}')
            blobs.append(blob)
        else:
            tensors.append(f'{start},"data":{json_text(_to_json(array, datatype))}}}')
    request_id = "" if request.id is None else f'"id":{json_text(request.id)},'
    response = f'{_response_start(model.name, model.version)}{request_id}"outputs":[{",".join(tensors)}]}}'
    head = response.encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


@functools.lru_cache(maxsize=1024)
def _response_start(name: str, version: str) -> str:
    return f'{{"model_name":{json_text(name)},"model_version":{json_text(version)},'


@functools.lru_cache(maxsize=1024)
def _tensor_start(name: str, datatype: str) -> str:
    return f'{{"name":{json_text(name)},"datatype":{json_text(datatype)},"shape":['


def _to_json(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in array.ravel()]
    return array.ravel().tolist()
