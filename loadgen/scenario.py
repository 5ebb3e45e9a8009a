"""Scenario: the validated description of one run (first stage of DESIGN.md's flow).

A scenario file is TOML with a `[target]` table, exactly one load-pattern table (`[open_loop]` or
`[closed_loop]`), and an optional `[output]` table. Each pattern has its own model, so a key that
belongs to the other pattern is reported as unknown. Every problem in a file is reported at once,
each naming its key, and the CLI turns them into exit code 2.

    [target]
    url = "http://127.0.0.1:8000"
    model = "identity"

    [open_loop]
    arrival = "poisson"      # or "constant"
    rate = 200               # requests per second
    duration = "30s"
    seed = 1

CLI flags are applied on top of the file's values (`apply_overrides`) before validation, so a
flag's value is checked by the same rules as the file's.

With `protocol = "openai"` the target also takes `endpoint` ("chat" or "completions"), `max_tokens`
and `input_tokens` (token counts: 16, "uniform:8,32", "normal:128,16" or an inline table such as
{dist = "normal", mean = 128, stddev = 16}) and `prompt_file` (JSONL); other protocols reject them.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "ClosedLoop",
    "OpenLoop",
    "Output",
    "Scenario",
    "ScenarioError",
    "Stage",
    "Target",
    "TokenCount",
    "apply_overrides",
    "load_scenario",
    "parse_duration",
    "read_scenario_file",
    "validate_scenario",
]

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")


class ScenarioError(ValueError):
    """A scenario that cannot run; `problems` lists each bad key with what is wrong with it."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "scenario") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "500ms", "30s", "2m", "1h" (bare number: seconds).

    >>> parse_duration("1.5m")
    90.0
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 500ms, 2m")  # noqa: TRY004 (pydantic)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    raise ValueError("expected a duration such as 30s, 500ms, 2m")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_TOKEN_COUNT_HINT = (
    'expected a token count such as 16, "uniform:8,32" (low,high) or "normal:128,16" (mean,stddev)'
)


class TokenCount(_Strict):
    """A count of tokens per request: fixed, or drawn per request (seeded) from a distribution.

    uniform draws integers in [low, high]; normal draws round(N(mean, stddev)), at least 1.

    >>> str(TokenCount.model_validate(parse_token_count("uniform:8,32")))
    'uniform:8,32'
    """

    dist: Literal["fixed", "uniform", "normal"] = "fixed"
    value: int | None = Field(default=None, ge=1)
    low: int | None = Field(default=None, ge=1)
    high: int | None = Field(default=None, ge=1)
    mean: float | None = Field(default=None, ge=1)
    stddev: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _fields_of_dist(self) -> TokenCount:
        needs = {"fixed": ("value",), "uniform": ("low", "high"), "normal": ("mean", "stddev")}[self.dist]
        names = ("value", "low", "high", "mean", "stddev")
        given = {name for name in names if getattr(self, name) is not None}
        if given != set(needs):
            raise ValueError(f"a {self.dist} token count takes {' and '.join(needs)}; {_TOKEN_COUNT_HINT}")
        if self.dist == "uniform" and self.low > self.high:  # type: ignore[operator]
            raise ValueError(f"uniform token count needs low <= high, got {self.low} > {self.high}")
        return self

    def __str__(self) -> str:
        if self.dist == "fixed":
            return str(self.value)
        if self.dist == "uniform":
            return f"uniform:{self.low},{self.high}"
        return f"normal:{self.mean:g},{self.stddev:g}"


def parse_token_count(value: Any) -> Any:
    """16, "16", "uniform:8,32", "normal:128,16" -> TokenCount fields; a dict passes as it is."""
    if isinstance(value, (dict, TokenCount)):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return {"value": value}
    if isinstance(value, str):
        dist, sep, args = value.strip().partition(":")
        parts = [part.strip() for part in args.split(",")] if sep else []
        try:
            if not sep:
                return {"value": int(dist)}
            if dist == "uniform" and len(parts) == 2:
                return {"dist": "uniform", "low": int(parts[0]), "high": int(parts[1])}
            if dist == "normal" and len(parts) == 2:
                return {"dist": "normal", "mean": float(parts[0]), "stddev": float(parts[1])}
        except ValueError:
            pass
    raise ValueError(_TOKEN_COUNT_HINT)


