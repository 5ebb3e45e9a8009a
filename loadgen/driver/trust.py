"""What a master and a worker check of each other before and while a distributed run goes.

A distributed run crosses hosts that share a network, not a trust boundary: anything that reaches the
master's port could join and be sent the scenario, and anything that can speak to a worker could have it
read files and send load. So:

- The cluster key. Master and workers are given the same secret (`--cluster-key-env VAR` or
  `--cluster-key-file F`; `--processes` workers get a random one from their master through their
  environment). A worker that has connected asks for a challenge (HELLO, once its handlers are in
  place), and the master sends it a random nonce (CHALLENGE); the worker
  answers HMAC-SHA256(key, nonce and its id) and a nonce of its own (PROOF); the master answers that one
  (WELCOME), so the worker knows it talks to a master that holds the key too. The key itself never
  travels. A worker that cannot prove the key (or has not within CHALLENGE_TIMEOUT_S of connecting) is
  refused (REFUSED, logged by the master) and is never
  sent a scenario; a worker that holds a key takes no run from a master that did not prove it.
- Messages are data to check, not to trust: `message_problem` says what is wrong with a message's
  fields (missing, wrong type) before a handler reads them, so a bogus message is logged and ignored.
- Files: a scenario names files (input data, prompts, a trace...). A worker started with
  `--data-dir DIR` reads them only inside DIR (`confine_paths`: relative paths are taken from DIR,
  absolute ones must lie in it, symlinks included); a worker with neither DIR nor
  `--shared-filesystem` (the --processes workers: their master's own files) takes no scenario that
  names a file.

This module imports no locust, so its rules are unit-tested without a cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from loadgen.driver.distributed import (
    MSG_DONE,
    MSG_FAILED,
    MSG_INTERVAL,
    MSG_READY,
    MSG_RESHARE,
    MSG_SETUP,
    MSG_START,
    MSG_STOP,
    MSG_TAKEOVER,
)

__all__ = [
    "FILE_KEYS",
    "KEY_ENV_OF_LOCAL_WORKERS",
    "MSG_CHALLENGE",
    "MSG_HELLO",
    "MSG_PROOF",
    "MSG_REFUSED",
    "MSG_WELCOME",
    "confine_paths",
    "load_cluster_key",
    "message_problem",
    "new_cluster_key",
    "new_nonce",
    "prove",
    "proves",
]

MSG_HELLO = "loadgen_hello"
MSG_CHALLENGE = "loadgen_challenge"
MSG_PROOF = "loadgen_proof"
MSG_WELCOME = "loadgen_welcome"
MSG_REFUSED = "loadgen_refused"

KEY_ENV_OF_LOCAL_WORKERS = "LOADGEN_CLUSTER_KEY"
"""The variable a master puts its key in for its --processes workers (their environment, never argv)."""

_MIN_KEY_BYTES = 16


def new_cluster_key() -> str:
    """A random key (the --processes workers' own, made afresh for each master)."""
    return secrets.token_hex(32)


def new_nonce() -> str:
    return secrets.token_hex(16)


def load_cluster_key(env: str | None, file: Path | None) -> bytes | None:
    """The key `--cluster-key-env VAR` or `--cluster-key-file F` names (None: neither given); a
    ValueError naming the flag when it cannot be read, is empty or is too short to be a secret."""
    if env and file:
        raise ValueError("--cluster-key-env and --cluster-key-file exclude each other: give one")
    if env:
        text = os.environ.get(env)
        if text is None:
            raise ValueError(f"--cluster-key-env: environment variable {env} is not set")
        where = f"--cluster-key-env: environment variable {env}"
    elif file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--cluster-key-file: cannot read {file}: {exc}") from None
        where = f"--cluster-key-file {file}"
    else:
        return None
    key = text.strip().encode()
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"{where} holds {len(key)} bytes: a cluster key needs {_MIN_KEY_BYTES} or more "
                         "(e.g. `openssl rand -hex 32`)")
    return key


def prove(key: bytes, role: str, nonce: str, client_id: str) -> str:
    """HMAC-SHA256 of a nonce, bound to the answering side (`role`) and the worker's id."""
    return hmac.new(key, f"loadgen {role}\n{client_id}\n{nonce}".encode(), hashlib.sha256).hexdigest()


def proves(key: bytes, role: str, nonce: str, client_id: str, proof: object) -> bool:
    """Whether `proof` is `prove(key, role, nonce, client_id)` (compared in constant time)."""
    return isinstance(proof, str) and hmac.compare_digest(prove(key, role, nonce, client_id), proof)


