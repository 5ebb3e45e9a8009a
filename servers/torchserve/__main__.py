"""Command line of the TorchServe-compatible server; its flags mirror torchserve's.

    python -m servers.torchserve --model-store ./store --models mlp=mlp.mar
    python -m servers.torchserve --model-store ./store --models all --ts-config config.properties
    python -m servers.torchserve --model-store ./store --models mlp.mar --disable-token-auth \\
        --enable-model-api --inference-port 0 --management-port 0 --metrics-port 0 \\
        --grpc-inference-port 0 --grpc-management-port 0

torchserve's own flags: --model-store, --models (name=archive, archive, or all), --ts-config,
--disable-token-auth, --enable-model-api; --start, --foreground and --ncs are accepted and change
nothing (this server always runs in the foreground and keeps no config snapshots). Added here: a port
flag per API that overrides config.properties (0 picks a free port, for tests), --no-grpc,
--key-file (where the token keys are written; torchserve writes key_file.json in its working folder),
--max-workers-per-model (a cap on min_worker, which torchserve does not bound), and
--max-request-size/--max-response-size (config.properties' max_request_size and max_response_size).

Start-up: the settings are read (every problem reported, exit code 2), the models named by --models
(or load_models) are registered and their workers loaded (one that fails is reported on stderr; the
others serve), then every API listens and one line is printed for each, flushed, the inference API
last: `metrics listening on http://H:P`, `management listening on http://H:P`, `grpc-inference
listening on H:P`, `grpc-management listening on H:P`, then `listening on http://H:P`. SIGTERM or
SIGINT stops the server with exit code 0, its worker processes (_workers.py) with it.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.util
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from servers.core.connection import add_max_connections_flag, max_connections_problems
from servers.core.gpu import GpuSampler
from servers.torchserve._auth import TokenAuth
from servers.torchserve._config import Address, Settings, load_settings, read_properties, workers_beyond_limit
from servers.torchserve._http import Api, FrontEnd, close_server, listen
from servers.torchserve._inference import InferenceApi
from servers.torchserve._management import ManagementApi
from servers.torchserve._metrics import MetricsApi, MetricsStore
from servers.torchserve._models import ModelManager, RegisterRequest
from servers.torchserve._wire import TsError

Announce = Callable[[str, str, int], None]
"""Called as (API, host, bound port) once an API listens: "metrics", "management", "grpc-inference",
"grpc-management", and "inference" last."""

_ARCHIVE_SUFFIXES = (".mar", ".tar.gz", ".tgz")


def serve(settings: Settings, models: Sequence[str], announce: Announce, *, grpc: bool = True) -> None:
    """Load `models`, serve every API until SIGTERM/SIGINT (signals are caught in the main thread only).

    Example:
        serve(settings, ["mlp=mlp.mar"], lambda api, host, port: print(api, host, port))
    """
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings, list(models), announce, grpc))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(settings: Settings, models: list[str], announce: Announce, grpc: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    metrics = MetricsStore(settings.hostname, GpuSampler())
    manager = ModelManager(settings, metrics, _gpu_count(settings))
    try:
        await _load_startup_models(manager, models)
        auth = TokenAuth(settings.token_auth, settings.key_file, settings.token_expiration_min)
        if auth.enabled:
            print(f"token authorization is on: keys are in {settings.key_file}", file=sys.stderr, flush=True)
        async with AsyncExitStack() as started:
            if settings.enable_metrics_api:
                await _listen(started, "metrics", MetricsApi(metrics, settings.metrics_mode),
                              settings.metrics, settings, announce)
            await _listen(started, "management", ManagementApi(manager, auth, settings.model_api),
                          settings.management, settings, announce, metrics.count_response)
            if grpc:
                from servers.torchserve._grpc import start_grpc  # grpc stubs load only when served

                for api, address in (("grpc-inference", settings.grpc_inference),
                                     ("grpc-management", settings.grpc_management)):
                    server, port = await start_grpc(api, manager, auth, address.host, address.port)
                    started.push_async_callback(server.stop, None)
                    announce(api, address.host, port)
            await _listen(started, "inference", InferenceApi(manager, auth),
                          settings.inference, settings, announce, metrics.count_response)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        manager.close()


async def _listen(started: AsyncExitStack, api: str, routes: Api, address: Address, settings: Settings,
                  announce: Announce, count: Callable[[int], None] | None = None) -> None:
    front = FrontEnd(routes, settings.max_request_size, count or (lambda status: None), settings.max_connections)
    server = await listen(front, address.host, address.port)
    started.push_async_callback(close_server, server, front)
    announce(api, address.host, server.sockets[0].getsockname()[1])


async def _load_startup_models(manager: ModelManager, models: list[str]) -> None:
    """Register each model of --models / load_models and wait for its workers; failures are reported."""
    for spec in _expand(models, manager.settings.model_store):
        name, _, url = spec.rpartition("=")
        try:
            status, message = await manager.register(RegisterRequest(url, name or None), startup=True)
        except TsError as exc:
            print(f"error: cannot load model {spec}: {exc.message}", file=sys.stderr, flush=True)
            continue
        if status >= 400:
            print(f"error: model {spec}: {message}", file=sys.stderr, flush=True)


def _expand(models: list[str], store: Path | None) -> list[str]:
    """`all` = every archive (or archive folder) in the model store, as torchserve's --models all."""
    expanded: list[str] = []
    for spec in models:
        if spec != "all":
            expanded.append(spec)
        elif store is not None and store.is_dir():
            expanded.extend(sorted(path.name for path in store.iterdir()
                                   if path.name.endswith(_ARCHIVE_SUFFIXES) or (path / "MAR-INF").is_dir()))
    return expanded


