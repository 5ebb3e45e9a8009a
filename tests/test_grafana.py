"""grafana/: the dashboards are well-formed Grafana dashboard models, and every PromQL expression in
every panel returns data from a real Prometheus scraping a real run, a real sweep and a real server,
and (the LLM dashboard) a real openai run of a two-model mix with goodput terms against the OpenAI mock,
which injects stream errors so that the errors panel has some.

Panels whose targets are instant queries (the sweep's per-step bar charts, curve and table) are asked
as Grafana asks them: one instant query at the end of the window, $__range standing for the window."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.ports import unused_port
from tests.support.processes import POLL, ROOT, loadgen_cmd, pin, start_server, stop_process
from tests.support.torchserve import MLP_JSON, ONE_MLP_WORKER, OPEN, start_torchserve

GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


PANEL_TYPES = {"timeseries", "barchart", "xychart", "table", "stat"}


def expressions() -> list[tuple[str, str, str, bool]]:
    """(dashboard, panel title, PromQL, whether it is an instant query) of every panel target."""
    return [(board.name, panel["title"], target["expr"], bool(target.get("instant")))
            for board in DASHBOARDS
            for panel in json.loads(board.read_text())["panels"]
            for target in panel["targets"]]


def test_dashboards_are_grafana_models() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    datasource_uid = provisioned["datasources"][0]["uid"]
    assert len(DASHBOARDS) >= 2
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids and board["title"] and board["schemaVersion"] >= 30
        uids.add(board["uid"])
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            assert panel["type"] in PANEL_TYPES and panel["datasource"]["uid"] == datasource_uid
            assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"])
    assert yaml.safe_load((GRAFANA / "provisioning/dashboards/loadgen.yml").read_text())["providers"]
    jobs = {job["job_name"] for job in yaml.safe_load((GRAFANA / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs == {"loadgen", "inference-server", "torchserve"}



def start_prometheus(tmp_path: Path, loadgen_ports: list[int], server_port: int,
                     torchserve_port: int) -> tuple[subprocess.Popen, str]:
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    targets = {"loadgen": loadgen_ports, "inference-server": [server_port], "torchserve": [torchserve_port]}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}" for port in targets[job["job_name"]]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = unused_port()
    proc = subprocess.Popen(
        [shutil.which("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if POLL.get(url + "/-/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"prometheus did not start: {proc.stderr.read()}")


def _wait_for_scrapes_after(prom_url: str, instant: float, jobs: tuple[str, ...], timeout: float = 15.0) -> None:
    """Until Prometheus has scraped every job in `jobs` once more, after `instant` (time.time() seconds):
    the servers' figures after the runs (a scrape every 1 s, grafana/prometheus.yml)."""
    query = f'min(timestamp(up{{job=~"{"|".join(jobs)}"}}))'
    deadline = time.monotonic() + timeout
    while True:
        result = POLL.get(prom_url + "/api/v1/query", params={"query": query}).json()["data"]["result"]
        if result and float(result[0]["value"][1]) > instant:
            return
        assert time.monotonic() < deadline, f"no scrape of {jobs} after the runs: {result}"
        time.sleep(0.1)


