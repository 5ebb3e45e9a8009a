"""`triton_python_backend_utils` (pb_utils) for model.py files of the Python backend (PROTOCOLS.md 3.4).

The Python backend (python.py) registers this module in sys.modules under the name model.py files
import, `import triton_python_backend_utils as pb_utils`, so a model written for Triton runs here
unchanged as long as it keeps to the non-decoupled subset: tensors, requests, responses, errors and
the config helpers. Triton runs model.py in a stub process and passes tensors through shared memory;
here it runs in the server's process and a Tensor is a numpy array with a name.

Not offered: decoupled response senders, BLS (`InferenceRequest.exec`), DLPack and GPU tensors.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
"""The flag that ends a decoupled response stream (decoupled mode is not supported here)."""

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}
"""config data_type -> numpy type, as pb_utils has it."""

_log = logging.getLogger("triton_python_backend_utils")


class TritonModelException(Exception):
    """Raised by pb_utils calls a model makes wrongly (Triton's name)."""


class TritonError:
    """An error for one request: put it in `InferenceResponse(error=...)`.

    The codes are TRITONSERVER_Error_Code values; INTERNAL is the default.
    """

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Tensor:
    """A named tensor: `Tensor("OUTPUT0", array)`; BYTES tensors are numpy object arrays of bytes."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise TritonModelException(f"Tensor '{name}': expected a numpy array, got {type(array).__name__}")
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self._array.shape}, dtype={self._array.dtype})"


class InferenceRequest:
    """One request handed to `execute`: its input tensors and the outputs the client asked for."""

    def __init__(self, inputs: list[Tensor], request_id: str = "", requested_output_names: list[str] | None = None,
                 model_name: str = "", correlation_id: int = 0, parameters: dict[str, Any] | None = None) -> None:
        self._inputs = list(inputs)
        self._request_id = request_id
        self._requested = list(requested_output_names or [])
        self._model_name = model_name
        self._correlation_id = correlation_id
        self._parameters = dict(parameters or {})

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def request_id(self) -> str:
        return self._request_id

    def requested_output_names(self) -> list[str]:
        return list(self._requested)

    def model_name(self) -> str:
        return self._model_name

    def correlation_id(self) -> int:
        return self._correlation_id

    def parameters(self) -> str:
        """The request parameters as a JSON string, as Triton gives them."""
        return json.dumps(self._parameters)

    def flags(self) -> int:
        return 0

    def is_cancelled(self) -> bool:
        return False

    def get_response_sender(self) -> Any:
        raise TritonModelException("response senders belong to decoupled models, which this server "
                                   "does not support")

    def exec(self, *args: Any, **kwargs: Any) -> Any:
        raise TritonModelException("BLS (InferenceRequest.exec) is not supported by this server")


class InferenceResponse:
    """The answer to one request: output tensors, or an error (then the tensors are ignored)."""

    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException(f"InferenceResponse error must be a TritonError, got {type(error).__name__}")
        self._tensors = list(output_tensors or [])
        self._error = error
        self._parameters = dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return list(self._tensors)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


class Logger:
    """Triton's model logger; here the messages go to the `triton_python_backend_utils` logger."""

    @staticmethod
    def log_info(message: str) -> None:
        _log.info(message)

    @staticmethod
    def log_warn(message: str) -> None:
        _log.warning(message)

    @staticmethod
    def log_error(message: str) -> None:
        _log.error(message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _log.debug(message)

    @staticmethod
    def log(message: str, level: int = logging.INFO) -> None:
        _log.log(level, message)


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    """The input tensor `name` of `request`, or None when it has none by that name."""
    return next((tensor for tensor in request.inputs() if tensor.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    """The output tensor `name` of `response`, or None."""
    return next((tensor for tensor in response.output_tensors() if tensor.name() == name), None)


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The config of input `name` from the model config dict (`json.loads(args["model_config"])`)."""
    return next((tensor for tensor in model_config.get("input", []) if tensor.get("name") == name), None)


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The config of output `name` from the model config dict."""
    return next((tensor for tensor in model_config.get("output", []) if tensor.get("name") == name), None)


def triton_string_to_numpy(triton_type: str) -> Any:
    """The numpy type of a config data_type: triton_string_to_numpy("TYPE_FP32") is np.float32."""
    try:
        return TRITON_STRING_TO_NUMPY[triton_type]
    except KeyError:
        raise TritonModelException(f"unknown data type '{triton_type}'") from None
