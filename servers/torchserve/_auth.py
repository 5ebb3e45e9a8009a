"""Token authorization as TorchServe 0.12 does it (PROTOCOLS.md 5.1, captures A_default_security.*).

On by default; off with `disable_token_authorization=true` (or `--disable-token-auth`). At start three
keys are made (8 URL-safe base64 characters from 6 random bytes each) and written, Gson-pretty and
readable by the owner only, to key_file.json: `management` and `inference` keys that expire after
`token_expiration_min` (60 minutes by default) and the `API` key that never does. Every request of the
inference API needs `Authorization: Bearer <inference key>`, /ping included; every request of the
management API needs the management key, except `GET /token?type=management|inference`, which needs
the API key and replaces that key (a new expiry too). The metrics API is open. A missing, wrong or
expired key is 400 InvalidKeyException.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from servers.torchserve._wire import TsError, gson

__all__ = ["TokenAuth"]

_BEARER = re.compile(r"Bearer\s+(\S+)")
_FAILED = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
_TOKEN_API_FAILED = "Token Authentication failed. Token either incorrect, expired, or not provided correctly"


def _new_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()


class TokenAuth:
    """The three keys and their checks; `enabled` False lets everything through."""

    def __init__(self, enabled: bool, key_file: Path, expiration_min: float = 60.0) -> None:
        self.enabled = enabled
        self.key_file = key_file
        self._lifetime = timedelta(minutes=expiration_min)
        self.keys = {"management": _new_key(), "inference": _new_key(), "API": _new_key()}
        now = datetime.now(UTC)
        self.expiry = {"management": now + self._lifetime, "inference": now + self._lifetime}
        if enabled:
            self.write()

    def write(self) -> None:
        """key_file.json as TorchServe writes it (mode 0600)."""
        document: dict[str, dict[str, str]] = {
            kind: {"key": self.keys[kind], "expiration time": _instant(self.expiry[kind])}
            for kind in ("management", "inference")
        }
        document["API"] = {"key": self.keys["API"]}
        self.key_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(gson(document))
        os.chmod(self.key_file, 0o600)

    def check(self, kind: str, authorization: str | None) -> None:
        """Raise TsError 400 unless `authorization` carries the valid `kind` key ("inference",
        "management", or "API" for the token API)."""
        if not self.enabled:
            return
        match = _BEARER.fullmatch(authorization or "")
        token = match[1] if match else None
        expiry = self.expiry.get(kind)
        valid = token == self.keys[kind] and (expiry is None or datetime.now(UTC) < expiry)
        if not valid:
            raise TsError(400, "InvalidKeyException", _TOKEN_API_FAILED if kind == "API" else _FAILED)

    def rotate(self, kind: str | None) -> None:
        """The token API: a new key (and expiry) for "management" or "inference", written to the key file."""
        if kind not in ("management", "inference"):
            raise TsError(400, "BadRequestException",
                          f"Invalid token type: {kind}; use type=management or type=inference")
        self.keys[kind] = _new_key()
        self.expiry[kind] = datetime.now(UTC) + self._lifetime
        self.write()


def _instant(moment: datetime) -> str:
    """java.time.Instant.toString(): ISO-8601 in UTC with a Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
