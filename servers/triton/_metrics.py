"""The metrics front end of the Triton-compatible server: Prometheus text at GET /metrics (PROTOCOLS.md 4).

Values are read at scrape time from the ModelStats that HTTP and gRPC update (_stats.py): a collector
on a CollectorRegistry of this server's own (never prometheus_client's global one) yields Triton's
per-model families, labelled `model` and `version`; prometheus_client's ProcessCollector adds the
process's CPU seconds and memory. The host families are Triton's too: nv_cpu_utilization is the
machine's CPU use (/proc/stat) between two scrapes, where Triton's is between two polls of its
metrics thread; nv_cpu_memory_* come from /proc/meminfo. The GPU families (nv_gpu_*, labelled
`gpu_uuid`, and nv_energy_consumption) come from NVML through servers/core/gpu.py, read at scrape
time; on a machine without NVML or a GPU they are simply absent, as on a Triton built without GPU
metrics, and a reading a GPU does not support leaves out only that sample. Names follow Triton,
which prints counters without the `_total` suffix that prometheus_client's own renderer would add,
hence the small renderer below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from servers.core.gpu import GpuSample, GpuSampler
from servers.core.http1 import Request
from servers.triton._app import Reply, error_reply
from servers.triton._infer import ModelHost
from servers.triton._stats import ModelStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Reader = Callable[[ModelStats, dict[str, Any]], float]


def _duration_us(key: str) -> Reader:
    return lambda stats, snapshot: snapshot["inference_stats"][key]["ns"] // 1000


_MODEL_FAMILIES: tuple[tuple[str, str, str, Reader], ...] = (
    ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes",
     lambda stats, snapshot: snapshot["inference_stats"]["success"]["count"]),
    ("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)",
     lambda stats, snapshot: snapshot["inference_count"]),
    ("nv_inference_exec_count", "counter",
     "Number of model executions performed (does not include cached requests)",
     lambda stats, snapshot: snapshot["execution_count"]),
    ("nv_inference_pending_request_count", "gauge",
     "Instantaneous number of pending requests awaiting execution per-model.",
     lambda stats, snapshot: stats.pending),
    ("nv_inference_request_duration_us", "counter",
     "Cumulative inference request duration in microseconds (includes cached requests)",
     _duration_us("success")),
    ("nv_inference_queue_duration_us", "counter",
     "Cumulative inference queuing duration in microseconds (includes cached requests)",
     _duration_us("queue")),
    ("nv_inference_compute_input_duration_us", "counter",
     "Cumulative compute input duration in microseconds (does not include cached requests)",
     _duration_us("compute_input")),
    ("nv_inference_compute_infer_duration_us", "counter",
     "Cumulative compute inference duration in microseconds (does not include cached requests)",
     _duration_us("compute_infer")),
    ("nv_inference_compute_output_duration_us", "counter",
     "Cumulative inference compute output duration in microseconds (does not include cached requests)",
     _duration_us("compute_output")),
)
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


class ModelMetricsCollector:
    """Triton's per-model request families, computed from the shared ModelStats when scraped."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    def collect(self) -> Iterator[Metric]:
        current = [(stats, stats.snapshot()) for stats in self._host.all_stats()]
        for name, kind, documentation, read in _MODEL_FAMILIES:
            family = Metric(name, documentation, kind)
            for stats, snapshot in current:
                family.add_sample(name, {"model": stats.name, "version": stats.version}, read(stats, snapshot))
            yield family
        yield self._failures(current)

    @staticmethod
    def _failures(current: list[tuple[ModelStats, dict[str, Any]]]) -> Metric:
        name = "nv_inference_request_failure"
        family = Metric(name, "Number of failed inference requests, all batch sizes", "counter")
        for stats, _ in current:
            counts = stats.failures_by_reason()
            for reason in FAILURE_REASONS:
                labels = {"model": stats.name, "reason": reason, "version": stats.version}
                family.add_sample(name, labels, counts.get(reason, 0))
        return family


class HostMemoryCollector:
    """nv_cpu_memory_total_bytes / nv_cpu_memory_used_bytes from /proc/meminfo (used = total - available)."""

    def __init__(self, meminfo: Path = Path("/proc/meminfo")) -> None:
        self._meminfo = meminfo

    def collect(self) -> Iterator[Metric]:
        try:
            fields = dict(line.split(":", 1) for line in self._meminfo.read_text().splitlines() if ":" in line)
            total = int(fields["MemTotal"].split()[0]) * 1024
            available = int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return  # not Linux, or an odd kernel: the families are simply absent
        for name, documentation, value in (
                ("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", total),
                ("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", total - available)):
            family = Metric(name, documentation, "gauge")
            family.add_sample(name, {}, value)
            yield family


GpuReader = Callable[[GpuSample], float | None]

_GPU_FAMILIES: tuple[tuple[str, str, str, GpuReader], ...] = (
    ("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)",
     lambda sample: sample.utilization),
    ("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes",
     lambda sample: sample.memory_total_bytes),
    ("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes",
     lambda sample: sample.memory_used_bytes),
    ("nv_gpu_power_usage", "gauge", "GPU power usage in watts",
     lambda sample: sample.power_usage_watts),
    ("nv_gpu_power_limit", "gauge", "GPU power management limit in watts",
     lambda sample: sample.power_limit_watts),
    ("nv_energy_consumption", "counter", "GPU energy consumption in joules since the Triton Server started",
     lambda sample: sample.energy_joules),
)


