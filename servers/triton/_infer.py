"""The front-end-neutral core of the Triton-compatible server: lookup, input checks, one inference.

HTTP (_app.py with the _tensors.py codec) and gRPC (_grpc.py with the _grpc_tensors.py codec) both
decode a request into an InferRequest, then hand it to `execute` (a model that runs inline or in the
worker pool) or `execute_scheduled` (a model with instances and a Scheduler, _scheduler.py), which run
the model, time each stage and record it in the version's ModelStats (_stats.py); both front ends
share one ModelHost (_host.py), so their requests land in the same counters. Errors are raised as
exceptions each front end maps once: UnknownModel (HTTP 404, gRPC NOT_FOUND), InferError (400,
INVALID_ARGUMENT) and ModelFailure (500, INTERNAL). Messages follow Triton's wording.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from servers.core.model import NUMPY_DTYPES, Model, RequestError, TensorSpec
from servers.triton._host import ModelHost, ServedModel, UnknownModel
from servers.triton._scheduler import Executed, QueueFull
from servers.triton._stats import ModelStats

__all__ = ["InferError", "InferRequest", "ModelFailure", "ModelHost", "Unavailable", "UnknownModel",
           "execute", "execute_scheduled", "submit_scheduled"]

SERVER_NAME = "triton"
SERVER_VERSION = "2.73.0"
"""The Triton release whose protocols this server follows (PROTOCOLS.md reference versions)."""
EXTENSIONS = ("binary_tensor_data", "statistics", "model_configuration", "model_repository")

_LENGTH = struct.Struct("<I")
Result = TypeVar("Result")


class InferError(ValueError):
    """An infer request the server refuses; the message is what the client reads."""


class ModelFailure(RuntimeError):
    """A model raised (or left out an output) while answering a valid request."""


class Unavailable(ModelFailure):
    """A valid request the model cannot take now (its queue is full): HTTP 503, gRPC UNAVAILABLE."""


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request: inputs by name, the outputs to return and whether each is binary
    (the flag matters to HTTP only; gRPC outputs are always raw)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[tuple[str, bool], ...]
    batch_size: int


def request_tag(request_id: str | None) -> str:
    """The prefix Triton puts on request errors."""
    return f"[request id: {request_id if request_id else '<id_unknown>'}] "


def check_input(name: str, datatype: str, shape: tuple[int, ...], model: Model, tag: str) -> TensorSpec:
    """The declared spec of input `name`, after checking its datatype and shape; raises InferError."""
    for spec in model.inputs:  # a loop, not next(generator): this runs for every input of every request
        if spec.name == name:
            break
    else:
        raise InferError(f"{tag}unexpected inference input '{name}' for model '{model.name}'")
    if datatype != spec.datatype:
        raise InferError(f"{tag}inference input '{spec.name}' data-type is '{datatype}', but model "
                         f"'{model.name}' expects '{spec.datatype}'")
    _check_shape(shape, spec, model, tag)
    return spec


def _check_shape(shape: tuple[int, ...], spec: TensorSpec, model: Model, tag: str) -> None:
    dims = shape
    if model.max_batch_size > 0:
        if not shape or not 1 <= shape[0] <= model.max_batch_size:
            raise InferError(f"{tag}inference request batch-size must be <= {model.max_batch_size} for "
                             f"'{model.name}'")
        dims = shape[1:]
    if dims != spec.dims and (len(dims) != len(spec.dims) or
                              any(want not in (-1, got) for want, got in zip(spec.dims, dims))):
        expected = ",".join(str(d) for d in spec.shape(model.max_batch_size))
        raise InferError(f"{tag}unexpected shape for input '{spec.name}' for model '{model.name}'. "
                         f"Expected [{expected}], got [{','.join(str(d) for d in shape)}]")


def check_complete(inputs: dict[str, np.ndarray], model: Model, tag: str) -> int:
    """Check that every input came, with one batch size; returns the batch size (1 without batching)."""
    if len(inputs) != len(model.inputs):
        raise InferError(f"{tag}expected {len(model.inputs)} inputs but got {len(inputs)} inputs for model "
                         f"'{model.name}'")
    if model.max_batch_size <= 0 or not inputs:
        return 1
    batches = {array.shape[0] for array in inputs.values()}
    if len(batches) > 1:
        raise InferError(f"{tag}inputs of model '{model.name}' have different batch sizes")
    return batches.pop()


def unpack_bytes(blob: memoryview, count: int, name: str, tag: str) -> np.ndarray:
    """`count` BYTES elements, each a 4-byte little-endian length then the bytes (PROTOCOLS.md 1.8)."""
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


def unpack_fixed(blob: memoryview | bytes, spec: TensorSpec, shape: tuple[int, ...], tag: str) -> np.ndarray:
    """A fixed-size tensor from its little-endian, row-major bytes; BYTES goes through unpack_bytes."""
    count = math.prod(shape)  # Python ints: a client's huge shape must not wrap around
    if spec.datatype == "BYTES":
        return unpack_bytes(memoryview(blob), count, spec.name, tag).reshape(shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    if len(blob) != count * dtype.itemsize:
        raise InferError(f"{tag}input '{spec.name}' has {len(blob)} bytes of binary data; shape "
                         f"{list(shape)} of {spec.datatype} needs {count * dtype.itemsize}")
    return np.ndarray(shape, dtype, blob)  # a read-only view, as frombuffer + reshape, in one call


def pack_tensor(array: np.ndarray, datatype: str) -> bytes:
    """The binary (HTTP) or raw (gRPC) form of a tensor: the inverse of unpack_fixed."""
    if datatype == "BYTES":
        parts = []
        for item in array.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts += (_LENGTH.pack(len(raw)), raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def _decode(decode: Callable[[], InferRequest], stats: ModelStats, arrival_ns: int) -> InferRequest:
    """Run the front end's decoder; a failure is the request's (InferError) or the decoder's own bug,
    never the model's, so it is counted as OTHER, not BACKEND."""
    try:
        return decode()
    except InferError:
        stats.record_failure(time.perf_counter_ns() - arrival_ns)
        raise
    except Exception as exc:
        stats.record_failure(time.perf_counter_ns() - arrival_ns)
        raise ModelFailure(f"internal error decoding the request: {type(exc).__name__}: {exc}") from exc