TokenCountField = Annotated[TokenCount, BeforeValidator(parse_token_count)]
_OPENAI_KEYS = ("endpoint", "max_tokens", "input_tokens", "prompt_file")


class Target(_Strict):
    """Where the load goes and how it is spoken to."""

    url: str = Field(pattern=r"^(https?|grpcs?)://[^/\s]+")
    """http(s)://host:port[/prefix] for HTTP protocols, grpc(s)://host:port for kserve-grpc."""
    model: str = Field(min_length=1)
    protocol: Literal["kserve-http", "kserve-grpc", "torchserve-http", "torchserve-grpc", "openai"] = "kserve-http"
    version: str | None = None
    connect_timeout: Duration = Field(default=3.0, gt=0)
    timeout: Duration = Field(default=30.0, gt=0)
    """Per-request timeout; for a stream, the longest wait for its next bytes."""
    endpoint: Literal["chat", "completions"] | None = None
    """openai: POST /v1/chat/completions ("chat", the default) or /v1/completions."""
    max_tokens: TokenCountField | None = None
    """openai: output tokens asked for per request (max_tokens); default 128."""
    input_tokens: TokenCountField | None = None
    """openai: words of each synthetic prompt (about one token each); default 128."""
    prompt_file: str | None = None
    """openai: JSONL prompts instead of synthetic ones, one {"prompt": ...} or {"messages": [...]} a line."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers (or gRPC metadata) sent with every request, e.g. an API gateway's key."""
    bearer_token_env: str | None = None
    """Name of an environment variable holding a bearer token: `Authorization: Bearer <token>` is sent,
    and the token itself is never printed or written to results."""
    ca_file: str | None = None
    """PEM file of the CA that signed the target's certificate (https:// or grpcs://)."""
    shapes: dict[str, list[int]] = Field(default_factory=dict)
    """kserve-*: concrete shapes of inputs with dynamic dimensions, e.g. {INPUT0 = [1, 224]}."""
    input_data: str | None = None
    """kserve-*: a perf_analyzer --input-data JSON file: requests cycle through its "data" entries, and
    when it has "validation_data" every response is checked (a mismatch is an invalid_response error)."""
    batch_size: int = Field(default=1, ge=1)
    """kserve-*: rows per request for a batching model (perf_analyzer's -b): synthetic tensors get this
    leading dimension, input_data entries are repeated this many times."""
    check_response: bool = False
    """kserve-*: check every answer against the model's metadata: each declared output present, with
    its datatype and shape (a wrong one is an invalid_response error; the run goes on)."""
    tensor_format: Literal["auto", "binary", "json"] = "auto"
    """kserve-http: inputs and outputs as the binary tensor data extension (what tritonclient and
    perf_analyzer send) or as JSON values; "auto": binary when the server lists binary_tensor_data
    among its extensions (GET /v2), else JSON."""
    stream: bool = False
    """kserve-grpc: send each request on a ModelStreamInfer stream (one stream per request in flight,
    reused) instead of a unary ModelInfer call."""
    payload: str | None = None
    """torchserve-*: the file whose bytes are each request's body (HTTP) or input "data" (gRPC), or a
    folder of such files (images, say) that requests cycle through in name order."""
    content_type: str | None = None
    """torchserve-http: the body's Content-Type (default: application/json for .json files, else
    application/octet-stream)."""

    @field_validator("ca_file", "input_data")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError("no such file")
        return value

    @field_validator("payload")
    @classmethod
    def _payload_exists(cls, value: str | None) -> str | None:
        if value is None or Path(value).is_file():
            return value
        if not Path(value).is_dir():
            raise ValueError("no such file or folder")
        if not any(item.is_file() and not item.name.startswith(".") for item in Path(value).iterdir()):
            raise ValueError("the folder holds no files")
        return value

    @model_validator(mode="after")
    def _payload_fits_protocol(self) -> Target:
        torchserve = self.protocol.startswith("torchserve")
        if torchserve and self.payload is None:
            raise ValueError(f'protocol {self.protocol!r} needs payload = "FILE" (--payload): TorchServe '
                             "models declare no inputs, so the request body must be given")
        if not torchserve and (self.payload is not None or self.content_type is not None):
            raise ValueError(f"payload, content_type: only for the torchserve protocols, not {self.protocol!r}")
        if self.tensor_format != "auto" and self.protocol != "kserve-http":
            raise ValueError(f"tensor_format: only for protocol kserve-http, not {self.protocol!r}")
        if self.stream and self.protocol != "kserve-grpc":
            raise ValueError(f"stream: only for protocol kserve-grpc, not {self.protocol!r}")
        if not self.protocol.startswith("kserve") and (self.shapes or self.input_data is not None
                                                       or self.batch_size != 1 or self.check_response):
            raise ValueError("shapes, input_data, batch_size, check_response: only for the kserve protocols, "
                             f"not {self.protocol!r}")
        if self.bearer_token_env is not None and not os.environ.get(self.bearer_token_env):
            raise ValueError(f"bearer_token_env: environment variable {self.bearer_token_env} is not set")
        return self

    def auth_headers(self) -> dict[str, str]:
        """`headers` plus the bearer token read from its environment variable (never stored elsewhere)."""
        headers = dict(self.headers)
        if self.bearer_token_env:
            headers["Authorization"] = f"Bearer {os.environ[self.bearer_token_env]}"
        return headers

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https:// targets: the system's CAs, or only `ca_file` when given."""
        if not self.url.startswith("https"):
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    @field_validator("prompt_file")
    @classmethod
    def _prompt_file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError("no such file")
        return value

    @model_validator(mode="after")
    def _scheme_fits_protocol(self) -> Target:
        grpc = self.url.startswith("grpc")
        if grpc != self.protocol.endswith("-grpc"):
            wanted = "grpc://host:port (or grpcs://)" if self.protocol.endswith("-grpc") else "http(s)://host:port"
            raise ValueError(f"url {self.url!r} does not fit protocol {self.protocol!r}: use {wanted}")
        return self

    @model_validator(mode="after")
    def _openai_keys(self) -> Target:
        if self.protocol != "openai":
            given = [key for key in _OPENAI_KEYS if getattr(self, key) is not None]
            if given:
                raise ValueError(f'{", ".join(given)}: only for protocol = "openai", not {self.protocol!r}')
        elif self.prompt_file is not None and self.input_tokens is not None:
            raise ValueError("give input_tokens (synthetic prompts) or prompt_file, not both")
        return self


