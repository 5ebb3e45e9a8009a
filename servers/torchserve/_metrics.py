"""Metrics of the TorchServe-compatible server: the counters the front ends and workers keep, the
`context.metrics` handlers write to, and the Metrics API page (GET /metrics, PROTOCOLS.md 5.5).

The families and labels are those of TorchServe's default metrics.yaml, printed as its Java Prometheus
client prints them (HELP "Torchserve prometheus <type> metric with unit: <Unit>", a comma after the
last label, Java's Double.toString for values, families in the order the recorded server used):

- frontend, per model: ts_inference_requests_total (every request that reached a known model),
  ts_inference_latency_microseconds (arrival to answer) and ts_queue_latency_microseconds (arrival to
  the start of its batch), cumulative, labelled model_name, model_version ("default" when the request
  named none) and hostname;
- host: Requests2XX/4XX/5XX (every HTTP answer of the inference and management APIs), QueueTime and
  WorkerThreadTime (the latest batch, ms), WorkerLoadTime per worker, and the system gauges (CPU,
  memory and disk through psutil, read at scrape time where TorchServe reads them once a minute; GPU
  through NVML, servers/core/gpu.py, labelled DeviceId, absent on a machine without one);
- backend, per model: HandlerTime and PredictionTime (ms, the latest batch) and whatever else a
  handler records through context.metrics (add_time, add_counter, add_size, add_percent, add_metric),
  labelled ModelName and Level="Model" (handler dimensions beyond those are not kept).

metrics_mode decides what the page shows, as TorchServe: `log` (the default) an empty page (its
metrics go to log files), `prometheus` everything, `legacy` the three ts_* families only.
`?name[]=a&name[]=b` keeps only the families named.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from servers.core.gpu import GpuSampler
from servers.torchserve._openapi import describe_api
from servers.torchserve._wire import NOT_FOUND, Reply, error_reply, json_reply

__all__ = ["CONTENT_TYPE", "HandlerMetrics", "MetricsApi", "MetricsStore", "java_double"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_FAMILY_ORDER = (
    "MemoryAvailable", "GPUMemoryUtilization", "HandlerTime", "Requests5XX", "DiskUtilization", "DiskUsage",
    "WorkerLoadTime", "PredictionTime", "ts_inference_requests_total", "MemoryUtilization", "Requests2XX",
    "MemoryUsed", "GPUUtilization", "Requests4XX", "CPUUtilization", "ts_inference_latency_microseconds",
    "QueueTime", "DiskAvailable", "GPUMemoryUsed", "WorkerThreadTime", "ts_queue_latency_microseconds",
)
_FAMILIES = {
    "Requests2XX": ("counter", "Count"), "Requests4XX": ("counter", "Count"),
    "Requests5XX": ("counter", "Count"),
    "ts_inference_requests_total": ("counter", "Count"),
    "ts_inference_latency_microseconds": ("counter", "Microseconds"),
    "ts_queue_latency_microseconds": ("counter", "Microseconds"),
    "QueueTime": ("gauge", "Milliseconds"), "WorkerThreadTime": ("gauge", "Milliseconds"),
    "WorkerLoadTime": ("gauge", "Milliseconds"), "CPUUtilization": ("gauge", "Percent"),
    "MemoryUsed": ("gauge", "Megabytes"), "MemoryAvailable": ("gauge", "Megabytes"),
    "MemoryUtilization": ("gauge", "Percent"), "DiskUsage": ("gauge", "Gigabytes"),
    "DiskUtilization": ("gauge", "Percent"), "DiskAvailable": ("gauge", "Gigabytes"),
    "GPUMemoryUtilization": ("gauge", "Percent"), "GPUMemoryUsed": ("gauge", "Megabytes"),
    "GPUUtilization": ("gauge", "Percent"), "HandlerTime": ("gauge", "ms"), "PredictionTime": ("gauge", "ms"),
}
_LEGACY = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
           "ts_queue_latency_microseconds")

Labels = tuple[tuple[str, str], ...]


def java_double(value: float) -> str:
    """A double as Java's Double.toString writes it (what TorchServe's Prometheus client prints):
    positional from 1e-3 to 1e7, else `1.2345678E7`; both with the shortest digits that round-trip."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0 or 1e-3 <= abs(value) < 1e7:
        return repr(value)
    mantissa, exponent = np.format_float_scientific(value, unique=True).split("e")
    if mantissa.endswith("."):
        mantissa += "0"
    return f"{mantissa}E{int(exponent)}"


