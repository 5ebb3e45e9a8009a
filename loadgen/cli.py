"""The `loadgen` command line (typer): run, sweep, demo, serve.

Exit codes: 0 ok, 1 SLO failed, 2 usage or input error (bad scenario, unreachable
target). Locust (and with it gevent's monkey-patching) is imported only by the verbs that send
load, never by `serve`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loadgen.errors import LoadgenError
from loadgen.scenario import ScenarioError

if TYPE_CHECKING:
    from loadgen.driver.distributed import DistributedOptions

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Load tester for deployed ML inference endpoints (KServe v2 / Triton).",
)
serve_app = typer.Typer(no_args_is_help=True, help="Start a reference server.")
app.add_typer(serve_app, name="serve")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(getattr(exc, "exit_code", 2))


_DIST = "Distributed (Locust master/worker)"
Processes = Annotated[int, typer.Option(
    "--processes", rich_help_panel=_DIST,
    help="Start N local worker processes (-1: one per CPU) and be their master.")]
Master = Annotated[bool, typer.Option(
    "--master", rich_help_panel=_DIST, help="Be the master of workers started with `loadgen worker`.")]
ExpectWorkers = Annotated[int, typer.Option(rich_help_panel=_DIST, help="--master: workers to wait for.")]
ExpectWorkersMaxWait = Annotated[float | None, typer.Option(
    rich_help_panel=_DIST, help="--master: seconds to wait for them (default: for ever).")]
MasterBindHost = Annotated[str | None, typer.Option(
    rich_help_panel=_DIST, help="Interface workers connect to (--master: all, --processes: 127.0.0.1).")]
MasterBindPort = Annotated[int | None, typer.Option(
    rich_help_panel=_DIST, help="Port workers connect to (--master: 5557, --processes: a free one).")]
MetricsHost = Annotated[str | None, typer.Option(
    help="Address /metrics listens on (default 127.0.0.1; 0.0.0.0 lets a Prometheus on another host scrape).")]
StopOnWorkerLoss = Annotated[bool, typer.Option(
    "--stop-on-worker-loss", rich_help_panel=_DIST,
    help="Stop the run (exit 3) when a worker is lost, instead of handing its load to the others.")]


def _distributed(processes: int, master: bool, expect_workers: int, max_wait: float | None,
                 bind_host: str | None, bind_port: int | None,
                 stop_on_worker_loss: bool) -> DistributedOptions | None:
    """The DistributedOptions the flags ask for, or None; bad flags are an input error (exit 2)."""
    from loadgen.driver.distributed import DistributedOptions

    try:
        return DistributedOptions.from_flags(
            processes=processes, master=master, expect_workers=expect_workers, bind_host=bind_host,
            bind_port=bind_port, max_wait_s=max_wait, stop_on_worker_loss=stop_on_worker_loss)
    except ValueError as exc:
        _fail(ScenarioError([str(exc)], "flags"))


@app.command(
    epilog="Examples:\n\n"
    "  loadgen run scenarios/poisson-kserve.toml --target http://127.0.0.1:8000 --model identity\n\n"
    "  loadgen run --rate 200 --arrival poisson --duration 30s --target URL --model NAME\n\n"
    "  loadgen run --users 16 --think-time 0 --duration 30s --target URL --model NAME\n\n"
    "  loadgen run --protocol openai --users 20 --max-tokens 16 --duration 30s --target URL --model NAME\n\n"
    "  loadgen run scenarios/poisson-kserve.toml --processes 4   (4 local Locust workers)\n\n"
    "  loadgen run scenarios/poisson-kserve.toml --master --expect-workers 8   (then on each load host:"
    " loadgen worker --master-host MASTER)"
)
def run(
    scenario: Annotated[Path | None, typer.Argument(help="Scenario TOML file (optional).")] = None,
    target: Annotated[str | None, typer.Option(help="Base URL, e.g. http://127.0.0.1:8000")] = None,
    model: Annotated[str | None, typer.Option(help="Model name on the target.")] = None,
    protocol: Annotated[str | None, typer.Option(
        help="kserve-http (default), kserve-grpc (--target grpc://host:port), torchserve-http, torchserve-grpc "
             "(with --payload), or openai (streaming).")] = None,
    payload: Annotated[Path | None, typer.Option(
        help="torchserve-*: file sent as each request's body (gRPC: its 'data' input), or a folder of "
             "such files that requests cycle through.")] = None,
    content_type: Annotated[str | None, typer.Option(
        help="torchserve-http: Content-Type of --payload (default by extension: JSON, image/*, audio/*, "
             "video/*, else application/octet-stream).")] = None,
    header: Annotated[list[str] | None, typer.Option(
        help='Extra header (gRPC: metadata) on every request, "Name: value"; repeatable.')] = None,
    bearer_token_env: Annotated[str | None, typer.Option(
        help="Environment variable holding a bearer token (sent as Authorization; never printed).")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA certificate (PEM) for https:// and grpcs:// targets.")] = None,
    shape: Annotated[list[str] | None, typer.Option(
        help="kserve-*: shape of an input with dynamic dims, NAME:1,224 ; repeatable.")] = None,
    input_data: Annotated[Path | None, typer.Option(
        help="kserve-*: perf_analyzer --input-data JSON (requests cycle; validation_data checks answers).")] = None,
    grpc_stream: Annotated[bool, typer.Option(
        "--grpc-stream", help="kserve-grpc: ModelStreamInfer streams (one per request in flight) "
                              "instead of unary ModelInfer.")] = False,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", "-b", help="kserve-*: rows per request for a batching model (as perf_analyzer's -b).")] = None,
    check_response: Annotated[bool, typer.Option(
        "--check-response", help="kserve-*: check each answer's output names, datatypes and shapes against "
                                 "the model's metadata (a wrong one is an invalid_response error).")] = False,
    tensor_format: Annotated[str | None, typer.Option(
        help="kserve-http: binary (the binary tensor extension, as tritonclient and perf_analyzer send), "
             "json, or auto (default: binary when the server lists binary_tensor_data).")] = None,
    endpoint: Annotated[str | None, typer.Option(help="openai: chat (default) or completions.")] = None,
    max_tokens: Annotated[
        str | None, typer.Option(help='openai: output tokens a request: 128, "uniform:8,32", "normal:128,16"')
    ] = None,
    input_tokens: Annotated[
        str | None, typer.Option(help="openai: words a synthetic prompt (~a token each), as --max-tokens.")
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help='openai: JSONL prompts, {"prompt": ...} or {"messages": [...]} a line')
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Open loop: requests per second.")] = None,
    arrival: Annotated[str | None, typer.Option(help="Open loop: constant or poisson.")] = None,
    users: Annotated[int | None, typer.Option(help="Closed loop: concurrent users.")] = None,
    think_time: Annotated[str | None, typer.Option(help="Closed loop: think time, e.g. 50ms.")] = None,
    think: Annotated[str | None, typer.Option(help="none, constant or exponential.")] = None,
    duration: Annotated[str | None, typer.Option(help="e.g. 30s, 2m.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the arrival process and data.")] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Open loop in-flight cap.")] = None,
    timeout: Annotated[str | None, typer.Option(help="Per-request timeout, e.g. 10s.")] = None,
    connect_timeout: Annotated[
        str | None, typer.Option(help="Connect and readiness-check timeout, e.g. 3s.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<time>-<model>).")] = None,
    keep_awake: Annotated[
        bool | None,
        typer.Option(
            "--keep-awake/--no-keep-awake",
            help="Keep the generator's CPUs out of deep idle with idle-priority spinners (default on).",
        ),
    ] = None,
    slo: Annotated[
        str | None, typer.Option(help='Objectives, e.g. "p99<150ms,errors<1%"; exit 1 when one is missed.')
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics on this port during the run (0: a free port, printed)."),
    ] = None,
    metrics_host: MetricsHost = None,
    server_metrics: Annotated[str | None, typer.Option(
        help="The target's Prometheus metrics URL (Triton: http://HOST:8002/metrics): the server's own "
             "queue/compute time, batch size, GPU use and energy for the run, in summary.json.")] = None,
    cost_per_hour: Annotated[float | None, typer.Option(
        help="Price of the server per hour ($), for $ per million inferences (needs --server-metrics).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table on stdout.")] = False,
    processes: Processes = 0,
    master: Master = False,
    expect_workers: ExpectWorkers = 0,
    expect_workers_max_wait: ExpectWorkersMaxWait = None,
    master_bind_host: MasterBindHost = None,
    master_bind_port: MasterBindPort = None,
    stop_on_worker_loss: StopOnWorkerLoss = False,
) -> None:
    """Send open-loop (--rate) or closed-loop (--users) load and write summary.json + latency.hlog.

    With --processes or --master the load is sent by Locust workers and merged here (exit 3 when
    --stop-on-worker-loss stopped the run)."""
    overrides = {
        "target.url": target,
        "target.model": model,
        "target.protocol": protocol,
        "target.timeout": timeout,
        "target.connect_timeout": connect_timeout,
        "target.endpoint": endpoint,
        "target.max_tokens": max_tokens,
        "target.input_tokens": input_tokens,
        "target.prompt_file": str(prompt_file) if prompt_file else None,
        "target.payload": str(payload) if payload else None,
        "target.content_type": content_type,
        **_target_extras(header, bearer_token_env, ca_file, shape, input_data),
        "target.stream": True if grpc_stream else None,
        "target.tensor_format": tensor_format,
        "target.batch_size": batch_size,
        "target.check_response": True if check_response else None,
        "open_loop.rate": rate,
        "open_loop.arrival": arrival,
        "open_loop.max_in_flight": max_in_flight,
        "closed_loop.users": users,
        "closed_loop.think_time": think_time,
        "closed_loop.think": think,
        "open_loop.duration": duration,
        "open_loop.seed": seed,
        "output.dir": str(out) if out else None,
        "output.keep_awake": keep_awake,
        "output.metrics_port": metrics_port,
        "output.metrics_host": metrics_host,
        "slo": slo,
    }
    if rate is not None and users is not None:
        _fail(ScenarioError(["--rate (open loop) and --users (closed loop) exclude each other"], "flags"))
    distributed = _distributed(processes, master, expect_workers, expect_workers_max_wait, master_bind_host,
                               master_bind_port, stop_on_worker_loss)
    from loadgen._runcmd import run_and_report  # imports locust: only for verbs that send load

    try:
        code = run_and_report(scenario, overrides, quiet=quiet, server_metrics=server_metrics,
                              cost_per_hour=cost_per_hour, distributed=distributed)
    except (LoadgenError, ScenarioError) as exc:
        _fail(exc)
    raise typer.Exit(code)


def _target_extras(header: list[str] | None, bearer_token_env: str | None, ca_file: Path | None,
                   shape: list[str] | None, input_data: Path | None) -> dict[str, Any]:
    """Overrides for the target's headers, token, CA, shapes and request data; bad flags exit 2."""
    problems, headers, shapes = [], {}, {}
    for item in header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            problems.append(f'--header {item!r}: expected "Name: value"')
        headers[name.strip()] = value.strip()
    for item in shape or []:
        name, sep, dims = item.rpartition(":")
        try:
            shapes[name] = [int(dim) for dim in dims.split(",")]
        except ValueError:
            sep = ""
        if not sep or not name:
            problems.append(f"--shape {item!r}: expected NAME:DIM,DIM,...")
    if problems:
        _fail(ScenarioError(problems, "flags"))
    return {"target.headers": headers or None, "target.bearer_token_env": bearer_token_env,
            "target.ca_file": str(ca_file) if ca_file else None, "target.shapes": shapes or None,
            "target.input_data": str(input_data) if input_data else None}