class Stage(_Strict):
    """One piece of an open-loop rate profile: hold `rate`, or ramp linearly to `ramp_to`."""

    duration: Duration = Field(gt=0)
    rate: float | None = Field(default=None, ge=0)
    ramp_to: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> Stage:
        if (self.rate is None) == (self.ramp_to is None):
            raise ValueError("a stage needs exactly one of rate (hold) or ramp_to (linear ramp)")
        return self


class OpenLoop(_Strict):
    """Arrivals at intended times fixed in advance from the run start, whatever the server does."""

    arrival: Literal["constant", "poisson"] = "constant"
    rate: float | None = Field(default=None, ge=0)
    duration: Duration | None = Field(default=None, gt=0)
    stages: list[Stage] = Field(default_factory=list)
    seed: int = 1
    max_in_flight: int = Field(default=2000, gt=0)

    @model_validator(mode="after")
    def _shape(self) -> OpenLoop:
        if self.stages:
            if self.duration is not None:
                raise ValueError("give either duration (with rate) or stages, not both")
        else:
            if not self.rate:
                raise ValueError("rate must be > 0 (requests per second) unless stages are given")
            if self.duration is None:
                raise ValueError("duration is required, e.g. duration = \"30s\"")
        return self

    @property
    def total_duration(self) -> float:
        if self.stages:
            return sum(stage.duration for stage in self.stages)
        return float(self.duration or 0.0)


class ClosedLoop(_Strict):
    """N users, each sending its next request when the previous answer arrived plus a think time."""

    users: int = Field(gt=0)
    think_time: Duration = Field(default=0.0, ge=0)
    think: Literal["none", "constant", "exponential"] | None = None
    duration: Duration = Field(gt=0)
    seed: int = 1

    @property
    def think_kind(self) -> str:
        if self.think is not None:
            return self.think
        return "constant" if self.think_time > 0 else "none"

    @property
    def total_duration(self) -> float:
        return self.duration