@dataclass
class _Family:
    kind: str
    unit: str
    samples: dict[Labels, float] = field(default_factory=dict)


class MetricsStore:
    """Every value the metrics page shows; written by the event loop and by worker threads."""

    def __init__(self, hostname: str, gpu: GpuSampler | None = None) -> None:
        self.hostname = hostname
        self._families: dict[str, _Family] = {name: _Family(*spec) for name, spec in _FAMILIES.items()}
        self._lock = threading.Lock()
        self._gpu = gpu

    def add(self, name: str, labels: Labels, value: float, kind: str = "counter",
            unit: str = "Count") -> None:
        """Add to a counter (created on first use)."""
        with self._lock:
            family = self._family(name, kind, unit)
            family.samples[labels] = family.samples.get(labels, 0.0) + value

    def set(self, name: str, labels: Labels, value: float, kind: str = "gauge", unit: str = "ms") -> None:
        """Set a gauge (created on first use)."""
        with self._lock:
            self._family(name, kind, unit).samples[labels] = value

    def _family(self, name: str, kind: str, unit: str) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(kind, unit)
        return family

    def host(self) -> Labels:
        return (("Level", "Host"), ("Hostname", self.hostname))

    def count_response(self, status: int) -> None:
        name = {2: "Requests2XX", 4: "Requests4XX", 5: "Requests5XX"}.get(status // 100)
        if name is not None:
            self.add(name, self.host(), 1.0)

    def _model_labels(self, model: str, version: str | None) -> Labels:
        return (("model_name", model), ("model_version", version or "default"), ("hostname", self.hostname))

    def record_inference(self, model: str, version: str | None, latency_us: float,
                         queue_us: float | None) -> None:
        labels = self._model_labels(model, version)
        self.add("ts_inference_latency_microseconds", labels, latency_us, unit="Microseconds")
        if queue_us is not None:
            self.add("ts_queue_latency_microseconds", labels, queue_us, unit="Microseconds")
            self.set("QueueTime", self.host(), round(queue_us / 1000, 3), unit="Milliseconds")

    def count_request(self, model: str, version: str | None) -> None:
        self.add("ts_inference_requests_total", self._model_labels(model, version), 1.0)

    def render(self, mode: str, names: Iterable[str] = ()) -> str:
        """The Prometheus text of `mode` (log: nothing), limited to `names` when any are given."""
        if mode == "log":
            return ""
        self._sample_host()
        wanted = set(names)
        with self._lock:
            order = [*_FAMILY_ORDER, *sorted(set(self._families) - set(_FAMILY_ORDER))]
            lines: list[str] = []
            for name in order:
                if (mode == "legacy" and name not in _LEGACY) or (wanted and name not in wanted):
                    continue
                lines.extend(_render_family(name, self._families[name]))
        return "".join(line + "\n" for line in lines)

    def _sample_host(self) -> None:
        host = self.host()
        for name, value in _system_gauges():
            self.set(name, host, value, unit=_FAMILIES[name][1])
        if self._gpu is None:
            return
        for index, sample in enumerate(self._gpu.read()):
            labels = (("Level", "Host"), ("DeviceId", str(index)), ("Hostname", self.hostname))
            if sample.utilization is not None:
                self.set("GPUUtilization", labels, round(sample.utilization * 100, 1), unit="Percent")
            if sample.memory_used_bytes is not None:
                used = sample.memory_used_bytes
                self.set("GPUMemoryUsed", labels, used / 2**20, unit="Megabytes")
                if sample.memory_total_bytes:
                    share = round(100 * used / sample.memory_total_bytes, 1)
                    self.set("GPUMemoryUtilization", labels, share, unit="Percent")


def _render_family(name: str, family: _Family) -> Iterator[str]:
    yield f"# HELP {name} Torchserve prometheus {family.kind} metric with unit: {family.unit}"
    yield f"# TYPE {name} {family.kind}"
    for labels, value in family.samples.items():
        text = "".join(f'{key}="{_escape(label)}",' for key, label in labels)
        yield f"{name}{{{text}}} {java_double(value)}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _system_gauges() -> list[tuple[str, float]]:
    try:
        import psutil
    except ImportError:
        return []
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage("/")
    return [
        ("CPUUtilization", psutil.cpu_percent(None)),
        ("MemoryUsed", memory.used / 2**20),
        ("MemoryAvailable", memory.available / 2**20),
        ("MemoryUtilization", memory.percent),
        ("DiskUsage", disk.used / 2**30),
        ("DiskAvailable", disk.free / 2**30),
        ("DiskUtilization", disk.percent),
    ]


class HandlerMetrics:
    """What a handler finds in `context.metrics`: the calls of ts's metric cache, kept for the page.

    One per worker; the values go to the shared MetricsStore, labelled with the model's name.
    """

    def __init__(self, store: MetricsStore, model_name: str) -> None:
        self._store = store
        self.model_name = model_name
        self.request_ids: Any = None

    def set_request_ids(self, request_ids: Any) -> None:
        self.request_ids = request_ids

    def _labels(self) -> Labels:
        return (("ModelName", self.model_name), ("Level", "Model"), ("Hostname", self._store.hostname))

    def _record(self, name: str, value: float, unit: str, metric_type: Any, default: str) -> None:
        kind = str(getattr(metric_type, "value", metric_type or default)).lower()
        if kind == "counter":
            self._store.add(name, self._labels(), float(value), kind="counter", unit=unit)
        else:
            self._store.set(name, self._labels(), float(value), kind="gauge", unit=unit)

    def add_metric(self, name: str, value: float, unit: str, idx: Any = None, dimensions: Any = None,
                   metric_type: Any = None) -> None:
        self._record(name, value, unit, metric_type, "counter")

    def add_counter(self, name: str, value: float, idx: Any = None, dimensions: Any = None) -> None:
        self._record(name, value, "count", "counter", "counter")

    def add_time(self, name: str, value: float, idx: Any = None, unit: str = "ms", dimensions: Any = None,
                 metric_type: Any = None) -> None:
        self._record(name, value, unit, metric_type, "gauge")

    def add_size(self, name: str, value: float, idx: Any = None, unit: str = "MB", dimensions: Any = None,
                 metric_type: Any = None) -> None:
        self._record(name, value, unit, metric_type, "gauge")

    def add_percent(self, name: str, value: float, idx: Any = None, dimensions: Any = None,
                    metric_type: Any = None) -> None:
        self._record(name, value, "percent", metric_type, "gauge")

    def add_error(self, name: str, value: float, dimensions: Any = None) -> None:
        self._store.add(name, (("Level", "Error"), ("Hostname", self._store.hostname)), float(value))

    def get_metric(self, metric_name: str, metric_type: Any = None) -> _HandlerMetric:
        return _HandlerMetric(self, metric_name, "count", metric_type)

    def add_metric_to_cache(self, metric_name: str, unit: str, dimension_names: Any = None,
                            metric_type: Any = None) -> _HandlerMetric:
        return _HandlerMetric(self, metric_name, unit, metric_type)


@dataclass
class _HandlerMetric:
    """A metric object as ts's cache hands out (get_metric / add_metric_to_cache)."""

    owner: HandlerMetrics
    name: str
    unit: str
    metric_type: Any

    def add_or_update(self, value: float, dimension_values: Any = None, request_id: Any = "") -> None:
        self.owner._record(self.name, value, self.unit, self.metric_type, "counter")

    def update(self, value: float, request_id: Any = "", dimensions: Any = None) -> None:
        self.owner._record(self.name, value, self.unit, self.metric_type, "counter")



class MetricsApi:
    """The metrics port: GET /metrics (optionally ?name[]=...), OPTIONS / and /api-description."""

    def __init__(self, store: MetricsStore, mode: str) -> None:
        self._store = store
        self._mode = mode

    def handle(self, request: Any, send: Any) -> Any:
        target = urlsplit(request.target)
        if target.path == "/metrics":
            names = parse_qs(target.query).get("name[]", [])
            return Reply(200, self._store.render(self._mode, names).encode(), CONTENT_TYPE)
        if (target.path == "/" and request.method == "OPTIONS") or target.path == "/api-description":
            return json_reply(describe_api("metrics"))
        return error_reply(NOT_FOUND)