def _numbers(text: str | None, kind: type, flag: str) -> tuple:
    """"100,200,400" -> (100.0, 200.0, 400.0); a bad list is an input error (exit 2)."""
    if not text:
        return ()
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        _fail(ScenarioError([f"{flag}: expected comma-separated numbers, e.g. 100,200,400 (got {text!r})"],
                            "flags"))
    return ()


def _user_range(text: str | None) -> tuple[int, int] | None:
    """"1..64" -> (1, 64); None when `text` is no range; a bad range is an input error (exit 2)."""
    if not text or ".." not in text:
        return None
    low, _, high = text.partition("..")
    try:
        return int(low), int(high)
    except ValueError:
        _fail(ScenarioError([f"--users: expected a range of user counts such as 1..64 (got {text!r})"], "flags"))
    return None


@app.command(
    epilog="Examples:\n\n"
    "  loadgen sweep --target URL --model NAME --rates 100,200,400 --slo \"p99<150ms\" --out runs/sweep\n\n"
    "  loadgen sweep --target URL --model NAME --start 50 --max 2000 --factor 1.5 --out runs/sweep\n\n"
    "  loadgen sweep scenarios/closed-loop-kserve.toml --users 1,2,4,8 --step-duration 20s --out runs/sweep\n\n"
    "  loadgen sweep --target URL --model NAME --users 1..64 --factor 2 --out runs/sweep   (adaptive)\n\n"
    "  loadgen sweep --target URL --model NAME --start 50 --max 2000 --metrics-port 9646 --out runs/sweep"
)
def sweep(
    scenario: Annotated[Path | None, typer.Argument(help="Scenario TOML file (optional).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder: sweep.json, curve.csv, steps/.")] = ...,
    target: Annotated[str | None, typer.Option(help="Base URL, e.g. http://127.0.0.1:8000")] = None,
    model: Annotated[str | None, typer.Option(help="Model name on the target.")] = None,
    protocol: Annotated[str | None, typer.Option(
        help="kserve-http (default), kserve-grpc, torchserve-http, torchserve-grpc or openai.")] = None,
    payload: Annotated[Path | None, typer.Option(
        help="torchserve-*: file sent as each request's body, or a folder of files to cycle through.")] = None,
    slo: Annotated[str | None, typer.Option(help='Objectives each step is judged on, e.g. "p99<150ms,errors<1%".')] = None,
    rates: Annotated[str | None, typer.Option(help="Explicit open-loop rates, e.g. 100,200,400.")] = None,
    start: Annotated[float | None, typer.Option(help="First rate of a growing sweep (req/s).")] = None,
    max_rate: Annotated[float | None, typer.Option("--max", help="Highest rate a growing sweep may try.")] = None,
    factor: Annotated[float, typer.Option(help="Growth factor between steps of a growing sweep.")] = 1.5,
    increment: Annotated[float | None, typer.Option(help="Linear ladder: add this much a step (with --start/--max).")] = None,
    fixed: Annotated[bool, typer.Option("--fixed", help="Run the whole geometric ladder; no stop, no bisection.")] = False,
    users: Annotated[str | None, typer.Option(
        help="Closed-loop user counts: a ladder, e.g. 1,2,4,8, or a range searched adaptively, e.g. 1..64 "
             "(grows by --factor, then bisects to the knee).")] = None,
    step_duration: Annotated[str, typer.Option(help="Measured length of each step, e.g. 10s.")] = "10s",
    warmup: Annotated[str, typer.Option(help="Unmeasured start of each step (rounded up to whole intervals).")] = "2s",
    arrival: Annotated[str | None, typer.Option(help="Open loop: constant or poisson.")] = None,
    keep_awake: Annotated[bool | None, typer.Option("--keep-awake/--no-keep-awake", help="As for run.")] = None,
    server_metrics: Annotated[str | None, typer.Option(
        help="The target's Prometheus metrics URL (Triton: http://HOST:8002/metrics): queue and compute "
             "time, batch size, GPU use and energy per step.")] = None,
    cost_per_hour: Annotated[float | None, typer.Option(
        help="Price of the server per hour ($), for $ per million inferences (needs --server-metrics).")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus /metrics on this port for the whole sweep (0: a free port, printed): each "
             "step's live figures, the curve so far and the verdict.")] = None,
    metrics_host: MetricsHost = None,
    processes: Processes = 0,
    master: Master = False,
    expect_workers: ExpectWorkers = 0,
    expect_workers_max_wait: ExpectWorkersMaxWait = None,
    master_bind_host: MasterBindHost = None,
    master_bind_port: MasterBindPort = None,
    stop_on_worker_loss: StopOnWorkerLoss = False,
) -> None:
    """Find the saturation throughput: run the scenario at rising load, write the curve and the verdict.

    Exit 0 when some healthy step met the SLO (or there is none), 1 when none did, 2 on bad input.
    """
    from loadgen.scenario import parse_duration

    try:
        step_s, warmup_s = parse_duration(step_duration), parse_duration(warmup)
    except ValueError as exc:
        _fail(ScenarioError([f"--step-duration/--warmup: {exc}"], "flags"))
    overrides = {"target.url": target, "target.model": model, "target.protocol": protocol,
                 "target.payload": str(payload) if payload else None, "open_loop.arrival": arrival,
                 "output.keep_awake": keep_awake, "output.metrics_port": metrics_port,
                 "output.metrics_host": metrics_host, "slo": slo}
    distributed = _distributed(processes, master, expect_workers, expect_workers_max_wait, master_bind_host,
                               master_bind_port, stop_on_worker_loss)
    from loadgen._sweepcmd import SweepSpec, run_sweep  # imports locust: only for verbs that send load

    users_range = _user_range(users)
    spec = SweepSpec(
        rates=_numbers(rates, float, "--rates"), users=() if users_range else _numbers(users, int, "--users"),
        users_range=users_range, start=start, max=max_rate, factor=factor, increment=increment, fixed=fixed,
        step_duration_s=step_s, warmup_s=warmup_s, server_metrics=server_metrics, cost_per_hour=cost_per_hour,
    )
    try:
        code = run_sweep(scenario, overrides, spec, out, distributed=distributed)
    except (LoadgenError, ScenarioError) as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command(epilog="Example: loadgen worker --master-host 10.0.0.5 --master-port 5557")
