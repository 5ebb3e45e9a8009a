"""servers/triton/_metrics.py: Triton's metric families, unit (own registry) and over the metrics port."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from prometheus_client.parser import text_string_to_metric_families

from servers.models.builtin import builtin_models
from servers.triton._infer import ModelHost
from servers.triton._metrics import build_registry, render
from tests.conftest import stop_process
from tests.test_triton_grpc import start_fronts


def test_families_read_the_shared_stats_at_scrape_time() -> None:
    host = ModelHost(builtin_models())
    registry = build_registry(host)
    labels = {"model": "mlp", "version": "1"}
    assert registry.get_sample_value("nv_inference_count", labels) == 0
    host.stats["mlp"].record_success(4, 1_000, 2_000, 3_000, 4_000)
    host.stats["mlp"].record_failure(5_000, "BACKEND")
    assert registry.get_sample_value("nv_inference_count", labels) == 4
    assert registry.get_sample_value("nv_inference_exec_count", labels) == 1
    assert registry.get_sample_value("nv_inference_request_success", labels) == 1
    assert registry.get_sample_value("nv_inference_request_duration_us", labels) == 10
    assert registry.get_sample_value("nv_inference_compute_infer_duration_us", labels) == 3
    assert registry.get_sample_value("nv_inference_request_failure", {**labels, "reason": "BACKEND"}) == 1
    assert registry.get_sample_value("nv_inference_request_failure", {**labels, "reason": "OTHER"}) == 0
    assert registry.get_sample_value("nv_inference_pending_request_count", labels) == 0


def test_render_keeps_tritons_counter_names() -> None:
    text = render(build_registry(ModelHost(builtin_models()))).decode()
    assert "# TYPE nv_inference_request_success counter\n" in text
    assert 'nv_inference_count{model="identity",version="1"} 0' in text
    assert "nv_inference_request_success_total" not in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["process_cpu_seconds"].type == "counter"
    assert families["nv_cpu_memory_total_bytes"].samples[0].value > 0


@pytest.fixture(scope="module")
def fronts():
    started = start_fronts("--metrics-port", "0")
    yield started
    stop_process(started.proc)


def test_metrics_port_counts_requests_from_both_front_ends(fronts) -> None:
    assert [line.split()[0] for line in fronts.lines[-3:]] == ["grpc", "metrics", "listening"]
    metrics_url = fronts.lines[-2].split()[-1]
    client = tritonclient_http.InferenceServerClient(fronts.http_url)
    try:
        data = np.zeros((3, 16), np.float32)
        tensor = tritonclient_http.InferInput("INPUT0", [3, 16], "FP32")
        tensor.set_data_from_numpy(data)
        client.infer("mlp", [tensor])
        bad = tritonclient_http.InferInput("INPUT0", [1, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
        with pytest.raises(Exception, match="unexpected shape"):
            client.infer("mlp", [bad])
    finally:
        client.close()
    reply = httpx.get(metrics_url + "/metrics", timeout=5)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    assert "\nnv_inference_count{" in reply.text  # Triton's name, no _total (the parser below adds one)
    samples = {(family.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(reply.text) for sample in family.samples}
    mlp = (("model", "mlp"), ("version", "1"))
    assert samples[("nv_inference_count", mlp)] == 3
    assert samples[("nv_inference_request_success", mlp)] == 1
    failure = ("nv_inference_request_failure", (("model", "mlp"), ("reason", "OTHER"), ("version", "1")))
    assert samples[failure] == 1
    assert samples[("nv_inference_compute_infer_duration_us", mlp)] > 0
    assert ("process_resident_memory_bytes", ()) in samples
    assert httpx.get(metrics_url + "/nope", timeout=5).status_code == 404
