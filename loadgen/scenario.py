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

An open loop may replay a trace instead of a rate (`trace = "requests.jsonl"`, with trace_format,
trace_speedup, trace_loop, trace_time_unit, trace_strict; loadgen/patterns/trace.py): the trace is read
and checked while the scenario is validated, so a bad row is reported (file and line) before anything
is sent.

CLI flags are applied on top of the file's values (`apply_overrides`) before validation, so a
flag's value is checked by the same rules as the file's.

`[target]` is the options model of its `protocol` (default "kserve-http"): the keys every protocol
takes (url, model, version, timeouts, headers, bearer_token_env, ca_file) and the protocol's own
(loadgen/protocols/<protocol>.py); a key of another protocol is reported with the protocols it
belongs to.

`[[mix]]` entries weight several models (or endpoints) of one target: each entry is the `[target]` table
with the entry's own keys laid over it (validated as a target of its own, so a bad key is named
`mix[1].max_tokens`), plus its `weight` (> 0) and `name` (the label of its figures; default its model,
made unique when entries share a model). Open-loop arrivals pick their entry from their index in the
schedule and the seed (loadgen/patterns/mix.py); a trace row naming a model goes to the entry of that
name (or model).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from loadgen.errors import ScenarioError
from loadgen.goodput import Goodput, parse_goodput
from loadgen.patterns.trace import Trace, TraceError, read_trace
from loadgen.protocols import DEFAULT_PROTOCOL, owners_of, protocols, spec_of
from loadgen.protocols.base import TargetOptions
from loadgen.protocols.common.tokens import TokenCount
from loadgen.slo import parse_slo
from loadgen.units import Duration, parse_duration

__all__ = [
    "ClosedLoop",
    "MixEntry",
    "OpenLoop",
    "Output",
    "Scenario",
    "ScenarioError",
    "Stage",
    "Target",
    "TargetOptions",
    "TokenCount",
    "apply_overrides",
    "load_scenario",
    "make_target",
    "parse_duration",
    "read_scenario_file",
    "validate_scenario",
]

TRACE_TAIL_S = 0.001
"""A trace replayed once ends this long after its last row (the run window holds every row)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # rate = inf, nan: refused


def _target_type() -> Any:
    """The `[target]` table: one options model per protocol (loadgen/protocols/), told apart by `protocol`."""
    members = tuple(spec.options for spec in protocols().values())
    return Annotated[Union[members], Field(discriminator="protocol")]  # noqa: UP007 (a runtime tuple)


Target = _target_type()
"""The type of Scenario.target: the protocol's own options model (all are TargetOptions)."""


def make_target(**fields: Any) -> TargetOptions:
    """A validated target from its keys, as a scenario's `[target]` table gives them (protocol
    defaults to kserve-http); raises ScenarioError naming every bad key."""
    return validate_scenario({"target": fields, "closed_loop": {"users": 1, "duration": 1}}).target


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
    """Arrivals at intended times fixed in advance from the run start, whatever the server does: at a
    rate (constant, Poisson or gamma arrivals; held or ramped by stages), or a trace's own instants."""

    arrival: Literal["constant", "poisson", "gamma"] = "constant"
    rate: float | None = Field(default=None, ge=0)
    duration: Duration | None = Field(default=None, gt=0)
    stages: list[Stage] = Field(default_factory=list)
    seed: int = 1
    max_in_flight: int = Field(default=2000, gt=0)
    burstiness: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Gamma arrivals: the shape of the gaps (vLLM's burstiness): 1 is Poisson, below 1 burstier, above
    1 more even; the mean rate stays `rate`."""
    trace: str | None = None
    """A trace file to replay (loadgen/patterns/trace.py): its rows' instants are the send instants."""
    trace_format: Literal["auto", "jsonl", "csv", "azure", "mooncake", "burstgpt"] = "auto"
    trace_speedup: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Replay this many times faster (the instants are divided by it)."""
    trace_loop: bool = False
    """Repeat the trace until `duration`."""
    trace_time_unit: Literal["s", "ms"] = "s"
    """Unit of a jsonl/csv trace's `timestamp` (Mooncake's are ms, BurstGPT's s, Azure's dates)."""
    trace_strict: bool = False
    """Refuse a trace whose rows are out of time order (else they are sorted, and counted)."""

    @model_validator(mode="after")
    def _shape(self) -> OpenLoop:
        if self.burstiness != 1.0 and self.arrival != "gamma":
            raise ValueError("burstiness is for arrival = \"gamma\"")
        if self.trace is not None:
            return self._trace_shape()
        if self.stages:
            if self.duration is not None:
                raise ValueError("give either duration (with rate) or stages, not both")
        else:
            if not self.rate:
                raise ValueError("rate must be > 0 (requests per second) unless stages are given")
            if self.duration is None:
                raise ValueError("duration is required, e.g. duration = \"30s\"")
        return self

    def _trace_shape(self) -> OpenLoop:
        if self.rate or self.stages or self.arrival != "constant":
            raise ValueError("a trace gives the send instants: no rate, stages or arrival with it")
        if self.trace_loop and self.duration is None:
            raise ValueError("trace_loop repeats the trace until duration: give a duration")
        try:
            self.trace_rows()
        except TraceError as exc:
            raise ValueError("; ".join(exc.problems)) from None
        return self

    def trace_rows(self) -> Trace | None:
        """The trace's rows (read once per file and options), None without a trace."""
        if self.trace is None:
            return None
        return read_trace(self.trace, self.trace_format, self.trace_time_unit, self.trace_strict)

    @property
    def total_duration(self) -> float:
        if self.stages:
            return sum(stage.duration for stage in self.stages)
        if self.duration is None and self.trace is not None:
            rows = self.trace_rows()
            return rows.span_s / self.trace_speedup + TRACE_TAIL_S
        return float(self.duration or 0.0)