def worker(
    master_host: Annotated[str, typer.Option(help="Host of the `loadgen run/sweep --master`.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="Its --master-bind-port.")] = 5557,
    debug_dir: Annotated[Path | None, typer.Option(
        help="Also append every interval shipped to the master to DIR/worker-<pid>.jsonl.")] = None,
    keep_awake: Annotated[bool, typer.Option(
        "--keep-awake/--no-keep-awake",
        help="Keep this host's CPUs awake during runs whose scenario asks for it (off when another "
             "process on the host already does: --processes workers leave it to their master).")] = True,
) -> None:
    """Be a Locust worker of a distributed run: send this host's share of each run the master starts
    (its histograms go to the master, which merges them), until the master quits (exit 0)."""
    from loadgen.driver.worker import serve  # imports locust: only for verbs that send load

    try:
        code = serve(master_host, master_port, debug_dir, keep_awake=keep_awake)
    except LoadgenError as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command()
def demo(
    duration: Annotated[str, typer.Option(help="Length of the demo run.")] = "10s",
    rate: Annotated[float, typer.Option(help="Open-loop rate of the demo.")] = 200.0,
    sweep_step: Annotated[str, typer.Option(help="Measured length of each step of the closing sweep.")] = "2s",
    sweep: Annotated[bool, typer.Option("--sweep/--no-sweep", help="End with a short closed-loop sweep.")] = True,
) -> None:
    """Start the Triton-compatible server with its built-in models, run a short open-loop test on the
    mlp model, then a short closed-loop sweep to its saturation throughput."""
    from loadgen._runcmd import run_demo

    try:
        code = run_demo(duration=duration, rate=rate, sweep_step=sweep_step if sweep else None)
    except (LoadgenError, ScenarioError) as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command(epilog="Example: loadgen report runs/sweep/  (then open runs/sweep/report.html)")
def report(
    folder: Annotated[Path, typer.Argument(help="A run folder (summary.json) or a sweep folder (sweep.json).")],
) -> None:
    """Write FOLDER/report.html (self-contained, with PNG plots also in FOLDER/plots/) for a finished,
    or interrupted, run or sweep: latency over time, the percentile spectrum and, for a sweep, the
    latency-vs-throughput curve, achieved vs offered load and the server-side figures."""
    from loadgen.report import ReportError, write_report

    try:
        path = write_report(folder)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(f"report: {path}")


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
_SERVE = (
    ("calibration", "servers.calibration.__main__",
     "Example: loadgen serve calibration --port 8000 --delay-ms 20 --stall-every 5 --stall-for 1",
     """KServe v2 endpoint with a declared true latency: --delay-ms, --stall-every/--stall-for,
    --service-ms with --workers (FIFO). Any model name is served. See --help of the server."""),
    ("triton", "servers.triton.__main__", "Example: loadgen serve triton --http-port 8000",
     """Triton-compatible KServe v2 server (HTTP, gRPC, metrics) hosting a Triton model repository
    (--model-repository DIR), or the built-in models identity, identity_bytes and mlp without one.
    See --help of the server."""),
    ("torchserve", "servers.torchserve.__main__",
     "Example: loadgen serve torchserve --model-store ./store --models mlp=mlp.mar --disable-token-auth",
     """TorchServe-compatible server (inference, management and metrics APIs, gRPC) serving .mar archives
    of a model store with their handlers, batching and workers as TorchServe's. See --help of the server."""),
    ("openai-mock", "servers.openai_mock.__main__", "Example: loadgen serve openai-mock --port 8000 --ttft-ms 30 --itl-ms 10",
     """OpenAI-compatible streaming server whose time to first token (--ttft-ms) and inter-token
    latency (--itl-ms) are exact: the ground truth for `loadgen run --protocol openai`. See --help
    of the server."""),
    ("make-repo", "servers.models.make_repo",
     "Example: loadgen serve make-repo ./models && loadgen serve triton --model-repository ./models",
     """Write a Triton model repository of the built-in models (TorchScript, ONNX, Python backend),
    made in code. See --help of the command."""),
)
"""`loadgen serve NAME ARGS`: each reference server's own command line (`main(argv, prog)` of MODULE)."""


def _add_serve_command(name: str, module: str, epilog: str, doc: str) -> None:
    def command(ctx: typer.Context) -> None:
        import importlib

        raise typer.Exit(importlib.import_module(module).main(list(ctx.args), prog=f"loadgen serve {name}"))

    command.__doc__ = doc
    serve_app.command(name, context_settings=_PASSTHROUGH, epilog=epilog)(command)


for _serve in _SERVE:
    _add_serve_command(*_serve)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
