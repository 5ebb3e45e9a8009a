"""Server-side figures (loadgen/serverside.py): the arithmetic on two scrapes, and a sweep that scrapes
the reference Triton-compatible server's real metrics page around each step."""

from __future__ import annotations

import csv
import json

import pytest

from loadgen.serverside import parse_sample, server_figures
from tests.support.processes import run_loadgen, start_server, stop_process

_PAGE = """\
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="mlp",version="1"}} {requests}
nv_inference_request_success{{model="other",version="1"}} 999
# TYPE nv_inference_count counter
nv_inference_count{{model="mlp",version="1"}} {inferences}
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{{model="mlp",version="1"}} {executions}
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="mlp",version="1"}} {queue}
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{{model="mlp",version="1"}} {compute}
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{{model="mlp",version="1"}} {compute}
# TYPE nv_inference_compute_output_duration_us counter
nv_inference_compute_output_duration_us{{model="mlp",version="1"}} {compute}
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{{gpu_uuid="GPU-a"}} 0.5
nv_gpu_utilization{{gpu_uuid="GPU-b"}} 0.7
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{{gpu_uuid="GPU-a"}} 300
nv_gpu_power_usage{{gpu_uuid="GPU-b"}} 200
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{{gpu_uuid="GPU-a"}} 1e9
nv_gpu_memory_used_bytes{{gpu_uuid="GPU-b"}} 2e9
# TYPE nv_energy_consumption counter
nv_energy_consumption{{gpu_uuid="GPU-a"}} {energy}
nv_energy_consumption{{gpu_uuid="GPU-b"}} {energy}
"""


def _page(requests: int, inferences: int, executions: int, queue: int, compute: int, energy: float) -> str:
    return _PAGE.format(requests=requests, inferences=inferences, executions=executions, queue=queue,
                        compute=compute, energy=energy)


def test_figures_are_differences_per_request_and_per_inference() -> None:
    before = parse_sample(_page(100, 400, 50, 10_000, 1_000, 1000.0), "mlp", t=10.0)
    after = parse_sample(_page(1100, 8400, 1050, 2_010_000, 301_000, 3000.0), "mlp", t=20.0)
    figures = server_figures(before, after, cost_per_hour=3.6)
    assert figures["requests"] == 1000 and figures["inferences"] == 8000 and figures["executions"] == 1000
    assert figures["mean_batch_size"] == 8.0
    assert figures["inferences_per_s"] == 800.0
    assert figures["queue_ms_per_request"] == 2.0  # 2,000,000 us over 1000 requests
    assert figures["compute_ms_per_request"] == 0.9  # three stages of 300,000 us
    assert figures["gpus"] == 2 and figures["gpu_utilization"] == 0.6  # mean of the two GPUs
    assert figures["gpu_power_w"] == 500.0 and figures["gpu_memory_used_bytes"] == 3e9
    assert figures["energy_j"] == 4000.0 and figures["mean_power_w"] == 400.0
    assert figures["energy_j_per_inference"] == 0.5
    # $3.6 an hour at 800 inferences/s = 2,880,000 an hour: $1.25 per million
    assert figures["usd_per_million_inferences"] == 1.25


def test_no_gpu_and_no_scrape_are_absent_not_zero() -> None:
    cpu_only = "# TYPE nv_inference_count counter\nnv_inference_count{model=\"m\",version=\"1\"} 5\n"
    figures = server_figures(parse_sample(cpu_only, "m", 0.0), parse_sample(cpu_only, "m", 1.0))
    assert "gpus" not in figures and "gpu_utilization" not in figures and "energy_j_per_inference" not in figures
    assert server_figures(None, parse_sample(cpu_only, "m", 1.0)) is None


@pytest.mark.integration
def test_cpu_energy_stands_in_where_no_gpu_counts_energy() -> None:
    page = ('nv_inference_count{{model="m",version="1"}} {n}\n'
            "# TYPE cpu_energy_consumption counter\ncpu_energy_consumption {j}\n")
    before = parse_sample(page.format(n=0, j=10.0), "m", 0.0)
    after = parse_sample(page.format(n=200, j=30.0), "m", 2.0)
    figures = server_figures(before, after)
    assert figures["energy_j"] == 20.0 and figures["mean_power_w"] == 10.0
    assert figures["energy_j_per_inference"] == 0.1 and figures["energy_source"] == "cpu packages (RAPL)"


def test_sweep_attaches_the_servers_own_figures_to_each_step(tmp_path) -> None:
    server = start_server(["--metrics-port", "0"], module="servers.triton", port_flag="--http-port")
    try:
        metrics_url = server.fronts["metrics"] + "/metrics"
        run = run_loadgen("--target", server.url, "--model", "mlp", "--users", "1,4", "--step-duration", "1s",
                          "--warmup", "1s", "--server-metrics", metrics_url, "--cost-per-hour", "2.5",
                          out=tmp_path / "sweep", verb="sweep")
    finally:
        stop_process(server.proc)
    assert run.returncode == 0, run.stderr
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["server_metrics"] == metrics_url and sweep["cost_per_hour"] == 2.5
    for step in sweep["steps"]:
        server_side = step["server"]
        step_summary = json.loads((tmp_path / "sweep" / step["dir"] / "summary.json").read_text())
        assert step_summary["server"] == server_side
        # the server counted every request of the step: the measured ones and the warm-up's
        assert server_side["requests"] >= step_summary["ok"] > 0
        assert server_side["failures"] == 0
        assert server_side["mean_batch_size"] == 1.0  # the built-in mlp runs each request alone
        # the server's rate is its own count over its own window (warm-up included: 11,723/s there against
        # the measured part's 6,677/s once on a busy host), so it is checked against its count, not the step's
        assert server_side["seconds"] > 2.0  # the 1 s warm-up and the 1 s step
        assert server_side["inferences_per_s"] == pytest.approx(server_side["inferences"] / server_side["seconds"],
                                                                rel=1e-3)
        assert server_side["inferences"] == server_side["requests"]  # batch 1
        per_hour = server_side["inferences_per_s"] * 3600
        assert server_side["usd_per_million_inferences"] == pytest.approx(2.5 / per_hour * 1e6, rel=1e-3)
        assert server_side["compute_ms_per_request"] > 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "curve.csv").open()))
    assert all(float(row["server_batch_size"]) == 1.0 and float(row["usd_per_million_inferences"]) > 0
               for row in rows)
    assert "server: batch 1.0" in run.stdout



@pytest.mark.integration
def test_run_counts_what_the_server_counted(tmp_path) -> None:
    server = start_server(["--metrics-port", "0"], module="servers.triton", port_flag="--http-port")
    try:
        run = run_loadgen("--target", server.url, "--model", "mlp", "--rate", "200", "--duration", "2s",
                          "--server-metrics", server.fronts["metrics"] + "/metrics", out=tmp_path / "run")
    finally:
        stop_process(server.proc)
    assert run.returncode == 0, run.stderr
    summary = run.summary
    # every infer request the server answered between the two scrapes: the warm-up's and the run's
    assert summary["server"]["requests"] == summary["ok"] + summary["warmup_requests"]
    assert summary["server"]["inferences"] == summary["server"]["requests"]
    assert summary["server"]["failures"] == 0


def test_bad_server_flags_are_input_errors(tmp_path) -> None:
    run = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "1", "--duration", "1s",
                      "--cost-per-hour", "2", out=tmp_path / "run")
    assert run.returncode == 2 and "--cost-per-hour must be > 0 and needs --server-metrics" in run.stderr