MAX_USERS = 1_000_000
"""The most closed-loop users a scenario may ask for: each is a greenlet and a connection (tens of kB and a
descriptor), so a million is already beyond any one host; a larger count is a typo."""


class ClosedLoop(_Strict):
    """N users, each sending its next request when the previous answer arrived plus a think time."""

    users: int = Field(gt=0, le=MAX_USERS)
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


_MIX_OWN = ("weight", "name")
"""The keys of a [[mix]] entry that are not target keys."""
_NAME = re.compile(r"[^\s,=]+")


class MixEntry(_Strict):
    """One entry of a mix: its share of the arrivals (`weight`, relative), its label and its target (the
    scenario's [target] with the entry's own keys over it)."""

    weight: float = Field(gt=0, allow_inf_nan=False)
    name: str | None = None
    """The label of the entry's figures (summary by_model, hlog tags, the `model` label of /metrics)."""
    target: Target
    own: dict[str, Any] = Field(default_factory=dict)
    """The target keys the entry itself gave (the rest are the [target] table's)."""

    @model_serializer
    def _as_written(self) -> dict[str, Any]:
        """The entry as a scenario file gives it (its own keys), so a dumped scenario validates again."""
        written: dict[str, Any] = {"weight": self.weight, **self.own}
        if self.name is not None:
            written["name"] = self.name
        return written

    @field_validator("name")
    @classmethod
    def _name_is_a_label(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError("a name has no spaces, commas or '='")
        return value


def _label(text: str) -> str:
    return re.sub(r"[\s,=]+", "_", text) or "_"


def _entry_names(entries: list[MixEntry]) -> list[str]:
    """Each entry's label: its name, else its model; entries sharing a model are told apart by their own
    keys (an endpoint: the url's host, or the values they set), then by their position."""
    names = [entry.name or _label(entry.target.model) for entry in entries]
    for i, entry in enumerate(entries):
        if entry.name is None and names.count(names[i]) > 1:
            own = {k: v for k, v in entry.own.items() if k != "model"}
            if "url" in own:
                own["url"] = str(own["url"]).split("://", 1)[-1]
            suffix = "/".join(_label(str(v)) for v in own.values())
            names[i] = f"{names[i]}/{suffix}" if suffix else names[i]
    told = list(names)
    return [f"{name}#{i}" if entry.name is None and told.count(name) > 1 else name
            for i, (name, entry) in enumerate(zip(told, entries, strict=True))]


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
    mix: list[MixEntry] | None = None
    """Several models or endpoints of the target, each with its share of the arrivals (None: the target alone)."""
    goodput: str | None = None
    """The terms a good request meets, e.g. "ttft<200ms,tpot<50ms,itl<80ms,latency<2s" (loadgen.goodput):
    summary.json then counts good requests and goodput_rps, and --slo may judge goodput_rps and goodput."""

    @field_validator("target", mode="before")
    @classmethod
    def _default_protocol(cls, value: Any) -> Any:
        if isinstance(value, dict) and "protocol" not in value:
            return {**value, "protocol": DEFAULT_PROTOCOL}
        return value

    @model_validator(mode="before")
    @classmethod
    def _mix_targets(cls, data: Any) -> Any:
        """Give each [[mix]] entry its own target: the [target] table with the entry's keys over it."""
        if not isinstance(data, dict) or not isinstance(data.get("mix"), list):
            return data
        base = data.get("target") if isinstance(data.get("target"), dict) else {}
        first = data["mix"][0] if data["mix"] and isinstance(data["mix"][0], dict) else {}
        if "model" not in base and "model" in first and isinstance(data.get("target"), dict):
            base = {**base, "model": first["model"]}  # the target's model: the first entry's
            data = {**data, "target": base}
        entries = []
        for entry in data["mix"]:
            if isinstance(entry, dict):
                own = {k: v for k, v in entry.items() if k not in _MIX_OWN}
                target = {"protocol": DEFAULT_PROTOCOL, **base, **own}
                entry = {**{k: v for k, v in entry.items() if k in _MIX_OWN}, "target": target, "own": own}
            entries.append(entry)
        return {**data, "mix": entries}

    @field_validator("mix")
    @classmethod
    def _mix_entries(cls, value: list[MixEntry] | None) -> list[MixEntry] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one entry, or no mix")
        named = [entry.name for entry in value if entry.name is not None]
        twice = sorted({name for name in named if named.count(name) > 1})
        if twice:
            raise ValueError(f"duplicate name(s) {', '.join(twice)}: each entry's name labels its figures")
        return value

    @model_validator(mode="after")
    def _mix_fits(self) -> Scenario:
        if not self.mix:
            return self
        for i, entry in enumerate(self.mix):
            if entry.target.protocol != self.target.protocol:
                raise ValueError(f"mix[{i}].protocol: every entry speaks the target's protocol "
                                 f"({self.target.protocol!r}), not {entry.target.protocol!r}")
        names = self.mix_names
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"mix: duplicate name(s) {', '.join(twice)}: give each entry a name of its own")
        trace = self.trace
        if trace is not None and trace.models is not None:
            self._trace_models_fit(trace)
        return self

    def _trace_models_fit(self, trace: Trace) -> None:
        """Every model a trace row names is an entry's (by name, or by the model of exactly one entry)."""
        wanted = self.mix_by_model
        for model in sorted(set(trace.models or ()) - {""} - set(wanted)):
            line = int(trace.lines[trace.models.index(model)])
            raise ValueError(f"mix: {trace.path} line {line}: model {model!r} is no [[mix]] entry's (entries: "
                             f"{', '.join(self.mix_names)})")

    @property
    def mix_by_model(self) -> dict[str, int]:
        """The entry a trace row's model goes to: an entry's name, or the model of exactly one entry."""
        if not self.mix:
            return {}
        found = {name: i for i, name in enumerate(self.mix_names)}
        models = [entry.target.model for entry in self.mix]
        for i, model in enumerate(models):
            if models.count(model) == 1:
                found.setdefault(model, i)
        return found

    @property
    def mix_names(self) -> list[str]:
        """Each [[mix]] entry's label, in order (empty without a mix)."""
        return _entry_names(self.mix) if self.mix else []

    @field_validator("slo")
    @classmethod
    def _slo_parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_slo(value)
            except ScenarioError as exc:
                raise ValueError("; ".join(p.removeprefix("slo: ") for p in exc.problems)) from None
        return value

    @field_validator("goodput")
    @classmethod
    def _goodput_parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_goodput(value)
            except ScenarioError as exc:
                raise ValueError("; ".join(p.removeprefix("goodput: ") for p in exc.problems)) from None
        return value

    @model_validator(mode="after")
    def _goodput_fits(self) -> Scenario:
        rule = self.goodput_rule
        if rule is not None and rule.needs_stream and not spec_of(self.target.protocol).streams:
            raise ValueError(f"goodput: {', '.join(rule.needs_stream)} judge token timings, which only a streamed "
                             f"protocol (openai) measures; protocol {self.target.protocol!r} has latency only")
        if self.slo is not None and rule is None:
            named = [o.text for o in parse_slo(self.slo) if o.metric.startswith("goodput.")]
            if named:
                raise ValueError(f"slo: {', '.join(named)} needs goodput terms (--goodput, e.g. ttft<200ms)")
        return self

    @property
    def goodput_rule(self) -> Goodput | None:
        """The parsed goodput terms (None when the scenario gives none)."""
        return parse_goodput(self.goodput) if self.goodput is not None else None

    @model_validator(mode="after")
    def _one_pattern(self) -> Scenario:
        if (self.open_loop is None) == (self.closed_loop is None):
            raise ValueError(_ONE_PATTERN)
        return self

    @property
    def pattern(self) -> OpenLoop | ClosedLoop:
        return self.open_loop if self.open_loop is not None else self.closed_loop  # type: ignore[return-value]

    @property
    def trace(self) -> Trace | None:
        """The rows of the trace this scenario replays, None when it replays none."""
        return self.open_loop.trace_rows() if self.open_loop is not None else None


