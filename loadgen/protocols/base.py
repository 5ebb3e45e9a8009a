"""What every protocol plug-in is made of: its target options, its flags, its client.

A protocol is one module directly in loadgen/protocols/ that defines `PROTOCOL`, a ProtocolSpec:

- `options`: a pydantic model of the `[target]` table for this protocol: TargetOptions (where the load
  goes, timeouts, headers, TLS) plus the protocol's own keys, with `protocol: Literal["<name>"]`. The
  scenario's `target` is the union of every protocol's model, told apart by `protocol`
  (loadgen/scenario.py), so a key of another protocol is an error naming its owner.
- `flags`: the protocol's own command-line flags (loadgen/flags.py), each mapped to its target key.
  Protocols that share a flag share the Flag object (loadgen/protocols/common/).
- `client`: a factory `(options, seed) -> Client`; `streams` says whether its outcomes are
  StreamOutcomes (token timings: TTFT, ITL) rather than Outcomes.

A client (the Client protocol below) is used in three calls: `prepare()` once before the run
(readiness check, request building, warm-up; raises a TargetError, exit 2, when the run cannot
start), `send(intended_t)` for each request (never raises for a failed request: the error kind is in
the Outcome), `close()` at the end.

A send that raises all the same (a client's bug, a plug-in's, or a server's bytes that no mapping
foresaw) must not lose its request from the counts: the run calls every client through
`guarded_send`, which turns any Exception into an Outcome of kind `client_error:<type>`.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loadgen.errors import ProtocolMismatch
from loadgen.flags import Flag
from loadgen.outcome import Outcome, StreamOutcome
from loadgen.patterns.trace import Trace
from loadgen.units import Duration

__all__ = [
    "WARMUP_REQUESTS",
    "Client",
    "ProtocolSpec",
    "SizedClient",
    "StreamingClient",
    "TargetOptions",
    "existing_file",
    "guarded_send",
    "warm_up",
]

WARMUP_REQUESTS = 8
_MAX_TIMEOUT_S = 86_400.0  # a day: past it a socket timeout overflows on some platforms, and no run waits so long
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token


def existing_file(value: str | None) -> str | None:
    """A field validator's check: the path names a file."""
    if value is not None and not Path(value).is_file():
        raise ValueError("no such file")
    return value


class TargetOptions(BaseModel):
    """The `[target]` keys every protocol takes; each protocol's model adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    SCHEMES: ClassVar[tuple[str, ...]] = ("http", "https")
    """URL schemes the protocol speaks (gRPC protocols: grpc, grpcs)."""

    url: str = Field(pattern=r"^(https?|grpcs?)://[^/\s]+")
    """http(s)://host:port[/prefix] for HTTP protocols, grpc(s)://host:port for gRPC ones."""
    model: str = Field(min_length=1)
    protocol: str
    version: str | None = None
    connect_timeout: Duration = Field(default=3.0, gt=0, le=_MAX_TIMEOUT_S)
    timeout: Duration = Field(default=30.0, gt=0, le=_MAX_TIMEOUT_S)
    """Deadline of each request: connect, send and the whole answer (a stream: see the protocol's
    stream_first_byte_timeout and stream_gap_timeout)."""
    max_response_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Largest answer taken; a larger one is cut off, its connection closed, as response_too_large."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers (or gRPC metadata) sent with every request, e.g. an API gateway's key."""
    bearer_token_env: str | None = None
    """Name of an environment variable holding a bearer token: `Authorization: Bearer <token>` is sent,
    and the token itself is never printed or written to results."""
    header_env: dict[str, str] = Field(default_factory=dict)
    """Secret headers: header name -> the environment variable holding its value, read where the client
    is made (in a distributed run, by each worker from its own environment), so the value is never in the
    scenario: not sent to workers, written or printed."""
    ca_file: str | None = None
    """PEM file of the CA that signed the target's certificate (https:// or grpcs://)."""

    @field_validator("headers")
    @classmethod
    def _headers_are_single_lines(cls, value: dict[str, str]) -> dict[str, str]:
        """A CR or LF would end the header early and smuggle in more (header injection): refused."""
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a token (letters, digits, -; no space, :, CR, LF)")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: its value holds a CR, LF or NUL")
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: str | None) -> str | None:
        return existing_file(value)

    @model_validator(mode="after")
    def _common_checks(self) -> TargetOptions:
        scheme = self.url.split("://", 1)[0]
        if scheme not in self.SCHEMES:
            wanted = " or ".join(f"{s}://host:port" for s in self.SCHEMES)
            raise ValueError(f"url {self.url!r} does not fit protocol {self.protocol!r}: use {wanted}")
        if self.bearer_token_env is not None and not os.environ.get(self.bearer_token_env):
            raise ValueError(f"bearer_token_env: environment variable {self.bearer_token_env} is not set")
        for name, variable in self.header_env.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header_env: {name!r} is not a header name")
            if name.lower() in {given.lower() for given in self.headers}:
                raise ValueError(f"header_env: {name!r} is in headers too: give it once")
            if not os.environ.get(variable):
                raise ValueError(f"header_env: {name}: environment variable {variable} is not set")
        return self

    @property
    def inferences_per_request(self) -> int:
        """Inferences each request carries (rows of a batch): 1 unless the protocol batches."""
        return 1

    def auth_headers(self) -> dict[str, str]:
        """`headers` plus the secret headers and the bearer token, each read from its environment variable
    (never stored elsewhere)."""
        headers = dict(self.headers)
        headers.update((name, os.environ[variable]) for name, variable in self.header_env.items())
        if self.bearer_token_env:
            headers["Authorization"] = f"Bearer {os.environ[self.bearer_token_env]}"
        return headers

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https:// targets: the system's CAs, or only `ca_file` when given."""
        if not self.url.startswith("https"):
            return None
        return ssl.create_default_context(cafile=self.ca_file)


