"""The `loadgen` command line (typer): run, sweep, demo, serve.

Exit codes: 0 ok, 1 SLO failed, 2 usage or input error (bad scenario, unreachable
target). Locust (and with it gevent's monkey-patching) is imported only by the verbs that send
load, never by `serve`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loadgen.errors import LoadgenError, ScenarioError, redact_url
from loadgen.flags import Flag
from loadgen.options import (
    WEB_AUTH_ENV,
    compare_flags,
    load_command,
    run_flags,
    scenario_overrides,
    sweep_flags,
)

if TYPE_CHECKING:
    from loadgen._sweepcmd import SweepSpec
    from loadgen.driver.console import WebOptions
    from loadgen.driver.distributed import DistributedOptions

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Load tester for deployed ML inference endpoints (KServe v2 / Triton).",
)
serve_app = typer.Typer(no_args_is_help=True, help="Start a reference server.")
app.add_typer(serve_app, name="serve")


def _fail(exc: LoadgenError) -> None:
    typer.echo(f"error: {redact_url(str(exc))}", err=True)
    raise typer.Exit(exc.exit_code)


def _distributed(values: dict[str, Any]) -> DistributedOptions | None:
    """The DistributedOptions the flags ask for, or None; bad flags are an input error (exit 2)."""
    from loadgen.driver.distributed import DistributedOptions
    from loadgen.driver.trust import load_cluster_key

    try:
        return DistributedOptions.from_flags(
            processes=values["processes"], master=values["master"], expect_workers=values["expect_workers"],
            bind_host=values["master_bind_host"], bind_port=values["master_bind_port"],
            max_wait_s=values["expect_workers_max_wait"], stop_on_worker_loss=values["stop_on_worker_loss"],
            cluster_key=load_cluster_key(values["cluster_key_env"], values["cluster_key_file"]))
    except ValueError as exc:
        _fail(ScenarioError([str(exc)], "flags"))


def _overrides(flags: tuple[Flag, ...], values: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    try:
        return scenario_overrides(flags, values)
    except ScenarioError as exc:
        _fail(exc)
    return {}


_RUN_FLAGS = run_flags()


@load_command(app, _RUN_FLAGS, epilog="Examples:\n\n"
    "  loadgen run scenarios/poisson-kserve.toml --target http://127.0.0.1:8000 --model identity\n\n"
    "  loadgen run --rate 200 --arrival poisson --duration 30s --target URL --model NAME\n\n"
    "  loadgen run --users 16 --think-time 0 --duration 30s --target URL --model NAME\n\n"
    "  loadgen run --protocol openai --users 20 --max-tokens 16 --duration 30s --target URL --model NAME\n\n"
    "  loadgen run scenarios/poisson-kserve.toml --processes 4   (4 local Locust workers)\n\n"
    "  loadgen run scenarios/poisson-kserve.toml --master --expect-workers 8   (then on each load host:"
    " loadgen worker --master-host MASTER)")
def run(scenario: Path | None, values: dict[str, Any]) -> None:
    """Send open-loop (--rate) or closed-loop (--users) load and write summary.json + latency.hlog.

    With --processes or --master the load is sent by Locust workers and merged here (exit 3 when
    --stop-on-worker-loss stopped the run)."""
    if values["rate"] is not None and values["users"] is not None:
        _fail(ScenarioError(["--rate (open loop) and --users (closed loop) exclude each other"], "flags"))
    overrides = _overrides(_RUN_FLAGS, values)
    distributed = _distributed(values)
    web = _web(values)
    from loadgen._runcmd import run_and_report  # imports locust: only for verbs that send load

    try:
        code = run_and_report(scenario, overrides, quiet=values["quiet"], server_metrics=values["server_metrics"],
                              cost_per_hour=values["cost_per_hour"], distributed=distributed,
                              web=_web_options(web))
    except LoadgenError as exc:
        _fail(exc)
    raise typer.Exit(code)


def _web(values: dict[str, Any], *, sweep: bool = False) -> dict[str, Any] | None:
    """The live console's WebOptions as keywords (--web-port, --web-host, --web-auth, --web-autoquit, and
    run's --web-wait), or None; a bad one is an input error (exit 2). (The WebOptions are made once locust
    is imported, by _web_options: loadgen/driver/console.py imports gevent and flask, which locust patches
    first.)"""
    port, host, autoquit = values["web_port"], values["web_host"], values["web_autoquit"]
    wait, auth = values.get("web_wait", False), values["web_auth"]
    tls = {"--web-tls-cert": values["web_tls_cert"], "--web-tls-key": values["web_tls_key"]}
    if port is None:
        # --web-auth may come from LOADGEN_WEB_AUTH, set for the runs that have a console: only the flag counts.
        auth_flag = auth is not None and auth != os.environ.get(WEB_AUTH_ENV)
        given = [flag for flag, value in tls.items() if value is not None]
        if autoquit is not None or wait or auth_flag or given:
            flag = "--web-autoquit" if autoquit is not None else "--web-wait" if wait else \
                given[0] if given else "--web-auth"
            _fail(ScenarioError([f"{flag} is for the live console: give --web-port too"], "flags"))
        return None
    problems = _tls_problems(tls)
    if not 0 <= port <= 65535:
        problems.append(f"--web-port: expected a port from 0 to 65535 (0: a free one), got {port}")
    if not host.strip():
        problems.append("--web-host: expected an address, e.g. 127.0.0.1 or 0.0.0.0")
    if autoquit is not None and not (math.isfinite(autoquit) and autoquit >= 0):
        problems.append(f"--web-autoquit: expected seconds >= 0, got {autoquit:g}")
    if (values["processes"] or values["master"]) and sweep:
        problems.append("--web-port: a sweep's live console drives single-process sweeps for now, not "
                        "--processes or --master")
    if problems:
        _fail(ScenarioError(problems, "flags"))
    return {"port": port, "host": host.strip(), "autoquit_s": autoquit, "wait": wait, "auth": auth,
            "tls_cert": tls["--web-tls-cert"], "tls_key": tls["--web-tls-key"]}


def _tls_problems(tls: dict[str, str | None]) -> list[str]:
    """What is wrong with --web-tls-cert and --web-tls-key: both or neither, each a readable file."""
    (cert_flag, cert), (key_flag, key) = tls.items()
    if (cert is None) != (key is None):
        missing, given = (key_flag, cert_flag) if key is None else (cert_flag, key_flag)
        return [f"{missing}: give it with {given} (the console's certificate and its key: both or neither)"]
    problems = []
    for flag, value in tls.items():
        if value is not None and not Path(value).is_file():
            problems.append(f"{flag}: no such file: {value}")
    return problems


def _web_options(web: dict[str, Any] | None) -> WebOptions | None:
    """The WebOptions of _web's keywords (call it once locust is imported); a --web-auth that is not
    USER:PASSWORD is an input error (exit 2) that does not repeat it."""
    if web is None:
        return None
    from loadgen.driver.console import WebOptions  # gevent and flask, after locust has patched the process
    from loadgen.driver.webauth import WebAuth

    try:
        auth = WebAuth.parse(web["auth"]) if web["auth"] is not None else None
    except ValueError as exc:
        _fail(ScenarioError([f"--web-auth: {exc}"], "flags"))
    if web["tls_cert"] is not None:
        import ssl  # the module gevent has patched (a context made here works as the console's)

        try:
            # An encrypted key gets an empty password (it fails here) instead of a prompt on the terminal.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(web["tls_cert"], web["tls_key"], password=b"")
        except (ssl.SSLError, OSError) as exc:
            problem = (f"--web-tls-cert/--web-tls-key: {web['tls_cert']} and {web['tls_key']} are not a PEM "
                       f"certificate and its private key ({exc})")
            _fail(ScenarioError([problem], "flags"))
    return WebOptions(**{**web, "auth": auth})


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


_SWEEP_FLAGS = sweep_flags()


@load_command(app, _SWEEP_FLAGS, epilog="Examples:\n\n"
    "  loadgen sweep --target URL --model NAME --slo \"p99<150ms\"   (no plan: probes, then searches)\n\n"
    "  loadgen sweep --target URL --model NAME --rates 100,200,400 --slo \"p99<150ms\" --out runs/sweep\n\n"
    "  loadgen sweep --target URL --model NAME --start 50 --max 2000 --factor 1.5 --out runs/sweep\n\n"
    "  loadgen sweep scenarios/closed-loop-kserve.toml --users 1,2,4,8 --step-duration 20s --out runs/sweep\n\n"
    "  loadgen sweep --target URL --model NAME --users 1..64 --factor 2 --out runs/sweep   (adaptive)\n\n"
    "  loadgen sweep --target URL --model NAME --start 50 --max 2000 --metrics-port 9646 --out runs/sweep\n\n"
    "  loadgen sweep --target URL --model NAME --rates 100,200,400 --web-port 8089   (watch it at "
    "http://127.0.0.1:8089/loadgen)")
def sweep(scenario: Path | None, values: dict[str, Any]) -> None:
    """Find the saturation throughput: run the scenario at rising load, write the curve and the verdict.

    With no plan (--rates, --start/--max or --users) a short closed-loop probe measures the service time
    and a first capacity estimate, and an adaptive open-loop search starts from there.
    With --web-port the live console shows each step and the curve growing, then the verdict.
    Exit 0 when some healthy step met the SLO (or there is none), 1 when none did, 2 on bad input.
    """
    spec = _sweep_spec(values, values["users"])
    overrides = _overrides(_SWEEP_FLAGS, values)
    distributed = _distributed(values)
    web = _web(values, sweep=True)
    from loadgen._sweepcmd import run_sweep  # imports locust: only for verbs that send load

    try:
        code = run_sweep(scenario, overrides, spec, distributed=distributed, web=_web_options(web))
    except LoadgenError as exc:
        _fail(exc)
    raise typer.Exit(code)


def _sweep_spec(values: dict[str, Any], users: str | None) -> SweepSpec:
    """The sweep's plan and step flags (`users`: the --users list or range, None for compare) as a
    SweepSpec; bad values are an input error (exit 2)."""
    from loadgen._sweepcmd import SweepSpec  # imports locust: only for verbs that send load
    from loadgen.units import parse_duration

    try:
        step_s, warmup_s = parse_duration(values["step_duration"]), parse_duration(values["warmup"])
    except ValueError as exc:
        _fail(ScenarioError([f"--step-duration/--warmup: {exc}"], "flags"))
    users_range = _user_range(users)
    return SweepSpec(
        rates=_numbers(values["rates"], float, "--rates"),
        users=() if users_range else _numbers(users, int, "--users"),
        users_range=users_range, start=values["start"], max=values["max_rate"], factor=values["factor"],
        increment=values["increment"], fixed=values["fixed"], step_duration_s=step_s, warmup_s=warmup_s,
        server_metrics=values["server_metrics"], cost_per_hour=values["cost_per_hour"],
    )


_COMPARE_FLAGS = compare_flags()


@load_command(app, _COMPARE_FLAGS, epilog="Examples:\n\n"
    "  loadgen compare --target http://127.0.0.1:8000 --models digits_cnn,digits_cnn_int8,digits_student "
    "--input-data models/_data/digits_test.json --labels models/_data/digits_test_labels.json "
    "--rate 200 --duration 20s --out runs/compare\n\n"
    "  loadgen compare --target URL --models a,b --input-data d.json --labels l.json --sweep --step-duration 5s")
def compare(scenario: Path | None, values: dict[str, Any]) -> None:
    """Compare model variants under the same load: accuracy (every answer scored against --labels),
    latency, throughput (saturation with --sweep), size, energy and $ per million inferences.

    Writes DIR/compare.json, DIR/compare.csv and one run (or sweep) folder per variant; prints the table
    with the Pareto-optimal variants marked. Exit 1 when --slo is met by no variant, 2 when no variant
    could be run."""
    problems = []
    if values["rate"] is not None and values["users"] is not None:
        problems.append("--rate (open loop) and --users (closed loop) exclude each other")
    if values["sweep"] and (values["rate"] is not None or values["users"] is not None or values["duration"]):
        problems.append("--sweep plans each variant's load itself: --rate, --users and --duration do not apply")
    if problems:
        _fail(ScenarioError(problems, "flags"))
    overrides = _overrides(_COMPARE_FLAGS, values)
    distributed = _distributed(values)
    from loadgen._comparecmd import CompareSpec, run_compare  # imports locust: only for verbs that send load

    sweep_spec = _sweep_spec(values, None) if values["sweep"] else None
    spec = CompareSpec(models=tuple(m.strip() for m in values["models"].split(",")), sweep=sweep_spec,
                       reference=values["reference"],
                       server_metrics=values["server_metrics"], cost_per_hour=values["cost_per_hour"],
                       model_repository=str(values["model_repository"]) if values["model_repository"] else None)
    try:
        code = run_compare(scenario, overrides, spec, distributed=distributed, quiet=values["quiet"])
    except LoadgenError as exc:
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
    cluster_key_env: Annotated[str | None, typer.Option(
        help="Environment variable holding the cluster key to prove to the master (its --cluster-key-env's "
             "key); a worker with a key takes runs only from a master that proves it too.")] = None,
    cluster_key_file: Annotated[Path | None, typer.Option(help="File holding the cluster key.")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="The folder the files a scenario names are read from (relative paths from it; paths outside it, "
             "symlinks included, are refused). Without it (or --shared-filesystem), a scenario that names a "
             "file is refused.")] = None,
    shared_filesystem: Annotated[bool, typer.Option(
        "--shared-filesystem",
        help="This host sees the master's files at the same paths: take the scenario's paths as they are "
             "(--processes workers do).")] = False,
) -> None:
    """Be a Locust worker of a distributed run: send this host's share of each run the master starts
    (its histograms go to the master, which merges them), until the master quits (exit 0; refused by the
    master, or a master that does not prove the cluster key: exit 2)."""
    from loadgen.lowlevel.children import end_with_parent_from_env

    end_with_parent_from_env()  # a --processes worker ends with its master
    from loadgen.driver.trust import load_cluster_key
    from loadgen.driver.worker import serve  # imports locust: only for verbs that send load

    try:
        if data_dir is not None and shared_filesystem:
            raise ValueError("--data-dir and --shared-filesystem exclude each other")
        if data_dir is not None and not data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir}: no such folder")
        key = load_cluster_key(cluster_key_env, cluster_key_file)
    except ValueError as exc:
        _fail(ScenarioError([str(exc)], "flags"))
    try:
        code = serve(master_host, master_port, debug_dir, keep_awake=keep_awake, key=key, data_dir=data_dir,
                     shared_filesystem=shared_filesystem)
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
    from loadgen._democmd import run_demo

    try:
        code = run_demo(duration=duration, rate=rate, sweep_step=sweep_step if sweep else None)
    except LoadgenError as exc:
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
    ("llm-sim", "servers.llm_sim.__main__",
     ("Example: loadgen serve llm-sim --port 8000 --max-batch 32 --prefill-ms-per-token 0.1 --decode-ms 12 "
      "--decode-ms-per-seq 0.2 --kv-tokens 65536"),
     """OpenAI-compatible server simulating a continuous-batching LLM engine (FIFO queue, --max-batch,
    --kv-tokens budget, step time --decode-ms + --decode-ms-per-seq per sequence + --prefill-ms-per-token
    per admitted prompt token): TTFT, ITL and saturation follow exactly from the flags; GET /sim/log gives
    each request's instants. See --help of the server."""),
    ("make-repo", "servers.models.make_repo",
     "Example: loadgen serve make-repo ./models && loadgen serve triton --model-repository ./models",
     """Write a Triton model repository of the built-in models (TorchScript, ONNX, Python backend),
    made in code; the server runs its Python backend models only with --allow-python-backend. See --help
    of the command."""),
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
