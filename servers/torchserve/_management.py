"""The management API (default port 8081) of the TorchServe-compatible server (PROTOCOLS.md 5.3).

Routes, as TorchServe 0.12's ManagementRequestHandler: `GET /models` (limit, next_page_token),
`POST /models` (register: query parameters, or a JSON body with the same keys), `GET /models/{m}[/{v}|
/all][?customized=true]` (describe), `PUT /models/{m}[/{v}]?min_worker=&max_worker=&synchronous=` (scale),
`PUT /models/{m}/{v}/set-default`, `DELETE /models/{m}[/{v}]` (unregister), `GET /v1/models/{m}` (KServe
v1 readiness), `GET /token?type=` (rotate a key, with the API key), `OPTIONS /` and `/api-description`.
Register and unregister answer 405 unless enable_model_api is on (scaling stays allowed, as the
captures show). Numeric query parameters that do not parse take their default, as TorchServe's
NettyUtils.getIntParameter does (so `min_worker=abc` scales to 1).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from servers.core.http1 import Request as HttpRequest
from servers.torchserve._auth import TokenAuth
from servers.torchserve._http import Send
from servers.torchserve._models import ModelManager, RegisterRequest
from servers.torchserve._openapi import describe_api
from servers.torchserve._wire import METHOD_NOT_ALLOWED, NOT_FOUND, Reply, TsError, error_reply, json_reply

__all__ = ["ManagementApi", "int_parameter"]


def int_parameter(query: dict[str, list[str]], name: str, default: int) -> int:
    """NettyUtils.getIntParameter: the first value as an int, the default when absent or not a number."""
    values = query.get(name)
    if not values:
        return default
    try:
        return int(values[0])
    except ValueError:
        return default


def _text_parameter(query: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = query.get(name)
    return values[0] if values else default


class ManagementApi:
    """Routes of the management port over one ModelManager."""

    def __init__(self, models: ModelManager, auth: TokenAuth, model_api: bool) -> None:
        self.models = models
        self._auth = auth
        self._model_api = model_api
        self._description = json_reply(describe_api("management"))

    def handle(self, request: HttpRequest, send: Send) -> Any:
        target = urlsplit(request.target)
        query = parse_qs(target.query, keep_blank_values=True)
        if self._auth.enabled and "/token" in target.path:
            self._auth.check("API", request.headers.get("authorization"))
            self._auth.rotate(_text_parameter(query, "type"))
            return Reply(200, b"\n")
        self._auth.check("management", request.headers.get("authorization"))
        segments = [unquote(part) for part in target.path.split("/")[1:]]
        if target.path == "/":
            return self._description if request.method == "OPTIONS" else error_reply(NOT_FOUND)
        if segments == ["api-description"]:
            return self._description
        if segments[0] == "v1" and len(segments) == 3 and segments[1] == "models":
            return self._kserve_ready(segments[2])
        if segments[0] != "models" or len(segments) > 4:
            return error_reply(NOT_FOUND)
        if len(segments) == 1:
            return self._models_route(request, query)
        return self._model_route(request, query, segments)

    def _models_route(self, request: HttpRequest, query: dict[str, list[str]]) -> Any:
        if request.method == "GET":
            listing = self.models.list_models(int_parameter(query, "limit", 100),
                                              int_parameter(query, "next_page_token", 0))
            return json_reply(listing)
        if request.method == "POST":
            if not self._model_api:
                return error_reply(METHOD_NOT_ALLOWED)
            default_workers = self.models.settings.default_workers_per_model
            return self._register(_register_request(request, query, default_workers))
        return error_reply(METHOD_NOT_ALLOWED)

    def _model_route(self, request: HttpRequest, query: dict[str, list[str]], segments: list[str]) -> Any:
        name = segments[1]
        version = segments[2] if len(segments) >= 3 and segments[2] else None
        method = request.method
        if len(segments) == 4:
            if segments[3] != "set-default":
                return error_reply(NOT_FOUND)
            if method != "PUT":
                return error_reply(METHOD_NOT_ALLOWED)
            return json_reply({"status": self.models.set_default(name, version or "")})
        if method == "GET":
            return self._describe(name, version, _text_parameter(query, "customized", "false") == "true")
        if method == "PUT":
            low = int_parameter(query, "min_worker", 1)
            high = int_parameter(query, "max_worker", low)
            synchronous = (_text_parameter(query, "synchronous", "false") or "").lower() == "true"
            return self._scale(name, version, low, high, synchronous)
        if method == "DELETE":
            if not self._model_api:
                return error_reply(METHOD_NOT_ALLOWED)
            return json_reply({"status": self.models.unregister(name, version)})
        return error_reply(METHOD_NOT_ALLOWED)

    def _describe(self, name: str, version: str | None, customized: bool) -> Any:
        served = self.models.describe(name, version)
        if not customized:
            return json_reply([entry.describe() for entry in served])

        async def with_metadata() -> Reply:
            answers = []
            for entry in served:
                metadata = await self.models.describe_custom(entry)
                answers.append({**entry.describe(), "customizedMetadata": metadata})
            return json_reply(answers, reason="")

        return with_metadata()

    async def _register(self, register: RegisterRequest) -> Reply:
        status, message = await self.models.register(register)
        if status >= 400:
            return error_reply(TsError(status, "InternalServerException", message))
        return json_reply({"status": message}, status)

    async def _scale(self, name: str, version: str | None, low: int, high: int, synchronous: bool) -> Reply:
        status, message = await self.models.scale(name, version, low, high, synchronous)
        if status >= 400:
            return error_reply(TsError(status, "InternalServerException", message))
        return json_reply({"status": message}, status)

    def _kserve_ready(self, name: str) -> Reply:
        served = self.models.lookup(name)
        return json_reply({"name": name, "ready": served.pool.ready_workers > 0})


def _register_request(request: HttpRequest, query: dict[str, list[str]],
                      default_workers: int) -> RegisterRequest:
    """The register parameters: a JSON body (Content-Type application/json) or the query string."""
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() == "application/json":
        try:
            body = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise TsError(400, "BadRequestException", f"Invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise TsError(400, "BadRequestException", "Invalid JSON body: expected an object")
        query = {key: [_json_text(value)] for key, value in body.items() if value is not None}
    return RegisterRequest(
        url=_text_parameter(query, "url"),
        model_name=_text_parameter(query, "model_name"),
        runtime=_text_parameter(query, "runtime"),
        handler=_text_parameter(query, "handler"),
        batch_size=int_parameter(query, "batch_size", -1),
        max_batch_delay=int_parameter(query, "max_batch_delay", -1),
        initial_workers=int_parameter(query, "initial_workers", default_workers),
        synchronous=(_text_parameter(query, "synchronous", "true") or "").lower() == "true",
        response_timeout=int_parameter(query, "response_timeout", -1),
        startup_timeout=int_parameter(query, "startup_timeout", -1),
    )


def _json_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
