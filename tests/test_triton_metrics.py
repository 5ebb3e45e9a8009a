"""servers/triton/_metrics.py: Triton's metric families, unit (own registry) and over the metrics port.

The GPU families are checked against the machine the tests run on, never against a stand-in for NVML:
where nvidia-smi lists no GPU they must be absent (and the scrape fast); where it lists GPUs, each
family must carry one sample per GPU, labelled with the UUIDs nvidia-smi prints, with values that
agree with nvidia-smi's own readings.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from prometheus_client.parser import text_string_to_metric_families

from servers.core.gpu import GpuSampler, visible_devices
from servers.models.builtin import builtin_models
from servers.triton._infer import ModelHost
from servers.triton._metrics import CpuUtilizationCollector, build_registry, render
from tests.support.processes import stop_process
from tests.support.triton import start_fronts

GPU_FAMILIES = ("nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
                "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption")


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


def _scrape(registry) -> dict[str, list]:
    """Render and parse back with prometheus_client's text parser: family name -> samples."""
    text = render(registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _nvidia_smi(*fields: str) -> list[list[str]]:
    """One row per GPU that nvidia-smi lists ([] where there is no nvidia-smi, hence no driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:  # a driver without devices says so on stderr
        return []
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def _write_stat(path: Path, user: int, nice: int, system: int, idle: int, iowait: int, irq: int,
                softirq: int, steal: int) -> None:
    path.write_text(f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 7 3\n"
                    f"cpu0 {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 7 3\nintr 1 2\n")


def test_cpu_utilization_is_the_busy_share_of_ticks_between_scrapes(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _write_stat(stat, user=100, nice=0, system=50, idle=800, iowait=50, irq=0, softirq=0, steal=0)
    collector = CpuUtilizationCollector(stat)

    def scrape() -> float | None:
        families = list(collector.collect())
        return families[0].samples[0].value if families else None

    _write_stat(stat, user=160, nice=0, system=70, idle=880, iowait=60, irq=5, softirq=5, steal=0)
    assert scrape() == 0.5  # busy +90 (user, system, irq, softirq), idle +90 (idle, iowait)
    assert scrape() == 0.5  # no tick since: the previous value, not 0/0
    _write_stat(stat, user=170, nice=10, system=70, idle=885, iowait=65, irq=5, softirq=5, steal=10)
    assert scrape() == 0.75  # busy +30 (user, nice, steal), idle +10
    stat.write_text("intr 1 2\n")
    assert scrape() is None  # no aggregate cpu line: the family is absent, not an error
    stat.unlink()
    assert scrape() is None


def test_cpu_utilization_sees_a_busy_core() -> None:
    registry = build_registry(ModelHost(builtin_models()))
    _scrape(registry)
    stop = time.monotonic() + 0.5
    while time.monotonic() < stop:  # one core fully busy for half a second
        pass
    busy = _scrape(registry)["nv_cpu_utilization"][0].value
    assert 0.5 / os.cpu_count() <= busy <= 1.0


def test_scrape_has_sane_host_families() -> None:
    families = _scrape(build_registry(ModelHost(builtin_models())))
    assert 0.0 <= families["nv_cpu_utilization"][0].value <= 1.0
    total = families["nv_cpu_memory_total_bytes"][0].value
    assert 0 < families["nv_cpu_memory_used_bytes"][0].value <= total


def test_gpu_families_follow_the_machine() -> None:
    listed = _nvidia_smi("uuid", "memory.total", "power.limit", "mig.mode.current")  # all, in NVML's order
    gpus = [listed[index] for index in visible_devices([row[0] for row in listed],
                                                        os.environ.get("CUDA_VISIBLE_DEVICES"))]
    sampler = GpuSampler()
    registry = build_registry(ModelHost(builtin_models()), sampler)
    if not gpus:
        assert not sampler.available and sampler.unavailable_reason
        families = _scrape(registry)
        assert not [name for name in families if name.startswith(("nv_gpu_", "nv_energy_"))]
        return
    assert sampler.available, sampler.unavailable_reason
    time.sleep(1.0)  # let the energy counter move past its starting point
    families = _scrape(registry)
    uuids = {row[0] for row in gpus}
    mig = any(row[3] == "Enabled" for row in gpus)
    for name in GPU_FAMILIES:
        if name == "nv_gpu_utilization" and mig:
            continue  # NVML does not report utilisation for a MIG-enabled GPU: the family may be absent
        assert {sample.labels["gpu_uuid"] for sample in families[name]} == uuids, name
    by_uuid = {name: {sample.labels["gpu_uuid"]: sample.value for sample in families[name]}
               for name in GPU_FAMILIES if name in families}
    for uuid, total_mib, limit_w, _ in gpus:
        total = by_uuid["nv_gpu_memory_total_bytes"][uuid]
        assert total / 2**20 == pytest.approx(float(total_mib), abs=1)
        assert 0 < by_uuid["nv_gpu_memory_used_bytes"][uuid] <= total
        assert by_uuid["nv_gpu_power_limit"][uuid] == pytest.approx(float(limit_w), abs=1)
        assert 0 < by_uuid["nv_gpu_power_usage"][uuid] <= 2 * by_uuid["nv_gpu_power_limit"][uuid]
        assert by_uuid["nv_energy_consumption"][uuid] > 0
        if uuid in by_uuid.get("nv_gpu_utilization", {}):
            assert 0.0 <= by_uuid["nv_gpu_utilization"][uuid] <= 1.0
    before = by_uuid["nv_energy_consumption"]
    time.sleep(0.5)
    after = {sample.labels["gpu_uuid"]: sample.value for sample in _scrape(registry)["nv_energy_consumption"]}
    assert all(after[uuid] >= before[uuid] for uuid in uuids)  # a counter


UUIDS = ["GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "GPU-8932aaaa-0000-0000-0000-000000000001",
         "GPU-1c0ffee0-0000-0000-0000-000000000002", "GPU-77777777-0000-0000-0000-000000000003"]


@pytest.mark.parametrize(("setting", "chosen"), [
    (None, [0, 1, 2, 3]),  # unset: every GPU
    ("", []),  # set and empty: none
    ("2", [2]),
    ("3,0", [3, 0]),  # in the order named
    (" 1 , 2 ", [1, 2]),
    ("1,1,2", [1, 2]),  # named twice, sampled once
    ("0,4,1", [0]),  # an index out of range ends the list
    ("-1", []),
    ("2,-1,0", [2]),
    ("GPU-1c0ffee0-0000-0000-0000-000000000002", [2]),
    ("GPU-1c0f,GPU-7777", [2, 3]),  # a prefix that fits one GPU names it
    ("GPU-8932,1", []),  # a prefix that fits two names none, and ends the list
    ("GPU-8932f,GPU-0000", [0]),  # an unknown UUID ends the list
    ("1,GPU-77777777-0000-0000-0000-000000000003", [1, 3]),
    ("MIG-GPU-1c0ffee0-0000-0000-0000-000000000002/1/0", [2]),  # a MIG device of GPU 2
    ("MIG-4b1d38e2-0000-5a3c-9c6e-0b53d2fd77aa,0", [0]),  # a MIG UUID: no GPU listed here; passed over
    ("0,,1", [0]),  # an empty entry ends the list
    ("nvidia0", []),
])
def test_cuda_visible_devices_selects_the_gpus_sampled(setting: str | None, chosen: list[int]) -> None:
    assert visible_devices(UUIDS, setting) == chosen


def test_a_gpu_nvml_cannot_open_is_named_by_index_only() -> None:
    uuids = ["GPU-aaaa", "", "GPU-cccc"]  # NVML lists three; the second could not be opened
    assert visible_devices(uuids, "1,2") == [1, 2]  # the sampler then leaves out the unopened one
    assert visible_devices(uuids, "GPU-cccc") == [2]
    assert visible_devices([], "0") == [] and visible_devices([], None) == []


def test_metrics_port_answers_fast_with_every_family(fronts) -> None:
    metrics_url = fronts.lines[-2].split()[-1]
    with httpx.Client(timeout=5) as client:
        timings, reply = [], None
        for _ in range(5):
            start = time.perf_counter()
            reply = client.get(metrics_url + "/metrics")
            timings.append(time.perf_counter() - start)
    assert reply.status_code == 200
    assert statistics.median(timings) < 0.1, timings  # NVML (or its absence) is never waited on per scrape
    names = {family.name for family in text_string_to_metric_families(reply.text)}
    assert {"nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes"} <= names
    assert ("nv_gpu_utilization" in names or "nv_gpu_memory_total_bytes" in names) == bool(
        _nvidia_smi("uuid"))


def test_cpu_energy_follows_rapl_counters_across_a_wrap(tmp_path) -> None:
    """cpu_energy_consumption sums the package domains' energy_uj steps (not their subdomains), follows a
    counter past max_energy_range_uj, and is absent where no RAPL domain can be read."""
    from servers.triton._metrics import CpuEnergyCollector

    def write(domain: str, energy: int, limit: int = 1_000_000) -> None:
        folder = tmp_path / domain
        folder.mkdir(exist_ok=True)
        (folder / "energy_uj").write_text(f"{energy}\n")
        (folder / "max_energy_range_uj").write_text(f"{limit}\n")

    write("intel-rapl:0", 900_000)
    write("intel-rapl:1", 100)
    write("intel-rapl:0:0", 5)  # a core subdomain: inside package 0's count already
    collector = CpuEnergyCollector(tmp_path)
    write("intel-rapl:0", 100_000)  # wrapped: +200,000 uJ
    write("intel-rapl:1", 500_100)  # +500,000 uJ
    write("intel-rapl:0:0", 999_999)
    (family,) = list(collector.collect())
    assert family.name == "cpu_energy_consumption" and family.samples[0].value == pytest.approx(0.7)
    assert list(CpuEnergyCollector(tmp_path / "absent").collect()) == []