def execute(model: Model, stats: ModelStats, arrival_ns: int, decode: Callable[[], InferRequest],
            encode: Callable[[InferRequest, dict[str, np.ndarray]], Result], queued: bool = False) -> Result:
    """Decode, run the model, encode; records the outcome in `stats` and returns what encode made.

    Timing (Triton's statistics extension): queue = arrival to start (the wait for a worker thread),
    compute_input = decode, compute_infer = the model, compute_output = encode. Raises InferError
    for a bad request, ModelFailure when the model fails; either counts as one failure. `queued`
    says the caller added this request to `stats.pending` before handing it to a worker thread.
    """
    start_ns = time.perf_counter_ns()
    if queued:
        stats.add_pending(-1)
    request = _decode(decode, stats, arrival_ns)
    decoded_ns = time.perf_counter_ns()
    try:
        outputs = model.infer(request.inputs)
        inferred_ns = time.perf_counter_ns()
        missing = [name for name, _ in request.outputs if name not in outputs]
        if missing:
            raise RuntimeError(f"model '{model.name}' did not produce output(s) {missing}")
        result = encode(request, outputs)
    except InferError:
        stats.record_failure(time.perf_counter_ns() - arrival_ns)
        raise
    except Exception as exc:
        stats.record_failure(time.perf_counter_ns() - arrival_ns, "BACKEND")
        raise ModelFailure(f"model '{model.name}' failed: {type(exc).__name__}: {exc}") from exc
    done_ns = time.perf_counter_ns()
    stats.record_success(request.batch_size, start_ns - arrival_ns, decoded_ns - start_ns,
                         inferred_ns - decoded_ns, done_ns - inferred_ns)
    return result


async def execute_scheduled(served: ServedModel, arrival_ns: int, decode: Callable[[], InferRequest],
                            encode: Callable[[InferRequest, dict[str, np.ndarray]], Result]) -> Result:
    """`execute` for a model with a Scheduler: decode on the loop, wait for the execution the
    scheduler puts this request in (maybe a dynamic batch), then encode this request's own rows.

    The queue time is arrival to the start of that execution, minus the decoding.
    """
    future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

    def settle(outcome: Result | BaseException) -> None:
        if future.done():  # the caller went away (a cancelled gRPC call)
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    submit_scheduled(served, arrival_ns, decode, encode, settle)
    return await future


def submit_scheduled(served: ServedModel, arrival_ns: int, decode: Callable[[], InferRequest],
                     encode: Callable[[InferRequest, dict[str, np.ndarray]], Result],
                     done: Callable[[Result | BaseException], None]) -> None:
    """`execute_scheduled` with a callback instead of a coroutine, for the HTTP front end (a Task per
    request costs more than the whole scheduling): decodes now and raises InferError or ModelFailure
    at once for a request that never reaches the scheduler; later done(outcome) runs on the loop with
    what encode made, or the InferError or ModelFailure the request failed with.
    """
    model, stats = served.model, served.stats
    start_ns = time.perf_counter_ns()
    request = _decode(decode, stats, arrival_ns)
    decoded_ns = time.perf_counter_ns()

    def executed(outcome: Executed | BaseException) -> None:
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            encode_ns = time.perf_counter_ns()
            missing = [name for name, _ in request.outputs if name not in outcome.outputs]
            if missing:
                raise RuntimeError(f"model '{model.name}' did not produce output(s) {missing}")
            result = encode(request, outcome.outputs)
        except BaseException as exc:  # noqa: BLE001 - whatever the model raised is this request's answer
            done(_scheduled_failure(model, stats, arrival_ns, exc))
            return
        done_ns = time.perf_counter_ns()
        stats.record_request(start_ns - arrival_ns + outcome.queue_ns, decoded_ns - start_ns,
                             outcome.infer_ns, done_ns - encode_ns)
        done(result)

    try:
        served.scheduler.enqueue(request.inputs, request.batch_size, decoded_ns, executed)
    except QueueFull as exc:  # refused, not failed: Triton counts it under reason REJECTED
        stats.record_failure(time.perf_counter_ns() - arrival_ns, "REJECTED")
        raise Unavailable(str(exc)) from exc
    except Exception as exc:  # the model is being unloaded
        raise _scheduled_failure(model, stats, arrival_ns, exc) from exc


def _scheduled_failure(model: Model, stats: ModelStats, arrival_ns: int, exc: BaseException) -> Exception:
    """Count a scheduled request's failure and return the error its front end answers."""
    if isinstance(exc, InferError):
        stats.record_failure(time.perf_counter_ns() - arrival_ns)
        return exc
    stats.record_failure(time.perf_counter_ns() - arrival_ns, "BACKEND")
    if isinstance(exc, RequestError):
        error: Exception = InferError(str(exc))
    else:
        error = ModelFailure(f"model '{model.name}' failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
