"""Settings of the TorchServe-compatible server: config.properties as TorchServe reads it, then flags.

TorchServe's configuration is a Java properties file (`--ts-config FILE`, PROTOCOLS.md 5.10): `key=value`
(or `key: value`, `key value`), `#` and `!` comments, a trailing backslash continuing a line (how the
`models` JSON is usually written). Keys this server acts on are read here; other keys TorchServe knows
are accepted and ignored, as TorchServe ignores keys it does not know. One key is this server's own:
`worker_mode` (`process`, the default, as TorchServe's workers; or `thread`, workers inside the
server process, for handlers whose models release the GIL). With `enable_envvars_config=true`
a `TS_<KEY>` environment variable overrides the file. Command-line flags override both (torchserve's
own order: env > flags > file, except that here the port flags of the tests win over everything).

`load_settings` reports every problem at once (a bad address, a number that is not one) instead of
stopping at the first.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Address", "Settings", "default_max_workers", "load_settings", "read_properties",
           "workers_beyond_limit"]

_ADDRESS = re.compile(r"(https?)://([^:/\[\]]+|\[[0-9a-fA-F:.]+\])(?::(\d+))?/?")


@dataclass(frozen=True)
class Address:
    """Where one front end listens."""

    host: str
    port: int


def default_max_workers() -> int:
    """The default cap on a model version's workers: 4 per CPU core, at least 32. A worker is a process
    holding its own copy of the model; past a few per core they add memory, not throughput, and a
    mistyped min_worker=10000 would start processes until the host runs out of memory."""
    return max(32, 4 * (os.cpu_count() or 1))


def workers_beyond_limit(what: str, count: int, limit: int) -> str:
    """The reason a worker count over --max-workers-per-model is refused (400, or exit 2 at start)."""
    return f"{what} {count} is more than this server's limit of {limit} workers per model (--max-workers-per-model)"


@dataclass
class Settings:
    """Everything the server needs from config.properties and the command line."""

    inference: Address = Address("127.0.0.1", 8080)
    management: Address = Address("127.0.0.1", 8081)
    metrics: Address = Address("127.0.0.1", 8082)
    grpc_inference: Address | None = Address("127.0.0.1", 7070)
    grpc_management: Address | None = Address("127.0.0.1", 7071)
    model_store: Path | None = None
    load_models: list[str] = field(default_factory=list)
    models: dict[str, Any] = field(default_factory=dict)
    """The `models` JSON: {name: {version: {minWorkers, maxWorkers, batchSize, maxBatchDelay, ...}}}."""
    default_workers_per_model: int = 0
    """0 = as TorchServe: one worker per GPU, or per CPU core without GPUs (models loaded at start);
    models registered later get 0 workers unless asked."""
    job_queue_size: int = 100
    max_workers_per_model: int = field(default_factory=default_max_workers)
    """The most workers one model version may have (--max-workers-per-model; this server's own)."""
    max_connections: int | None = None
    """The most HTTP connections open at once per API port (--max-connections; None: no cap)."""
    max_request_size: int = 6553500
    max_response_size: int = 6553500
    metrics_mode: str = "log"
    enable_metrics_api: bool = True
    token_auth: bool = True
    token_expiration_min: float = 60.0
    model_api: bool = False
    decode_input_request: bool = True
    default_response_timeout: int = 120
    default_startup_timeout: int = 120
    number_of_gpu: int | None = None
    worker_mode: str = "process"
    """process: each worker a Python process of its own (TorchServe's way); thread: a thread here."""
    key_file: Path = Path("key_file.json")
    hostname: str = field(default_factory=socket.gethostname)


_INT_KEYS = {"default_workers_per_model", "job_queue_size", "max_request_size", "max_response_size",
             "default_response_timeout", "default_startup_timeout", "number_of_gpu"}
_BOOL_KEYS = {"enable_metrics_api", "enable_model_api", "decode_input_request", "disable_token_authorization",
              "enable_token_auth", "enable_envvars_config", "enable_grpc_ssl"}
_KNOWN = _INT_KEYS | _BOOL_KEYS | {
    "inference_address", "management_address", "metrics_address", "grpc_inference_address",
    "grpc_management_address", "grpc_inference_port", "grpc_management_port", "model_store", "load_models",
    "models", "metrics_mode", "token_expiration_min", "worker_mode",
}


def read_properties(text: str) -> dict[str, str]:
    """The key/value pairs of a Java properties file (escapes other than line continuation are kept)."""
    props: dict[str, str] = {}
    logical = ""
    for raw in text.splitlines():
        line = raw.lstrip() if not logical else raw.strip()
        if not logical and (not line or line[0] in "#!"):
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:  # an odd number of backslashes continues the line
            logical += line[:-1]
            continue
        logical += line
        key, value = _split_pair(logical)
        props[key] = value
        logical = ""
    if logical:
        key, value = _split_pair(logical)
        props[key] = value
    return props


def _split_pair(line: str) -> tuple[str, str]:
    match = re.match(r"([^=:\s]+)\s*[=:\s]\s*(.*)", line)
    if match is None:
        return line.strip(), ""
    return match[1], match[2].strip()


def load_settings(properties: dict[str, str],
                  environ: dict[str, str] | None = None) -> tuple[Settings, list[str]]:
    """Settings from properties (env overrides when enable_envvars_config=true), and every problem found."""
    environ = os.environ if environ is None else environ
    props = dict(properties)
    if _truthy(props.get("enable_envvars_config", "false")):
        for key in _KNOWN:
            value = environ.get(f"TS_{key.upper()}")
            if value is not None:
                props[key] = value
    problems: list[str] = []
    settings = Settings()
    for key in ("inference", "management", "metrics"):
        text = props.get(f"{key}_address")
        if text is not None:
            address = _address(text, f"{key}_address", problems)
            if address is not None:
                setattr(settings, key, address)
    _grpc(settings, props, problems)
    _numbers(settings, props, problems)
    _flags(settings, props, problems)
    if "model_store" in props:
        settings.model_store = Path(props["model_store"])
    if props.get("load_models"):
        settings.load_models = [item.strip() for item in props["load_models"].split(",") if item.strip()]
    if props.get("models"):
        try:
            models = json.loads(props["models"])
        except ValueError as exc:
            problems.append(f"models: not valid JSON ({exc})")
        else:
            if isinstance(models, dict):
                settings.models = models
            else:
                problems.append("models: expected a JSON object {name: {version: {...}}}")
    mode = props.get("metrics_mode", "log").strip().lower()
    if mode not in ("log", "prometheus", "legacy"):
        problems.append(f"metrics_mode: expected log, prometheus or legacy, got {mode!r}")
    else:
        settings.metrics_mode = mode
    worker_mode = props.get("worker_mode", "process").strip().lower()
    if worker_mode not in ("process", "thread"):
        problems.append(f"worker_mode: expected process or thread, got {worker_mode!r}")
    else:
        settings.worker_mode = worker_mode
    return settings, problems


def _address(text: str, key: str, problems: list[str]) -> Address | None:
    match = _ADDRESS.fullmatch(text.strip())
    if match is None:
        problems.append(f"{key}: expected http://HOST:PORT, got {text!r}")
        return None
    if match[1] == "https":
        problems.append(f"{key}: https is not supported by this server; use http://")
        return None
    port = int(match[3]) if match[3] else 80
    if port > 65535:
        problems.append(f"{key}: port {port} is out of range")
        return None
    return Address(match[2].strip("[]"), port)


def _grpc(settings: Settings, props: dict[str, str], problems: list[str]) -> None:
    if _truthy(props.get("enable_grpc_ssl", "false")):
        problems.append("enable_grpc_ssl: TLS is not supported by this server")
    for key in ("grpc_inference", "grpc_management"):
        current = getattr(settings, key)
        host = props.get(f"{key}_address", current.host).strip()
        port = current.port
        if f"{key}_port" in props:
            port_text = props[f"{key}_port"].strip()
            if not port_text.isdigit() or int(port_text) > 65535:
                problems.append(f"{key}_port: expected a port number, got {port_text!r}")
                continue
            port = int(port_text)
        setattr(settings, key, Address(host, port))


def _numbers(settings: Settings, props: dict[str, str], problems: list[str]) -> None:
    for key in sorted(_INT_KEYS & props.keys()):
        text = props[key].strip()
        try:
            value = int(text)
        except ValueError:
            problems.append(f"{key}: expected an integer, got {text!r}")
            continue
        if value < 0:
            problems.append(f"{key}: must be >= 0, got {value}")
            continue
        setattr(settings, key, value)
    if "token_expiration_min" in props:
        try:
            settings.token_expiration_min = float(props["token_expiration_min"])
        except ValueError:
            problems.append(f"token_expiration_min: expected a number, got {props['token_expiration_min']!r}")


def _flags(settings: Settings, props: dict[str, str], problems: list[str]) -> None:
    for key in sorted(_BOOL_KEYS & props.keys()):
        if props[key].strip().lower() not in ("true", "false"):
            problems.append(f"{key}: expected true or false, got {props[key]!r}")
    if "disable_token_authorization" in props:
        settings.token_auth = not _truthy(props["disable_token_authorization"])
    if "enable_token_auth" in props:
        settings.token_auth = _truthy(props["enable_token_auth"])
    settings.model_api = _truthy(props.get("enable_model_api", "false"))
    settings.enable_metrics_api = _truthy(props.get("enable_metrics_api", "true"))
    settings.decode_input_request = _truthy(props.get("decode_input_request", "true"))


def _truthy(text: str) -> bool:
    return text.strip().lower() == "true"
