"""Every option of the verbs that send load, declared once: `run`, `sweep` and any later verb take their
flags from here, and `load_command` turns them into the verb's typer parameters.

- TARGET: where the load goes and how (common to every protocol).
- protocol_flags(): each protocol's own flags, as its module declares them (loadgen/protocols/),
  merged by name (kserve-http and kserve-grpc share --shape, ...); their help names the protocols.
- PATTERN: the load pattern's knobs a sweep keeps (arrival, think time, seed, in-flight cap);
  RUN_LOAD: the load itself for one run (--rate, --users, --duration), which a sweep replaces by its
  plan (SWEEP_PLAN).
- OUTPUT: results, live metrics, SLO, server-side figures; DISTRIBUTED: Locust master/worker.
- WEB: the live console (`run`, also distributed, and `sweep`, a single process): Locust's web UI with loadgen's page.

Each Flag with a `key` is a row of the table from flags to scenario keys (`scenario_overrides`); the
others are read by the verb itself. NOT_IN_SWEEP says, for each `run` flag a sweep does not take, why
(tests/test_options.py fails when a run flag is neither in sweep nor there).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from loadgen.errors import ScenarioError
from loadgen.flags import Flag, as_path_text, to_scenario_values
from loadgen.protocols import protocols

__all__ = [
    "COMPARE",
    "DISTRIBUTED",
    "NOT_IN_COMPARE",
    "NOT_IN_SWEEP",
    "OUTPUT",
    "PATTERN",
    "RUN_LOAD",
    "SWEEP_PLAN",
    "TARGET",
    "TRACE",
    "WEB",
    "WEB_AUTH_ENV",
    "compare_flags",
    "load_command",
    "parse_header_env",
    "parse_headers",
    "parse_mix",
    "protocol_flags",
    "run_flags",
    "scenario_overrides",
    "sweep_flags",
]

_PROTOCOL_PANEL = "Protocol options"
_DIST = "Distributed (Locust master/worker)"
_SWEEP = "Sweep plan"


def parse_headers(items: list[str]) -> dict[str, str] | None:
    """["Name: value"] -> {"Name": "value"}; a bad item raises ValueError naming it."""
    headers = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f'{item!r}: expected "Name: value"')
        headers[name.strip()] = value.strip()
    return headers or None


def parse_header_env(items: list[str]) -> dict[str, str] | None:
    """["Name=VAR"] -> {"Name": "VAR"} (header name -> environment variable); a bad item raises ValueError."""
    names = {}
    for item in items:
        name, sep, variable = item.partition("=")
        if not sep or not name.strip() or not variable.strip():
            raise ValueError(f'{item!r}: expected "Header-Name=ENV_VAR"')
        names[name.strip()] = variable.strip()
    return names or None


def parse_mix(text: str) -> list[dict[str, Any]]:
    """"a=3,b=1" -> [{"model": "a", "weight": 3.0}, {"model": "b", "weight": 1.0}] ([[mix]] entries); a bad
    pair raises ValueError naming it (the weights themselves are checked with the scenario's)."""
    entries = []
    for item in text.split(","):
        model, sep, weight = item.strip().rpartition("=")
        if not sep or not model.strip():
            raise ValueError(f"{item.strip()!r}: expected model=weight, e.g. llama-8b=3,llama-70b=1")
        try:
            entries.append({"model": model.strip(), "weight": float(weight)})
        except ValueError:
            raise ValueError(f"{item.strip()!r}: the weight {weight!r} is not a number") from None
    return entries


def _protocol_help() -> str:
    names = list(protocols())
    return f"One of {', '.join(names)} (default {names[0]}); each protocol's own flags are in its panel."


TARGET = (
    Flag("target", str | None, "Base URL, e.g. http://127.0.0.1:8000 (gRPC protocols: grpc://host:port).",
         key=("target", "url")),
    Flag("model", str | None, "Model name on the target.", key=("target", "model")),
    Flag("protocol", str | None, "", key=("target", "protocol")),  # help: the registry's, at build time
    Flag("header", list[str] | None, 'Extra header (gRPC: metadata) on every request, "Name: value"; '
         "repeatable.", key=("target", "headers"), to_scenario=parse_headers),
    Flag("bearer_token_env", str | None, "Environment variable holding a bearer token (sent as "
         "Authorization; never printed).", key=("target", "bearer_token_env")),
    Flag("header_env", list[str] | None, 'A secret header read from an environment variable, "Name=VAR", e.g. '
         '"X-Api-Key=API_KEY"; repeatable. Each process (every worker of a distributed run) reads VAR from its '
         "own environment: the value is never in the scenario, sent to workers, written or printed.",
         key=("target", "header_env"), to_scenario=parse_header_env),
    Flag("ca_file", Path | None, "CA certificate (PEM) for https:// and grpcs:// targets.",
         key=("target", "ca_file"), to_scenario=as_path_text),
    Flag("timeout", str | None, "Deadline of each request (connect, send, whole answer), e.g. 10s.",
         key=("target", "timeout")),
    Flag("max_response_bytes", int | None, "Largest answer taken (default 64 MiB); a larger one is the error "
         "response_too_large.", key=("target", "max_response_bytes")),
    Flag("connect_timeout", str | None, "Connect and readiness-check timeout, e.g. 3s.",
         key=("target", "connect_timeout")),
    Flag("mix", str | None, 'Send to several models of the target, model=weight pairs, e.g. "llama-8b=3,'
         'llama-70b=1" (75 % / 25 % of the arrivals); every figure is also given per model. Replaces the '
         "file's [[mix]].", key=("mix",), to_scenario=parse_mix),
)

RUN_LOAD = (
    Flag("rate", float | None, "Open loop: requests per second.", key=("open_loop", "rate")),
    Flag("users", int | None, "Closed loop: concurrent users.", key=("closed_loop", "users")),
    Flag("duration", str | None, "e.g. 30s, 2m.", key=("open_loop", "duration")),
)

_TRACE = "Trace replay"

TRACE = (
    Flag("trace", Path | None, "Replay this trace's send instants (and each row's sizes where the protocol "
         "has them: prompt and output tokens), open loop: JSONL/CSV with a timestamp column, or the Azure LLM, "
         "Mooncake or BurstGPT formats.", key=("open_loop", "trace"), to_scenario=as_path_text, panel=_TRACE),
    Flag("trace_format", str | None, "auto (default), jsonl, csv, azure, mooncake or burstgpt.",
         key=("open_loop", "trace_format"), panel=_TRACE),
    Flag("trace_speedup", float | None, "Replay N times faster (the instants are divided by N).",
         key=("open_loop", "trace_speedup"), panel=_TRACE),
    Flag("trace_loop", bool | None, "Repeat the trace until --duration.", key=("open_loop", "trace_loop"),
         decls=("--trace-loop",), panel=_TRACE),
    Flag("trace_time_unit", str | None, "Unit of a jsonl/csv trace's timestamp: s (default) or ms.",
         key=("open_loop", "trace_time_unit"), panel=_TRACE),
    Flag("trace_strict", bool | None, "Refuse rows out of time order (else they are sorted, with a count).",
         key=("open_loop", "trace_strict"), decls=("--trace-strict",), panel=_TRACE),
)

PATTERN = (
    Flag("arrival", str | None, "Open loop: constant, poisson or gamma (see --burstiness).",
         key=("open_loop", "arrival")),
    Flag("burstiness", float | None, "Gamma arrivals: shape of the gaps (1: Poisson; < 1 burstier, > 1 more "
         "even; the mean rate is kept).", key=("open_loop", "burstiness")),
    Flag("max_in_flight", int | None, "Open loop in-flight cap.", key=("open_loop", "max_in_flight")),
    Flag("think_time", str | None, "Closed loop: think time, e.g. 50ms.", key=("closed_loop", "think_time")),
    Flag("think", str | None, "Closed loop: none, constant or exponential.", key=("closed_loop", "think")),
    Flag("seed", int | None, "Seed of the arrival process and data.", key=("open_loop", "seed")),
)

OUTPUT = (
    Flag("out", Path | None, "Output folder (default runs/<time>-<model>, a sweep's: ...-sweep).",
         key=("output", "dir"), to_scenario=as_path_text),
    Flag("keep_awake", bool | None, "Keep the generator's CPUs out of deep idle with idle-priority "
         "spinners (default on).", key=("output", "keep_awake"), decls=("--keep-awake/--no-keep-awake",)),
    Flag("slo", str | None, 'Objectives, e.g. "p99<150ms,errors<1%"; exit 1 when one is missed (a sweep: '
         "each step is judged).", key=("slo",)),
    Flag("goodput", str | None, 'Terms every good request meets, e.g. "ttft<200ms,tpot<50ms,itl<80ms,latency<2s" '
         "(each request's own figures; itl: its largest gap between tokens): summary.json and /metrics count "
         "good requests and goodput_rps, and --slo may judge goodput_rps or goodput (the good share).",
         key=("goodput",)),
    Flag("metrics_port", int | None, "Serve Prometheus /metrics on this port (0: a free port, printed): "
         "live figures of the run, or of each step, the curve and the verdict of a sweep.",
         key=("output", "metrics_port")),
    Flag("metrics_host", str | None, "Address /metrics listens on (default 127.0.0.1; 0.0.0.0 lets a "
         "Prometheus on another host scrape).", key=("output", "metrics_host")),
    Flag("server_metrics", str | None, "The target's Prometheus metrics URL (Triton: "
         "http://HOST:8002/metrics): the server's own queue/compute time, batch size, GPU use and energy "
         "(per step in a sweep), in summary.json."),
    Flag("cost_per_hour", float | None, "Price of the server per hour ($), for $ per million inferences "
         "(needs --server-metrics)."),
)

_WEB = "Live console (Locust's web UI)"
WEB_AUTH_ENV = "LOADGEN_WEB_AUTH"
"""The environment variable --web-auth is read from when not given (out of the command line, which other users
of the host can list)."""

WEB = (
    Flag("web_port", int | None, "Serve the live console on this port (0: a free one, printed): Locust's web UI "
         "with loadgen's page at /loadgen: offered, sent and achieved rate, latency percentiles of the last 10 s "
         "and of the run (the /metrics gauges' numbers), schedule lag, the generator's health and errors; stop "
         "the run, or change an open loop's rate for the rest of it; start the next run (rate or users, arrival, "
         "duration; run N writes OUT/run-N) and download each finished run's summary.json, latency.hlog and "
         "report.html. The console stays up after a run, until Ctrl-C, its quit button or --web-autoquit; the "
         "exit code is the last run's. A sweep's console shows each step live and the throughput-latency curve "
         "growing step by step, then the verdict and sweep.json; its stop ends the sweep. A distributed run's "
         "(--processes, --master) shows the master's merged figures and each worker's health; a sweep's is "
         "single-process.",
         panel=_WEB),
    Flag("web_host", str, "Address the console listens on (default 127.0.0.1). Another address (0.0.0.0: every "
         "interface) exposes it to other hosts: it controls the load, so give --web-auth with it.",
         default="127.0.0.1", panel=_WEB),
    Flag("web_auth", str | None, "USER:PASSWORD: the console (loadgen's page and routes and Locust's own) asks "
         "for this user and password by HTTP basic auth (Locust's web login, as its former --web-auth); 401 "
         "without them. Never printed or written to the results.", envvar=WEB_AUTH_ENV, panel=_WEB),
    Flag("web_tls_cert", str | None, "A PEM certificate file (with its chain): the console is served over HTTPS "
         "with it and --web-tls-key (Locust's --tls-cert and --tls-key), so --web-auth's password does not travel "
         "in clear. Give both or neither.", panel=_WEB),
    Flag("web_tls_key", str | None, "The PEM private key of --web-tls-cert (not encrypted).", panel=_WEB),
    Flag("web_autoquit", float | None, "Quit the console this many seconds after a run (or the sweep) ends "
         "unless another run is started from the page (0: as soon as the results are written), as Locust's "
         "--autoquit. Without it the console stays up until Ctrl-C or its quit button.", panel=_WEB),
    Flag("web_wait", bool, "Send no run from the command line: the console waits for a start from its page "
         "(the command line's load fills the form).", default=False, decls=("--web-wait",), panel=_WEB),
)
"""The live console's flags (`run`; `sweep` takes all but --web-wait)."""

QUIET = Flag("quiet", bool, "No table on stdout.", default=False, decls=("--quiet", "-q"))

DISTRIBUTED = (
    Flag("processes", int, "Start N local worker processes (-1: one per CPU) and be their master.",
         default=0, panel=_DIST),
    Flag("master", bool, "Be the master of workers started with `loadgen worker`.", default=False,
         decls=("--master",), panel=_DIST),
    Flag("expect_workers", int, "--master: workers to wait for.", default=0, panel=_DIST),
    Flag("expect_workers_max_wait", float | None, "--master: seconds to wait for them (default: for ever).",
         panel=_DIST),
    Flag("master_bind_host", str | None, "Interface workers connect to (--master: all, --processes: "
         "127.0.0.1).", panel=_DIST),
    Flag("master_bind_port", int | None, "Port workers connect to (--master: 5557, --processes: a free one).",
         panel=_DIST),
    Flag("stop_on_worker_loss", bool, "Stop the run (exit 3) when a worker is lost, instead of handing its "
         "load to the others.", default=False, decls=("--stop-on-worker-loss",), panel=_DIST),
    Flag("cluster_key_env", str | None, "--master: environment variable holding the cluster key every worker "
         "must prove (the same on each `loadgen worker`; 16+ bytes, e.g. `openssl rand -hex 32`). Without a "
         "key any host that reaches the port can join. --processes workers get a random one.", panel=_DIST),
    Flag("cluster_key_file", Path | None, "--master: file holding the cluster key (instead of "
         "--cluster-key-env).", panel=_DIST),
)

SWEEP_PLAN = (
    Flag("rates", str | None, "Explicit open-loop rates, e.g. 100,200,400.", panel=_SWEEP),
    Flag("start", float | None, "First rate of a growing sweep (req/s).", panel=_SWEEP),
    Flag("max_rate", float | None, "Highest rate a growing sweep may try.", decls=("--max",), panel=_SWEEP),
    Flag("factor", float, "Growth factor between steps of a growing sweep.", default=1.5, panel=_SWEEP),
    Flag("increment", float | None, "Linear ladder: add this much a step (with --start/--max).",
         panel=_SWEEP),
    Flag("fixed", bool, "Run the whole geometric ladder; no stop, no bisection.", default=False,
         decls=("--fixed",), panel=_SWEEP),
    Flag("users", str | None, "Closed-loop user counts: a ladder, e.g. 1,2,4,8, or a range searched "
         "adaptively, e.g. 1..64 (grows by --factor, then bisects to the knee).", panel=_SWEEP),
    Flag("step_duration", str, "Measured length of each step, e.g. 10s.", default="10s", panel=_SWEEP),
    Flag("warmup", str, "Unmeasured start of each step (rounded up to whole intervals).", default="2s",
         panel=_SWEEP),
)

COMPARE = (
    Flag("models", str, "The variants to compare, comma-separated, e.g. digits_cnn,digits_cnn_int8 (each is "
         "--model of one run).", default=..., panel="Compare"),
    Flag("sweep", bool, "Sweep each variant to its saturation (the sweep's plan flags apply; none: it probes) "
         "instead of one run at --rate/--users.", default=False, decls=("--sweep",), panel="Compare"),
    Flag("reference", str | None, "A model whose answers the others are scored against (same argmax, cosine "
         "similarity), e.g. the fp32 one, when there are no labels: its answer to each --input-data entry is "
         "fetched first.", panel="Compare"),
    Flag("model_repository", Path | None, "A local copy of the server's model repository: each variant's size "
         "on disk is read from it.", panel="Compare"),
)

NOT_IN_COMPARE = {
    "--model": "compare takes --models, each variant one run (or sweep)",
    **{flag.flag: "the live console drives runs, not a comparison's runs" for flag in WEB},
    "--mix": "compare takes --models, each variant one run (or sweep) of one model",
}
"""`run` flags compare does not take, and why."""

NOT_IN_SWEEP = {
    "--rate": "a sweep's rates come from its plan: --rates, --start/--max, or none (it probes the target)",
    "--users": "a sweep's --users is a list or range of user counts, not one count",
    "--duration": "each step runs --warmup + --step-duration",
    "--quiet": "a sweep prints a line a step and its verdict, never a table",
    **{flag.flag: "a trace gives its own send instants: a sweep's steps set the rate" for flag in TRACE},
    "--web-wait": "a sweep starts at once: its plan is on the command line, not in the console's form",
}
"""`run` flags a sweep does not take, or takes with another meaning, and why."""


def protocol_flags() -> tuple[Flag, ...]:
    """Every protocol's own flags, one per name, each help prefixed with the protocols that take it."""
    owners: dict[str, list[str]] = {}
    flags: dict[str, Flag] = {}
    for name, spec in protocols().items():
        for flag in spec.flags:
            known = flags.setdefault(flag.name, flag)
            if known != flag:
                raise ValueError(f"protocols {owners[flag.name]} and {name} declare {flag.flag} differently")
            owners.setdefault(flag.name, []).append(name)
    return tuple(dataclasses.replace(flag, help=f"{', '.join(owners[flag.name])}: {flag.help}", panel=_PROTOCOL_PANEL)
                 for flag in flags.values())


def _with_protocol_help(flags: Sequence[Flag]) -> tuple[Flag, ...]:
    return tuple(dataclasses.replace(f, help=_protocol_help()) if f.name == "protocol" else f for f in flags)


def run_flags() -> tuple[Flag, ...]:
    return (*_with_protocol_help(TARGET), *protocol_flags(), *RUN_LOAD, *TRACE, *PATTERN, *OUTPUT, *WEB, QUIET,
            *DISTRIBUTED)


def sweep_flags() -> tuple[Flag, ...]:
    web = tuple(flag for flag in WEB if flag.name != "web_wait")
    return (*_with_protocol_help(TARGET), *protocol_flags(), *SWEEP_PLAN, *PATTERN, *OUTPUT, *web, *DISTRIBUTED)


def compare_flags() -> tuple[Flag, ...]:
    """run's flags but --model, the compare flags, and the sweep's plan flags for --sweep (its --users
    list is not taken: --users is run's, one count)."""
    target = tuple(flag for flag in _with_protocol_help(TARGET) if flag.name not in ("model", "mix"))
    plan = tuple(flag for flag in SWEEP_PLAN if flag.name != "users")
    return (*target, *COMPARE, *protocol_flags(), *RUN_LOAD, *TRACE, *PATTERN, *OUTPUT, QUIET, *plan,
            *DISTRIBUTED)


def scenario_overrides(flags: Sequence[Flag], values: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """The scenario values the given flags set (by the table: each Flag's key); a flag value that does
    not convert is an input error naming the flag (exit 2)."""
    given, problems = to_scenario_values(flags, values)
    if problems:
        raise ScenarioError(problems, "flags")
    return given


def _parameter(flag: Flag) -> inspect.Parameter:
    option = typer.Option(*flag.decls, help=flag.help, rich_help_panel=flag.panel, envvar=flag.envvar,
                          show_envvar=flag.envvar is not None)
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=flag.default,
                             annotation=Annotated[flag.type, option])


_SCENARIO_ARGUMENT = inspect.Parameter(
    "scenario", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
    annotation=Annotated[Path | None, typer.Argument(help="Scenario TOML file (optional).")])


def load_command(app: typer.Typer, flags: Sequence[Flag], **command: Any) -> Callable[[Callable], Callable]:
    """Register `func(scenario, values)` as a verb of `app` whose options are `flags` (each a typer option
    named and typed as the Flag says); `values` holds every flag's value by parameter name."""

    def decorate(func: Callable[[Path | None, dict[str, Any]], None]) -> Callable:
        def verb(**values: Any) -> None:
            func(values.pop("scenario"), values)

        parameters = [_SCENARIO_ARGUMENT, *(_parameter(flag) for flag in flags)]
        verb.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        verb.__annotations__ = {p.name: p.annotation for p in parameters}
        verb.__name__, verb.__doc__ = func.__name__, func.__doc__
        app.command(**command)(verb)
        return func

    return decorate