@pytest.mark.integration
def test_every_panel_has_data_from_a_real_prometheus(tmp_path: Path, model_store: Path) -> None:
    assert shutil.which("prometheus"), "Debian's prometheus package is required (.ci/run installs it)"
    server = start_server(["--metrics-port", str(unused_port())], module="servers.triton", port_flag="--http-port")
    metrics_port = int(server.proc.args[server.proc.args.index("--metrics-port") + 1])
    torchserve = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar",
                                  config=[*OPEN, ONE_MLP_WORKER, "metrics_mode=prometheus"], grpc=False)
    llm_server = start_server(["--ttft-ms", "5,40", "--itl-ms", "2", "--error-every", "10", "--no-keep-awake",
                               "--model", "mock-llm", "--model", "mock-small"], module="servers.openai_mock")
    loadgen_port, sweep_port, llm_port = unused_port(), unused_port(), unused_port()
    ts_metrics_port = int(torchserve.metrics.rsplit(":", 1)[1])
    prometheus, prom_url = start_prometheus(tmp_path, [loadgen_port, sweep_port, llm_port], metrics_port,
                                            ts_metrics_port)
    payload = tmp_path / "input.json"
    payload.write_text(MLP_JSON)
    try:
        started = time.time()
        run = subprocess.Popen(
            loadgen_cmd("run", "--target", server.url, "--model", "mlp", "--rate", "100", "--duration", "4s",
                        "--metrics-port", str(loadgen_port), "--out", str(tmp_path / "run"), "-q"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        pin(run.pid, 0)
        ts_run = subprocess.Popen(
            loadgen_cmd("run", "--protocol", "torchserve-http", "--target", torchserve.inference, "--model", "mlp",
                        "--payload", str(payload), "--rate", "50", "--duration", "4s", "--no-keep-awake",
                        "--out", str(tmp_path / "ts-run"), "-q"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        pin(ts_run.pid, 0)
        llm_run = subprocess.Popen(
            loadgen_cmd("run", "--protocol", "openai", "--target", llm_server.url, "--model", "mock-llm",
                        "--mix", "mock-llm=3,mock-small=1", "--max-tokens", "8", "--rate", "20", "--duration", "4s", "--goodput", "ttft<20ms,itl<30ms",
                        "--no-keep-awake", "--metrics-port", str(llm_port), "--out", str(tmp_path / "llm-run"), "-q"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        pin(llm_run.pid, 0)
        # Beside them, at the same time, a short sweep on its own port: the sweep dashboard's curve, table
        # and verdict. A lag of a few ms on a shared machine is no concern of this test (max_lag_ms).
        scenario = tmp_path / "sweep.toml"
        scenario.write_text(f'[target]\nurl = "{server.url}"\nmodel = "mlp"\n\n[open_loop]\nrate = 1\n'
                            'duration = "1s"\n\n[output]\nmax_lag_ms = 50\n')
        sweep = subprocess.Popen(
            loadgen_cmd("sweep", str(scenario), "--rates", "20,40", "--step-duration", "1s", "--warmup", "1s",
                        "--slo", "p99<5s", "--no-keep-awake", "--metrics-port", str(sweep_port),
                        "--out", str(tmp_path / "sweep")),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        pin(sweep.pid, 0)
        out, err = sweep.communicate(timeout=90)
        assert sweep.returncode == 0, out + err
        _out, err = llm_run.communicate(timeout=60)
        assert llm_run.returncode == 0, err
        _out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        _out, err = ts_run.communicate(timeout=60)
        assert ts_run.returncode == 0, err
        _wait_for_scrapes_after(prom_url, time.time(), ("inference-server", "torchserve"))
        missing = []
        end = time.time()
        window = f"{math.ceil(end - started)}s"
        for board, title, expr, instant in expressions():
            expr = expr.replace("$__range", window)
            params = {"query": expr, "time": end} if instant else {
                "query": expr, "start": started, "end": end, "step": "1s"}
            answer = POLL.get(prom_url + ("/api/v1/query" if instant else "/api/v1/query_range"),
                               params=params).json()
            assert answer["status"] == "success", (board, title, expr, answer)
            if not answer["data"]["result"]:
                missing.append(f"{board} / {title}: {expr}")
        assert not missing, "panels without data:\n" + "\n".join(missing)
    finally:
        prometheus.send_signal(signal.SIGTERM)
        try:
            prometheus.wait(15)
        except subprocess.TimeoutExpired:
            prometheus.kill()
        stop_process(server.proc)
        stop_process(llm_server.proc)
        torchserve.stop()


def test_prometheus_config_parses_with_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus package ships promtool (.ci/run installs it)"
    result = subprocess.run([promtool, "check", "config", str(GRAFANA / "prometheus.yml")],
                            capture_output=True, text=True, check=False, env={**os.environ})
    assert result.returncode == 0, result.stdout + result.stderr