def _mix_loc(loc: list[Any]) -> list[Any]:
    """("mix", 1, "target", "openai", "max_tokens") -> ["mix[1]", "max_tokens"]: an entry's target keys are
    the entry's own."""
    if loc[:1] != ["mix"] or len(loc) < 2 or not isinstance(loc[1], int):
        return loc
    rest = loc[2:]
    if rest[:1] == ["target"]:
        rest = rest[2:] if len(rest) > 1 and rest[1] in protocols() else rest[1:]
    return [f"mix[{loc[1]}]", *rest]


def _inherited(error: dict[str, Any], data: dict[str, Any], target_failed: bool) -> bool:
    """An entry's target error about a key the entry took from [target]: [target]'s own error says it."""
    loc = list(error["loc"])
    if loc[:1] != ["mix"] or len(loc) < 3 or loc[2] != "target":
        return False
    rest = loc[3:]
    rest = rest[1:] if rest and rest[0] in protocols() else rest
    entries = data.get("mix")
    entry = entries[loc[1]] if isinstance(entries, list) and isinstance(loc[1], int) else {}
    own = entry.keys() if isinstance(entry, dict) else ()
    if rest:
        return rest[0] not in own and rest[0] != "protocol"
    return target_failed


def _describe(error: dict[str, Any], data: dict[str, Any]) -> str:
    loc = _mix_loc(list(error["loc"]))
    if loc[:1] == ["target"] and len(loc) > 1 and loc[1] in protocols():
        del loc[1]  # the protocol's own model: the key is still target.<key>
    where = ".".join(str(part) for part in loc) or "scenario"
    if error["type"] == "union_tag_invalid":
        return f"target.protocol: unknown protocol {error['ctx']['tag']!r}; known: {', '.join(protocols())}"
    if error["type"] == "extra_forbidden":
        in_target = (loc[:1] == ["target"] or str(loc[0]).startswith("mix[")) and len(loc) == 2
        owners = owners_of(str(loc[-1])) if in_target else []
        if owners:
            target = data.get("target")
            protocol = target.get("protocol", DEFAULT_PROTOCOL) if isinstance(target, dict) else DEFAULT_PROTOCOL
            return f"{where}: only for protocol {', '.join(owners)}, not {protocol!r}"
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not loc and message.startswith("mix"):
        return message  # a check across the entries names the key itself
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
        errors = [e for e in exc.errors() if _ONE_PATTERN not in e["msg"]]
        target_failed = any(e["loc"][:1] == ("target",) for e in errors)
        problems += [_describe(e, data) for e in errors if not _inherited(e, data, target_failed)]
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