class GpuMetricsCollector:
    """Triton's GPU families, one sample per GPU labelled `gpu_uuid`; a family no GPU could read is absent."""

    def __init__(self, sampler: GpuSampler) -> None:
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        samples = self._sampler.read()
        for name, kind, documentation, read in _GPU_FAMILIES:
            family = Metric(name, documentation, kind)
            for sample in samples:
                value = read(sample)
                if value is not None:
                    family.add_sample(name, {"gpu_uuid": sample.uuid}, value)
            if family.samples:
                yield family


class CpuUtilizationCollector:
    """nv_cpu_utilization: the share of the machine's CPU time, all cores, that was busy since the
    previous scrape (the first scrape: since this collector was made), from the `cpu` line of /proc/stat.

    As Triton: busy = user + nice + system + irq + softirq + steal, idle = idle + iowait (guest time
    is already inside user and nice). Two scrapes within one clock tick show the previous value.
    """

    def __init__(self, stat: Path = Path("/proc/stat")) -> None:
        self._stat = stat
        self._last = self._read()
        self._utilization = 0.0

    def _read(self) -> tuple[int, int] | None:
        """(busy, idle) clock ticks since boot, or None when /proc/stat cannot be read."""
        try:
            with self._stat.open() as lines:
                fields = lines.readline().split()
            if fields[0] != "cpu":
                return None
            user, nice, system, idle, iowait, irq, softirq, steal = (
                [int(value) for value in fields[1:9]] + [0] * 8)[:8]
        except (OSError, IndexError, ValueError):
            return None
        return user + nice + system + irq + softirq + steal, idle + iowait

    def collect(self) -> Iterator[Metric]:
        now = self._read()
        if now is None:
            return  # not Linux, or an odd kernel: the family is simply absent
        last = self._last or now
        busy, idle = max(now[0] - last[0], 0), max(now[1] - last[1], 0)  # a counter never runs back
        if busy + idle > 0 or self._last is None:
            self._utilization = busy / (busy + idle) if busy + idle else 0.0
            self._last = now
        family = Metric("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", "gauge")
        family.add_sample("nv_cpu_utilization", {}, self._utilization)
        yield family


class CpuEnergyCollector:
    """cpu_energy_consumption: the CPU packages' energy in joules since this collector was made, from
    the kernel's RAPL counters (/sys/class/powercap/intel-rapl:N/energy_uj, the package domains; AMD
    exposes its own the same way). Triton has no CPU energy family; this one mirrors its GPU
    nv_energy_consumption. A counter that wraps (at max_energy_range_uj) is followed across the wrap;
    where RAPL is absent or unreadable (most VMs, or without root) the family is absent."""

    NAME = "cpu_energy_consumption"

    def __init__(self, powercap: Path = Path("/sys/class/powercap")) -> None:
        self._domains = sorted(path for path in powercap.glob("intel-rapl:*") if path.name.count(":") == 1)
        self._last = {domain: self._read(domain) for domain in self._domains}
        self._joules = 0.0

    @staticmethod
    def _read(domain: Path) -> tuple[int, int] | None:
        try:
            energy = int((domain / "energy_uj").read_text())
            limit = int((domain / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            return None
        return energy, limit

    def collect(self) -> Iterator[Metric]:
        readable = False
        for domain in self._domains:
            now, last = self._read(domain), self._last.get(domain)
            if now is None or last is None:
                continue
            readable = True
            step = now[0] - last[0]
            self._joules += (step if step >= 0 else step + now[1]) / 1e6
            self._last[domain] = now
        if readable:
            family = Metric(self.NAME, "CPU package energy consumption in joules since the server started (RAPL)",
                            "counter")
            family.add_sample(self.NAME, {}, self._joules)
            yield family


def build_registry(host: ModelHost, gpu: GpuSampler | None = None) -> CollectorRegistry:
    """A fresh registry holding every family this server exports; `gpu` defaults to a new GpuSampler
    (NVML is initialised there, once, not at each scrape)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ModelMetricsCollector(host))
    registry.register(GpuMetricsCollector(gpu if gpu is not None else GpuSampler()))
    registry.register(CpuUtilizationCollector())
    registry.register(CpuEnergyCollector())
    registry.register(HostMemoryCollector())
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text format (0.0.4) with each family's own name on its HELP and TYPE lines."""
    lines: list[str] = []
    for family in registry.collect():
        shown = family.name
        if family.type == "counter" and family.samples and family.samples[0].name == f"{shown}_total":
            shown = family.samples[0].name  # prometheus_client's own counters (process_cpu_seconds_total)
        documentation = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines += (f"# HELP {shown} {documentation}", f"# TYPE {shown} {family.type}")
        for sample in family.samples:
            labels = ",".join(f'{key}="{_escape(value)}"' for key, value in sample.labels.items())
            lines.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}" if labels
                         else f"{sample.name} {floatToGoString(sample.value)}")
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class MetricsApp:
    """The routes of the metrics port: GET /metrics, else 404 or 405 like the HTTP front end."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def handle(self, request: Request) -> Reply:
        if request.path != "/metrics":
            return error_reply(404, "Not Found")
        if request.method != "GET":
            return error_reply(405, "Method Not Allowed")
        return Reply(200, render(self._registry), CONTENT_TYPE)
