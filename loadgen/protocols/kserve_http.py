"""KServe v2 (Triton) inference over HTTP/1.1: the protocol-client stage.

`prepare()` checks that server and model are ready, reads the model's inputs from its metadata
(GET /v2/models/{m}), builds the request bodies once and sends a few unmeasured warm-up requests;
`send(intended_t)` posts the next body and returns an Outcome. The client never records anything:
the driver hands the Outcome to the recorder. Any status other than 200 is an error of kind
http_<status> (PROTOCOLS.md 1.9).

Tensors travel as the binary tensor data extension when the server offers it (as tritonclient and
perf_analyzer send them: a JSON header naming each input's `binary_data_size`, then the raw bytes;
outputs asked for binary), else as JSON values; `target.tensor_format` forces either.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from loadgen.errors import (
    ProtocolMismatch,
    TargetNotReady,
    TargetUnreachable,
    classify_exception,
)
from loadgen.flags import Flag
from loadgen.outcome import Outcome
from loadgen.protocols.base import ProtocolSpec, warm_up
from loadgen.protocols.common import kserve
from loadgen.protocols.common.http1 import Http1Pool, Response, build_request
from loadgen.protocols.common.request_data import AnswerJudge, Outputs, from_raw, request_data, to_raw

__all__ = ["PROTOCOL", "KServeHttpClient", "KServeHttpTarget"]


class KServeHttpTarget(kserve.KServeOptions):
    """`[target]` of protocol kserve-http (the default): http(s)://host:port[/prefix]."""

    protocol: Literal["kserve-http"] = "kserve-http"
    tensor_format: Literal["auto", "binary", "json"] = "auto"
    """Inputs and outputs as the binary tensor data extension (what tritonclient and perf_analyzer send)
    or as JSON values; "auto": binary when the server lists binary_tensor_data among its extensions
    (GET /v2), else JSON."""



class KServeHttpClient:
    """One target model over KServe v2 HTTP, on a keep-alive pool that grows to the in-flight count."""

    def __init__(self, target: KServeHttpTarget, seed: int = 0) -> None:
        self.target = target
        self.seed = seed
        parts = urlsplit(target.url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        prefix = parts.path.rstrip("/")
        model_path = f"{prefix}/v2/models/{target.model}"
        if target.version:
            model_path += f"/versions/{target.version}"
        self._prefix = prefix
        self._model_path = model_path
        self._infer_path = model_path + "/infer"
        self._netloc = self._host + (f":{parts.port}" if parts.port else "")
        self._pool = self._new_pool(target.timeout)
        self.metadata: dict[str, Any] = {}
        self.request = b""
        self._requests: list[bytes] = []
        self._judge: AnswerJudge | None = None
        """Checks and scores each answer (validation data, declared outputs, labels); None: neither."""
        self._next = 0
        self._headers = target.auth_headers()
        self.warmup_requests = 0
        self.request_name = f"{target.model} infer"
        self.binary = False
        """Whether tensors travel as the binary extension (decided by prepare())."""

    def _new_pool(self, timeout: float) -> Http1Pool:
        context = self.target.ssl_context()
        return Http1Pool(
            self._host, self._port, tls=context, connect_timeout=self.target.connect_timeout, timeout=timeout,
            max_response_bytes=self.target.max_response_bytes,
        )

    # -- before the run -------------------------------------------------------------------------
    def _get(self, pool: Http1Pool, path: str) -> tuple[int, bytes]:
        try:
            response = pool.send(build_request("GET", self._netloc, path, headers=self._headers))
            return response.status, response.body
        except Exception as exc:  # noqa: BLE001 - every way of not answering is "unreachable"
            kind = classify_exception(exc)
            raise TargetUnreachable(
                f"cannot reach {self.target.url} ({kind}: {exc or type(exc).__name__}); "
                f"is the server running, and is --target right?"
            ) from None

    def _extensions(self, pool: Http1Pool) -> list[str]:
        """The server's protocol extensions (GET /v2); none when it does not say."""
        status, body = self._get(pool, f"{self._prefix}/v2")
        try:
            extensions = json.loads(body).get("extensions", []) if status == 200 else []
        except (ValueError, AttributeError):
            return []
        return [str(name) for name in extensions] if isinstance(extensions, list) else []

    def prepare(self) -> dict[str, Any]:
        """Readiness check, metadata, request body. Raises a TargetError when the run cannot start."""
        control = self._new_pool(self.target.connect_timeout)
        try:
            status, _ = self._get(control, f"{self._prefix}/v2/health/ready")
            if status != 200:
                raise TargetNotReady(f"{self.target.url}: server not ready (GET /v2/health/ready -> {status})")
            status, body = self._get(control, self._model_path + "/ready")
            if status != 200:
                raise TargetNotReady(
                    f"model {self.target.model!r} is not ready at {self.target.url} "
                    f"(GET {self._model_path}/ready -> {status} {_error_text(body)})"
                )
            status, body = self._get(control, self._model_path)
            if status != 200:
                raise ProtocolMismatch(f"GET {self._model_path} -> {status} {_error_text(body)}")
            self.metadata = _parse_metadata(body, self._model_path)
            self.binary = self.target.tensor_format == "binary" or (
                self.target.tensor_format == "auto" and "binary_tensor_data" in self._extensions(control))
        finally:
            control.close()
        data = request_data(self.metadata, self.seed, self.target.shapes, self.target.input_data,
                            self.target.batch_size)
        for tensors in data.tensors:
            body, headers = _binary_body(tensors) if self.binary else _json_body(tensors)
            headers = {**self._headers, **headers}
            self._requests.append(build_request("POST", self._netloc, self._infer_path, body, headers))
        self.request = self._requests[0]
        if self.target.check_response:
            data.with_specs(self.metadata)
        self._judge = data.judge(self.metadata, self.target.labels, self.target.reference_outputs)
        warm_up(self, f"POST {self._infer_path}")
        return self.metadata

    # -- the hot path ---------------------------------------------------------------------------
    def send(self, intended_t: float) -> Outcome:
        """POST one infer request; the Outcome carries the error kind when it fails."""
        index = self._next
        if len(self._requests) > 1:
            self._next = (index + 1) % len(self._requests)
        sent_t = time.monotonic()
        try:
            response = self._pool.send(self._requests[index] if self._requests else self.request)
        except Exception as exc:  # noqa: BLE001 - mapped to an error kind, the run goes on
            return Outcome(intended_t, sent_t, time.monotonic(), classify_exception(exc), str(exc))
        done_t = max(response.done_t, sent_t)
        if response.status != 200:
            error = f"http_{response.status}"
            return Outcome(intended_t, sent_t, done_t, error, _error_text(response.body), len(response.body))
        if self._judge is not None:
            problem, scored, correct, similar = self._judge.judge(_outputs(response), index)
            if problem is not None:
                return Outcome(intended_t, sent_t, done_t, "invalid_response", problem, len(response.body))
            return Outcome(intended_t, sent_t, done_t, None, "", len(response.body), scored, correct, similar)
        return Outcome(intended_t, sent_t, done_t, None, "", len(response.body))

    def answers(self) -> list[Outputs | str]:
        """Each request sent once, in order (after prepare), and its answer decoded (or what was wrong)."""
        results: list[Outputs | str] = []
        for request in self._requests:
            response = self._pool.send(request)
            results.append(_outputs(response) if response.status == 200 else
                           f"http_{response.status}: {_error_text(response.body)}")
        return results

    def close(self) -> None:
        self._pool.close()


def _json_body(tensors: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"inputs": tensors}, separators=(",", ":")).encode()
    return body, {"Content-Type": "application/json"}


