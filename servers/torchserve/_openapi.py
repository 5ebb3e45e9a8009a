"""OpenAPI 3.0.1 descriptions answered to `OPTIONS /` and `GET /api-description` (PROTOCOLS.md 5.1).

TorchServe publishes one document per API with the same info block; the paths and methods here are the
ones the recorded TorchServe 0.12.0 lists on each port (captures extra.json). Each operation is
described briefly: enough for a client that discovers the API, not TorchServe's full schema text.
"""

from __future__ import annotations

from typing import Any

__all__ = ["describe_api"]

_INFO = {
    "title": "TorchServe APIs",
    "description": "TorchServe is a flexible and easy to use tool for serving deep learning models",
    "version": "0.12.0",
}

_MODEL_NAME = {"in": "path", "name": "model_name", "description": "Name of model.", "required": True,
               "schema": {"type": "string"}}
_MODEL_VERSION = {"in": "path", "name": "model_version", "description": "Version of model.", "required": True,
                  "schema": {"type": "string"}}

_OPERATIONS: dict[str, dict[str, tuple[str, str, list[dict[str, Any]]]]] = {
    "/": {"options": ("apiDescription", "Get openapi description.", [])},
    "/ping": {"get": ("ping", "Get TorchServe status.", [])},
    "/v1/models/{model_name}:predict": {
        "post": ("predictions", "Predictions entry point (KServe v1).", [_MODEL_NAME])},
    "/v2/models/{model_name}/infer": {
        "post": ("predictions", "Predictions entry point (KServe v2).", [_MODEL_NAME])},
    "/predictions/{model_name}": {
        "post": ("predictions", "Predictions entry point to get inference using default model version.",
                 [_MODEL_NAME])},
    "/predictions/{model_name}/{model_version}": {
        "post": ("versionPredictions",
                 "Predictions entry point to get inference using specific model version.",
                 [_MODEL_NAME, _MODEL_VERSION])},
    "/models": {"get": ("listModels", "List registered models in TorchServe.", []),
                "post": ("registerModel", "Register a new model in TorchServe.", [])},
    "/models/{model_name}": {
        "delete": ("unregisterModel", "Unregister the default version of a model from TorchServe.",
                   [_MODEL_NAME]),
        "get": ("describeModel", "Provides detailed information about the default version of a model.",
                [_MODEL_NAME]),
        "put": ("setAutoScale", "Configure number of workers for a default version of a model.",
                [_MODEL_NAME])},
    "/models/{model_name}/{model_version}": {
        "delete": ("versionUnregisterModel", "Unregister the specified version of a model from TorchServe.",
                   [_MODEL_NAME, _MODEL_VERSION]),
        "get": ("versionDescribeModel",
                "Provides detailed information about the specified version of a model.",
                [_MODEL_NAME, _MODEL_VERSION]),
        "put": ("versionSetAutoScale", "Configure number of workers for a specified version of a model.",
                [_MODEL_NAME, _MODEL_VERSION])},
    "/models/{model_name}/{model_version}/set-default": {
        "put": ("setDefault", "Set default version of a model", [_MODEL_NAME, _MODEL_VERSION])},
    "/api-description": {"get": ("apiDescription", "Get openapi description.", [])},
    "/metrics": {"get": ("metrics", "Get TorchServe application metrics in prometheus format.",
                         [{"in": "query", "name": "name[]", "description": "Names of metrics to filter",
                           "required": False, "schema": {"type": "string"}}])},
}

_PATHS = {
    "inference": ("/", "/ping", "/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer",
                  "/predictions/{model_name}", "/predictions/{model_name}/{model_version}",
                  "/api-description", "/metrics"),
    "management": ("/", "/models", "/models/{model_name}", "/models/{model_name}/{model_version}",
                   "/models/{model_name}/{model_version}/set-default", "/api-description", "/metrics"),
    "metrics": ("/metrics",),
}


def describe_api(api: str) -> dict[str, Any]:
    """The OpenAPI document of "inference", "management" or "metrics"."""
    paths: dict[str, Any] = {}
    for path in _PATHS[api]:
        paths[path] = {
            method: {"description": description, "operationId": operation, "parameters": parameters,
                     "responses": {"200": {"description": "OK"}}}
            for method, (operation, description, parameters) in _OPERATIONS[path].items()
        }
    return {"openapi": "3.0.1", "info": _INFO, "paths": paths}