def apply_overrides(data: dict[str, Any], overrides: dict[Any, Any]) -> dict[str, Any]:
    """Lay CLI values over file values. Keys are scenario paths, ("target", "url") or "target.url"
    (loadgen/options.py's table gives them); None means "not given".

    A pattern flag switches the pattern: `--users` on an open-loop file runs closed loop with the
    file's duration, and `--rate` does the reverse.
    """
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    given = {_path(k): v for k, v in overrides.items() if v is not None}
    for other, mine in (("closed_loop", "open_loop"), ("open_loop", "closed_loop")):
        if any(len(key) == 2 and key[0] == mine and key[1] in _PATTERN_KEYS[mine] for key in given):
            old = merged.pop(other, None)
            table = merged.setdefault(mine, {})
            if isinstance(old, dict) and "duration" in old and "duration" not in table:
                table["duration"] = old["duration"]
    for path, value in given.items():
        if len(path) == 1:
            merged[path[0]] = value
            continue
        table_name, key = path
        if table_name in ("open_loop", "closed_loop") and key in _SHARED_KEYS:
            table_name = "closed_loop" if "closed_loop" in merged else "open_loop"
        table = merged.setdefault(table_name, {})
        if isinstance(table, dict):
            table[key] = value
    return merged


def _path(key: str | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(key.split(".", 1)) if isinstance(key, str) else key


_PATTERN_KEYS = {"open_loop": {"rate", "arrival", "trace"}, "closed_loop": {"users", "think_time", "think"}}
_SHARED_KEYS = {"duration", "seed"}


def load_scenario(path: str | Path | None, overrides: dict[Any, Any] | None = None) -> Scenario:
    """Read (optionally) a TOML file, lay CLI overrides on it, validate.

    >>> load_scenario(None, {"target.url": "http://127.0.0.1:8000", "target.model": "m",
    ...                      "open_loop.rate": 100, "open_loop.duration": "10s"}).pattern.rate
    100.0
    """
    data = read_scenario_file(path) if path is not None else {}
    source = str(path) if path is not None else "command line"
    return validate_scenario(apply_overrides(data, overrides or {}), source)