class Client(Protocol):
    """A protocol client: prepare once, send per request, close at the end."""

    request_name: str
    """The name the run's requests are reported under (Locust's stats), e.g. "mlp infer"."""
    warmup_requests: int
    """Unmeasured requests `prepare()` sent."""

    def prepare(self) -> dict[str, Any]:
        """Check the target, build the requests, warm up; returns what was learnt (the model's
        metadata). Raises a TargetError when the run cannot start."""
        ...

    def send(self, intended_t: float) -> Outcome:
        """One request, meant to start at `intended_t` (monotonic); never raises for a failed one."""
        ...

    def close(self) -> None: ...


class StreamingClient(Client, Protocol):
    """A client whose answers stream (tokens): its outcomes carry each token's arrival."""

    def send(self, intended_t: float) -> StreamOutcome: ...


@dataclass(frozen=True)
class ProtocolSpec:
    """One protocol plug-in (see the module's docstring)."""

    name: str
    options: type[TargetOptions]
    client: Callable[[Any, int], Client]
    flags: tuple[Flag, ...] = ()
    streams: bool = False
    summary: str = ""
    """One line for --help: what it speaks and to what."""
    sized: bool = False
    """Its client is a SizedClient: a trace replay sends each row's own sizes (prompt and output tokens)."""


class SizedClient(Client, Protocol):
    """A client whose requests take a trace row's sizes (protocols whose ProtocolSpec says `sized`)."""

    def use_trace(self, trace: Trace) -> None:
        """Before prepare(): build one request per row of `trace` from its sizes (a row without a size
        takes the options' value) instead of the options' pool."""

    def send(self, intended_t: float, row: int | None = None) -> Outcome:
        """Send the request of trace row `row` (the next of the pool when None)."""


def guarded_send(send: Callable[..., Any], streams: bool) -> Callable[..., Any]:
    """`send` that never raises an Exception: one that escapes is the request's Outcome (a StreamOutcome
    for a streaming client), of kind `client_error:<exception type>`, so every request sent is counted
    once, as ok or as an error."""
    failed = StreamOutcome if streams else Outcome

    def send_guarded(intended_t: float, *row: Any) -> Any:
        try:
            return send(intended_t, *row)
        except Exception as exc:  # noqa: BLE001 - the boundary: anything a client raises is the request's error
            done_t = time.monotonic()
            return failed(intended_t, min(intended_t, done_t), done_t, f"client_error:{type(exc).__name__}",
                          _describe(exc))

    return send_guarded


def _describe(exc: BaseException) -> str:
    """The exception's text, short; its type alone when even str() fails (a RecursionError, a bad __str__)."""
    try:
        return str(exc)[:200] or type(exc).__name__
    except Exception:  # noqa: BLE001 - describing must not raise in turn
        return type(exc).__name__


def warm_up(client: Client, what: str, tolerated: Collection[str] = ("invalid_response",),
            count: int = WARMUP_REQUESTS) -> None:
    """Unmeasured requests through the client's own `send`: open a connection, warm both sides' code
    paths, and learn before the run (not thousands of errors into it) that the target rejects the
    request built. Error kinds in `tolerated` are the behaviour under test (a wrong answer, a cut
    stream), counted by the run rather than fatal here."""
    for _ in range(count):
        outcome = client.send(time.monotonic())
        client.warmup_requests += 1
        if outcome.error is not None and outcome.error not in tolerated:
            raise ProtocolMismatch(f"the warm-up request to {what} failed "
                                   f"({outcome.error}: {outcome.message or 'no detail'})")