class Output(_Strict):
    dir: str | None = None
    interval: Duration = Field(default=1.0, gt=0)
    max_lag_ms: float = Field(default=1.0, gt=0)
    keep_awake: bool = True
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus /metrics on this port during the run (0: a free port, printed); None: off."""
    metrics_host: str = "127.0.0.1"
    """Address /metrics listens on: an IP address (0.0.0.0 or :: for every interface) or a host name."""

    @field_validator("metrics_host")
    @classmethod
    def _host_is_an_address(cls, value: str) -> str:
        if not _is_host(value):
            raise ValueError("expected an IP address (e.g. 127.0.0.1, 0.0.0.0, ::) or a host name")
        return value


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(value: str) -> bool:
    """An IPv4/IPv6 address, or a host name of RFC 1123 labels whose last label is not all digits."""
    import ipaddress

    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    return (0 < len(value) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())


_ONE_PATTERN = "give exactly one load pattern: [open_loop] (--rate) or [closed_loop] (--users)"


class Scenario(_Strict):
    """A whole run: target, one load pattern, outputs."""

    target: Target
    open_loop: OpenLoop | None = None
    closed_loop: ClosedLoop | None = None
    output: Output = Field(default_factory=Output)
    slo: str | None = None
    """Service-level objectives, e.g. "p99<150ms,errors<1%" (loadgen.slo); a miss exits 1."""

    @field_validator("slo")
    @classmethod
    def _slo_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from loadgen.slo import parse_slo

            try:
                parse_slo(value)
            except ScenarioError as exc:
                raise ValueError("; ".join(p.removeprefix("slo: ") for p in exc.problems)) from None
        return value

    @model_validator(mode="after")
    def _one_pattern(self) -> Scenario:
        if (self.open_loop is None) == (self.closed_loop is None):
            raise ValueError(_ONE_PATTERN)
        return self

    @property
    def pattern(self) -> OpenLoop | ClosedLoop:
        return self.open_loop if self.open_loop is not None else self.closed_loop  # type: ignore[return-value]


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "scenario"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{where}: {message}{shown}"


def validate_scenario(data: dict[str, Any], source: str = "scenario") -> Scenario:
    """Validate a plain dict into a Scenario, or raise ScenarioError naming every bad key."""
    problems = []
    patterns = [name for name in ("open_loop", "closed_loop") if name in data]
    if len(patterns) != 1:
        problems.append(f"scenario: {_ONE_PATTERN}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems += [_describe(e) for e in exc.errors() if _ONE_PATTERN not in e["msg"]]
        raise ScenarioError(problems, source) from None


def read_scenario_file(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML scenario file (not yet validated)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ScenarioError([f"{path}: no such file"], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError([f"not valid TOML: {exc}"], str(path)) from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Lay CLI values over file values. Keys are dotted ("target.url"); None means "not given".

    A pattern flag switches the pattern: `--users` on an open-loop file runs closed loop with the
    file's duration, and `--rate` does the reverse.
    """
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    given = {k: v for k, v in overrides.items() if v is not None}
    for other, mine in (("closed_loop", "open_loop"), ("open_loop", "closed_loop")):
        if any(k.startswith(mine + ".") and k.split(".")[1] in _PATTERN_KEYS[mine] for k in given):
            old = merged.pop(other, None)
            table = merged.setdefault(mine, {})
            if isinstance(old, dict) and "duration" in old and "duration" not in table:
                table["duration"] = old["duration"]
    for dotted, value in given.items():
        if "." not in dotted:
            merged[dotted] = value
            continue
        table_name, key = dotted.split(".", 1)
        if table_name in ("open_loop", "closed_loop") and key in _SHARED_KEYS:
            table_name = "closed_loop" if "closed_loop" in merged else "open_loop"
        table = merged.setdefault(table_name, {})
        if isinstance(table, dict):
            table[key] = value
    return merged


_PATTERN_KEYS = {"open_loop": {"rate", "arrival"}, "closed_loop": {"users", "think_time", "think"}}
_SHARED_KEYS = {"duration", "seed"}


def load_scenario(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read (optionally) a TOML file, lay CLI overrides on it, validate.

    >>> load_scenario(None, {"target.url": "http://127.0.0.1:8000", "target.model": "m",
    ...                      "open_loop.rate": 100, "open_loop.duration": "10s"}).pattern.rate
    100.0
    """
    data = read_scenario_file(path) if path is not None else {}
    source = str(path) if path is not None else "command line"
    return validate_scenario(apply_overrides(data, overrides or {}), source)
