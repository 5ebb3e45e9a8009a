"""`loadgen run --protocol kserve-grpc` (loadgen/protocols/kserve_grpc.py) against the Triton-compatible
server's gRPC front end (integration): counts agree with the server's statistics, and the latency of a
model with a known service time is measured as that time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Server, run_loadgen, start_server, stop_process
from tests.support.timing import HostNoise
from tests.support.triton import write_paced_model

pytestmark = pytest.mark.integration

SERVICE_S = 0.005


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = tmp_path_factory.mktemp("repo")
    write_paced_model(repository, SERVICE_S, width=8, instances=4)
    write_paced_model(repository, 0.0, width=8, instances=4, name="instant")  # the same path, no service time
    started = start_server(["--grpc-port", "0", "--model-repository", str(repository), "--allow-python-backend"],
                           module="servers.triton", port_flag="--http-port")
    yield started
    stop_process(started.proc)


def _success_count(server: Server, model: str) -> int:
    stats = httpx.get(f"{server.url}/v2/models/{model}/stats", timeout=5).json()["model_stats"][0]
    return stats["inference_stats"]["success"]["count"]


def test_open_loop_over_grpc_measures_the_service_time(server: Server, host_noise: HostNoise,
                                                       tmp_path: Path) -> None:
    """`paced` and `instant` differ only by the 5 ms their model sleeps: run as one 50/50 mix, the
    difference of their measured p50s is that sleep, whatever the round trip costs on this host."""
    before = {model: _success_count(server, model) for model in ("paced", "instant")}
    run = run_loadgen("--protocol", "kserve-grpc", "--target", f"grpc://{server.fronts['grpc']}",
                      "--mix", "paced=1,instant=1", "--seed", "3", "--rate", "200", "--duration", "3s",
                      out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["errors"] == {} and summary["sent"] == 600 and summary["ok"] == summary["requests"]
    by_model = summary["by_model"]
    assert by_model["paced"]["sent"] + by_model["instant"]["sent"] == 600
    assert min(by_model["paced"]["sent"], by_model["instant"]["sent"]) > 200  # a 50/50 draw of 600
    # every request the run sent (and its warm-up requests) reached a model and was answered
    served = sum(_success_count(server, model) - before[model] for model in ("paced", "instant"))
    assert served == summary["sent"] + summary["warmup_requests"]
    # 5 ms of service and four instances at 100 req/s each: no queueing, so the paced model's latency is
    # the instant one's plus the sleep (time.sleep oversleeps by tens of microseconds)
    paced, instant = by_model["paced"]["latency_ms"], by_model["instant"]["latency_ms"]
    assert SERVICE_S * 1000 <= paced["p50"]
    host_noise.assert_near(paced["p50"] - instant["p50"], SERVICE_S * 1000 + 0.1, 0.4,
                           what="p50(paced) - p50(instant) (ms)", quantile="p95", cap_ms=1.0)
    host_noise.assert_below(paced["p99"], SERVICE_S * 1000 + 6.0, what="latency p99 (ms)")


def test_closed_loop_over_grpc_on_a_builtin_model(server: Server, tmp_path: Path) -> None:
    run = run_loadgen("--protocol", "kserve-grpc", "--target", f"grpc://{server.fronts['grpc']}", "--model", "paced",
                      "--users", "4", "--duration", "2s", out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    # four users, four instances, 5 ms each: close to 800 req/s at most
    assert 300 < run.summary["achieved_rps"] <= 800


def test_unknown_model_and_wrong_scheme_are_input_errors(server: Server, tmp_path: Path) -> None:
    grpc_url = f"grpc://{server.fronts['grpc']}"
    run = run_loadgen("--protocol", "kserve-grpc", "--target", grpc_url, "--model", "nope", "--rate", "10",
                      "--duration", "1s", out=tmp_path / "a")
    assert run.returncode == 2 and "not ready" in run.stderr
    run = run_loadgen("--protocol", "kserve-grpc", "--target", server.url, "--model", "paced", "--rate", "10",
                      "--duration", "1s", out=tmp_path / "b")
    assert run.returncode == 2 and "does not fit protocol 'kserve-grpc'" in run.stderr
    run = run_loadgen("--protocol", "kserve-grpc", "--target", "grpc://127.0.0.1:9", "--model", "paced",
                      "--rate", "10", "--duration", "1s", "--connect-timeout", "1s", out=tmp_path / "c")
    assert run.returncode == 2 and "cannot reach" in run.stderr


def test_streamed_requests_are_answered_and_counted(server: Server, tmp_path: Path) -> None:
    before = _success_count(server, "paced")
    run = run_loadgen("--protocol", "kserve-grpc", "--grpc-stream", "--target", f"grpc://{server.fronts['grpc']}",
                      "--model", "paced", "--users", "4", "--duration", "2s", out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["errors"] == {} and summary["ok"] > 300
    # every answer the server gave on the streams was measured (or was a warm-up)
    assert _success_count(server, "paced") - before == summary["ok"] + summary["warmup_requests"]
    assert SERVICE_S * 1000 <= summary["latency_ms"]["p50"] < SERVICE_S * 1000 + 3.0


def test_stream_flag_is_only_for_kserve_grpc(tmp_path: Path) -> None:
    run = run_loadgen("--grpc-stream", "--target", "http://127.0.0.1:9", "--model", "m", "--rate", "1",
                      "--duration", "1s", out=tmp_path / "run")
    assert run.returncode == 2 and "stream: only for protocol kserve-grpc" in run.stderr