def _gpu_count(settings: Settings) -> int:
    """number_of_gpu, else the CUDA devices torch sees (0 without torch or with a build of it that has
    no GPU support, known without importing it: the front end itself never needs torch, whose import
    costs a second and a half of CPU at every start; the workers import it)."""
    if settings.number_of_gpu is not None:
        return settings.number_of_gpu
    if not _torch_may_see_a_gpu():
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _torch_may_see_a_gpu() -> bool:
    """False when torch is not installed, or is a build for neither CUDA nor ROCm (see
    _built_without_gpu); True otherwise."""
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return False
    return spec.origin is None or not _built_without_gpu(Path(spec.origin).with_name("version.py"))


def _built_without_gpu(version_file: Path) -> bool:
    """Whether torch's version.py, written when its wheel was built, sets both `cuda` and `hip` to None:
    a build whose torch.cuda.is_available() is False whatever the machine has. False when the file
    cannot be read as such."""
    try:
        tree = ast.parse(version_file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return False
    values: dict[str, object] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
            values[target.id] = node.value.value
    return "cuda" in values and "hip" in values and values["cuda"] is None and values["hip"] is None


def build_parser(prog: str = "python -m servers.torchserve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="TorchServe-compatible server: inference, management and metrics APIs over HTTP and "
                    "gRPC, serving .mar archives made by torch-model-archiver with their handlers.",
        epilog="example: python -m servers.torchserve --model-store ./store --models mlp=mlp.mar "
               "--disable-token-auth",
    )
    add = parser.add_argument
    add("--model-store", default=None, metavar="DIR", help="folder of model archives (overrides model_store)")
    add("--models", nargs="+", default=None, metavar="MODEL",
        help="models to load at start: NAME=ARCHIVE, ARCHIVE, or all (overrides load_models)")
    add("--ts-config", default=None, metavar="FILE", help="TorchServe config.properties")
    add("--disable-token-auth", action="store_true",
        help="no token authorization (disable_token_authorization)")
    add("--enable-model-api", action="store_true", help="allow register and unregister (enable_model_api)")
    for api, default in (("inference", 8080), ("management", 8081), ("metrics", 8082),
                         ("grpc-inference", 7070), ("grpc-management", 7071)):
        add(f"--{api}-port", type=int, default=None, metavar="PORT",
            help=f"{api} API port, overriding config.properties (default {default}; 0 picks a free port)")
    add("--no-grpc", action="store_true", help="do not serve the gRPC APIs")
    add_max_connections_flag(parser, " per API port", "ServiceUnavailableException, with the reason")
    add("--max-workers-per-model", type=int, default=None, metavar="N",
        help="the most workers one model version may have (default 4 per CPU core, at least 32: each "
             "worker is a process with its own copy of the model, and beyond a few per core they add "
             "memory, not throughput); a register, scale or model-config asking for more is refused "
             "with 400 and starts nothing")
    add("--max-request-size", type=int, default=None, metavar="BYTES",
        help="the largest request body (HTTP: 413, connection closed) and gRPC request message "
             "(RESOURCE_EXHAUSTED) served, overriding config.properties max_request_size (default 6553500)")
    add("--max-response-size", type=int, default=None, metavar="BYTES",
        help="the largest answer a handler may give; a larger one ends its worker (500 \"Worker died.\", "
             "and the worker is started again), overriding config.properties max_response_size "
             "(default 6553500)")
    add("--key-file", default="key_file.json", metavar="PATH",
        help="where token authorization writes its keys (default ./key_file.json, as torchserve)")
    for flag in ("--start", "--foreground", "--ncs"):
        add(flag, action="store_true", help=argparse.SUPPRESS)
    return parser


def _settings(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    problems: list[str] = []
    properties: dict[str, str] = {}
    if args.ts_config is not None:
        try:
            properties = read_properties(Path(args.ts_config).read_text())
        except OSError as exc:
            problems.append(f"--ts-config {args.ts_config}: {exc.strerror}")
    settings, found = load_settings(properties)
    problems.extend(found)
    if args.model_store is not None:
        settings.model_store = Path(args.model_store)
    if settings.model_store is not None and not settings.model_store.is_dir():
        problems.append(f"model store {settings.model_store}: not a folder")
    if args.models is not None:
        settings.load_models = list(args.models)
    if args.disable_token_auth:
        settings.token_auth = False
    if args.enable_model_api:
        settings.model_api = True
    settings.key_file = Path(args.key_file)
    if args.max_connections is not None:
        problems += max_connections_problems(args.max_connections)
        settings.max_connections = args.max_connections
    _worker_limit(args, settings, problems)
    for flag in ("max_request_size", "max_response_size"):
        size = getattr(args, flag)
        if size is None:
            continue
        if size < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1 byte, got {size}")
            continue
        setattr(settings, flag, size)
    for api in ("inference", "management", "metrics", "grpc_inference", "grpc_management"):
        port = getattr(args, f"{api}_port")
        if port is None:
            continue
        if not 0 <= port <= 65535:
            problems.append(f"--{api.replace('_', '-')}-port must be in 0..65535, got {port}")
            continue
        current = getattr(settings, api)
        setattr(settings, api, Address(current.host, port))
    return settings, problems


def _worker_limit(args: argparse.Namespace, settings: Settings, problems: list[str]) -> None:
    """--max-workers-per-model (at least 1), and default_workers_per_model within it."""
    if args.max_workers_per_model is not None:
        if args.max_workers_per_model < 1:
            problems.append(f"--max-workers-per-model must be at least 1, got {args.max_workers_per_model}")
            return
        settings.max_workers_per_model = args.max_workers_per_model
    if settings.default_workers_per_model > settings.max_workers_per_model:
        problems.append(workers_beyond_limit("default_workers_per_model", settings.default_workers_per_model,
                                             settings.max_workers_per_model))


def main(argv: Sequence[str] | None = None, prog: str = "python -m servers.torchserve") -> int:
    """Parse flags, serve until stopped; returns the exit code (2 for bad flags, 1 if it cannot listen)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    settings, problems = _settings(args)
    if problems:
        parser.print_usage(sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        serve(settings, settings.load_models, _print_listening, grpc=not args.no_grpc)
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_listening(api: str, host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    if api == "inference":
        print(f"listening on http://{shown}:{port}", flush=True)
    elif api.startswith("grpc"):
        print(f"{api} listening on {shown}:{port}", flush=True)
    else:
        print(f"{api} listening on http://{shown}:{port}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