def _binary_body(tensors: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """The binary tensor data extension: a JSON header whose inputs give their `binary_data_size`
    instead of `data`, asking for every output in binary, then the inputs' raw bytes in order."""
    blobs = [to_raw(tensor["datatype"], tensor["data"]) for tensor in tensors]
    inputs = [{"name": tensor["name"], "shape": tensor["shape"], "datatype": tensor["datatype"],
               "parameters": {"binary_data_size": len(blob)}} for tensor, blob in zip(tensors, blobs)]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}},
                        separators=(",", ":")).encode()
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))}


def _outputs(response: Response) -> Outputs | str:
    """The response's outputs (JSON values or binary blobs, decoded), or what makes it no answer."""
    body = response.body
    header_length = response.headers.get("inference-header-content-length")
    try:
        size = int(header_length) if header_length is not None else len(body)
        offset, outputs = size, {}
        for tensor in json.loads(body[:size])["outputs"]:
            datatype, shape = tensor["datatype"], [int(dim) for dim in tensor["shape"]]
            blob_size = (tensor.get("parameters") or {}).get("binary_data_size")
            if blob_size is None:
                outputs[tensor["name"]] = (datatype, shape, np.array(tensor["data"]).reshape(shape))
                continue
            if offset + blob_size > len(body):
                return f"output {tensor['name']}: binary_data_size {blob_size} runs past the body"
            outputs[tensor["name"]] = (datatype, shape, from_raw(datatype, shape, body[offset:offset + blob_size]))
            offset += blob_size
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        return f"response is not a KServe v2 answer: {exc}"
    return outputs


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nested past the parser's depth
        return body[:200].decode("utf-8", "replace")


def _parse_metadata(body: bytes, path: str) -> dict[str, Any]:
    try:
        metadata = json.loads(body)
        inputs = metadata["inputs"]
        for spec in inputs:
            spec["name"], spec["datatype"], [int(d) for d in spec["shape"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolMismatch(f"GET {path}: not KServe v2 model metadata ({exc})") from None
    return metadata


PROTOCOL = ProtocolSpec(
    name="kserve-http",
    options=KServeHttpTarget,
    client=KServeHttpClient,
    flags=(*kserve.FLAGS,
           Flag("tensor_format", str | None, "binary (the binary tensor extension, as tritonclient and "
                "perf_analyzer send), json, or auto (default: binary when the server lists "
                "binary_tensor_data).", key=("target", "tensor_format"))),
    summary="KServe v2 / Triton over HTTP (the default)",
)