_NUMBER = (int, float)
_REQUIRED: dict[str, dict[str, Any]] = {
    MSG_SETUP: {"run": str, "scenario": dict, "index": int, "count": int, "seed": int},
    MSG_READY: {"run": str},
    MSG_FAILED: {"run": str, "error": str},
    MSG_START: {"run": str, "start_epoch_s": _NUMBER, "share": list},
    MSG_INTERVAL: {"run": str, "start_s": _NUMBER, "end_s": _NUMBER, "figures": dict},
    MSG_TAKEOVER: {"run": str},
    MSG_RESHARE: {"run": str, "from_s": _NUMBER, "shares": list},
    MSG_STOP: {"run": str},
    MSG_DONE: {"run": str},
    MSG_HELLO: {},
    MSG_CHALLENGE: {"nonce": str},
    MSG_PROOF: {},
    MSG_WELCOME: {"proof": str},
    MSG_REFUSED: {"reason": str},
}
_OPTIONAL: dict[str, dict[str, Any]] = {
    MSG_READY: {"metadata": dict, "warmup_requests": int, "streams": bool, "pid": int, "host": str},
    MSG_FAILED: {"kind": str},
    MSG_START: {"users": int},
    MSG_INTERVAL: {"health": dict},
    MSG_TAKEOVER: {"shares": list, "unsent": int, "users": int, "retire_users": int,
                         "start_s": _NUMBER},
    MSG_DONE: {"generator": dict, "error": str, "in_flight_at_end": int, "end_s": _NUMBER,
                     "stopped_s": _NUMBER, "interrupted": bool},
    MSG_PROOF: {"proof": str, "nonce": str},
}


def message_problem(kind: str, data: object) -> str | None:
    """What is wrong with a loadgen message's fields (None: each one it needs is there, of its type)."""
    if kind not in _REQUIRED:
        return f"unknown message type {kind!r}"
    if not isinstance(data, dict):
        return f"its data is a {type(data).__name__}, not a map"
    for fields, required in ((_REQUIRED[kind], True), (_OPTIONAL.get(kind, {}), False)):
        for name, wanted in fields.items():
            if name not in data:
                if required:
                    return f"field {name!r} is missing"
                continue
            value = data[name]
            if value is None and not required:
                continue
            if not isinstance(value, wanted) or (isinstance(value, bool) and wanted is not bool):
                return f"field {name!r} is a {type(value).__name__}"
    return None


FILE_KEYS = ("ca_file", "input_data", "labels", "reference_outputs", "payload", "prompt_file", "dataset",
             "tokenizer")
"""[target] (and [[mix]] entry) keys that name a file a worker reads; with open_loop.trace, every file a
scenario makes a worker read. A protocol key that names a file must be added here."""


def confine_paths(data: dict[str, Any], data_dir: Path | None) -> dict[str, Any]:
    """The scenario `data` (as sent, before validation) with each file it names resolved inside
    `data_dir`; a ValueError naming the key when one lies outside (or `data_dir` is None: the worker
    has no folder to read files from)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    places: list[tuple[str, dict[str, Any], str]] = []
    for table, keys in (("target", FILE_KEYS), ("open_loop", ("trace",))):
        section = data.get(table)
        if isinstance(section, dict):
            places += [(f"{table}.{key}", section, key) for key in keys if section.get(key) is not None]
    mix = data.get("mix")
    if isinstance(mix, list):
        data["mix"] = mix = [dict(entry) if isinstance(entry, dict) else entry for entry in mix]
        for i, entry in enumerate(mix):
            if isinstance(entry, dict):
                places += [(f"mix[{i}].{key}", entry, key) for key in FILE_KEYS if entry.get(key) is not None]
    for name, holder, key in places:
        holder[key] = _inside(name, holder[key], data_dir)
    return data


def _inside(name: str, value: object, data_dir: Path | None) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: a path is text, got {type(value).__name__}")  # noqa: TRY004 - bad input, exit 2
    if data_dir is None:
        raise ValueError(f"{name} names a file ({value}), and this worker reads files only inside its "
                         "--data-dir: start it with --data-dir DIR holding the file (or --shared-filesystem "
                         "when it sees the master's files at the same paths)")
    root = data_dir.resolve()
    path = (root / value).resolve()  # an absolute `value` replaces root; symlinks are followed
    if not path.is_relative_to(root):
        raise ValueError(f"{name} = {value!r} lies outside this worker's --data-dir {data_dir}: refused")
    if path.is_dir():  # a payload folder: each file it cycles through is read too
        for item in path.iterdir():
            if not item.resolve().is_relative_to(root):
                raise ValueError(f"{name} = {value!r}: {item.name} links outside this worker's --data-dir "
                                 f"{data_dir}: refused")
    return str(path)
