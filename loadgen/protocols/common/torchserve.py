"""The `[target]` keys and flags torchserve-http and torchserve-grpc share: the request body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from loadgen.flags import Flag, as_path_text
from loadgen.protocols.base import TargetOptions

__all__ = ["PAYLOAD_FLAG", "TorchServeOptions", "json_or_text", "payload_files"]


class TorchServeOptions(TargetOptions):
    """TorchServe models declare no inputs, so the request body must be given."""

    payload: str | None = None
    """The file whose bytes are each request's body (HTTP) or input "data" (gRPC), or a folder of such
    files (images, say) that requests cycle through in name order."""

    @field_validator("payload")
    @classmethod
    def _payload_exists(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value)
        if path.is_file():
            return value
        if not path.is_dir():
            raise ValueError("no such file or folder")
        if not payload_files(value):
            raise ValueError("the folder holds no files")
        return value

    @model_validator(mode="after")
    def _payload_given(self) -> TorchServeOptions:
        if self.payload is None:
            raise ValueError(f'protocol {self.protocol!r} needs payload = "FILE" (--payload): TorchServe '
                             "models declare no inputs, so the request body must be given")
        return self


def payload_files(payload: str | None) -> list[Path]:
    """The request bodies' files: `payload` itself, or every visible file of a `payload` folder in name
    order (a folder of images, say); requests cycle through them."""
    if payload is None:
        return []
    path = Path(payload)
    if not path.is_dir():
        return [path]
    return sorted(item for item in path.iterdir() if item.is_file() and not item.name.startswith("."))


def json_or_text(body: bytes) -> Any:
    """A TorchServe answer's body as JSON, or its first 200 characters when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return body[:200].decode("utf-8", "replace")


PAYLOAD_FLAG = Flag(
    "payload", Path | None, "File sent as each request's body (gRPC: its 'data' input), or a folder of "
    "such files that requests cycle through.", key=("target", "payload"), to_scenario=as_path_text)
