"""Server-side figures of a load level, read from the target's own Prometheus metrics endpoint.

Inference servers count what they did: Triton (and the reference Triton-compatible server) as nv_*
families, TorchServe as ts_*. Two scrapes, one before a run or sweep step and one after, give the
server's view of that load level as differences of its counters:

- per request: queue time, compute time (input + infer + output), and the mean batch size the
  server ran (inferences / executions, the effect of dynamic batching);
- GPU utilisation, memory and power as the server's gauges read at the end of the level (Triton
  averages utilisation and power over its metrics interval, so the end reading describes the loaded
  level); energy from the difference of the energy counter, so joules per inference;
- with a price per hour of the server, $ per million inferences at the rate the level achieved.

The scrapes happen outside the measured run, never on the generator's hot path. A target without a
metrics endpoint, or one that does not answer, gives `None` and a note; the run goes on.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Sample", "ServerMetrics", "server_figures"]

_TRITON_COUNTERS = {
    "requests": "nv_inference_request_success",
    "failures": "nv_inference_request_failure",
    "inferences": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "input_us": "nv_inference_compute_input_duration_us",
    "infer_us": "nv_inference_compute_infer_duration_us",
    "output_us": "nv_inference_compute_output_duration_us",
}
_TORCHSERVE_COUNTERS = {
    "requests": "ts_inference_requests_total",
    "request_us": "ts_inference_latency_microseconds",
    "queue_us": "ts_queue_latency_microseconds",
}
_GPU_GAUGES = {
    "gpu_utilization": "nv_gpu_utilization",
    "gpu_memory_used_bytes": "nv_gpu_memory_used_bytes",
    "gpu_memory_total_bytes": "nv_gpu_memory_total_bytes",
    "gpu_power_w": "nv_gpu_power_usage",
}
_ENERGY = "nv_energy_consumption"
_CPU_ENERGY = "cpu_energy_consumption"
"""The Triton-compatible server's CPU package energy (RAPL), used where no GPU energy counter is."""
_CPU = "nv_cpu_utilization"


@dataclass
class Sample:
    """One scrape: per-model counters summed over versions, GPU gauges summed (or averaged) over GPUs."""

    t: float
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    gpus: int = 0


class ServerMetrics:
    """Scrapes one metrics URL for one model; `sample()` never raises (None when unreachable)."""

    def __init__(self, url: str, model: str, timeout_s: float = 2.0) -> None:
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.error: str | None = None

    def sample(self) -> Sample | None:
        import httpx  # here: only a run that reads the server's metrics needs it (its import: 40 ms a start)

        try:
            response = httpx.get(self.url, timeout=self.timeout_s)
            response.raise_for_status()
            text = response.text
        except (httpx.HTTPError, OSError) as exc:
            self.error = f"server metrics at {self.url}: {type(exc).__name__}: {exc}"
            return None
        return parse_sample(text, self.model, time.monotonic())


def parse_sample(text: str, model: str, t: float) -> Sample:
    """The figures of `model` (every version) and of the machine's GPUs in one Prometheus text page."""
    sample = Sample(t)
    per_gpu: dict[str, dict[str, float]] = defaultdict(dict)
    wanted = {**{name: key for key, name in _TRITON_COUNTERS.items()},
              **{name: key for key, name in _TORCHSERVE_COUNTERS.items()}}
    gauges = {name: key for key, name in _GPU_GAUGES.items()}
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            labels, value = metric.labels, metric.value
            name = metric.name if metric.name in wanted else metric.name.removesuffix("_total")
            key = wanted.get(name)
            if key is not None and (labels.get("model") == model or labels.get("model_name") == model):
                sample.counters[key] = sample.counters.get(key, 0.0) + value
            elif name in gauges or name == _ENERGY:
                per_gpu[labels.get("gpu_uuid", "")][gauges.get(name, "energy_j")] = value
            elif name == _CPU:
                sample.gauges["cpu_utilization"] = value
            elif name == _CPU_ENERGY:
                sample.gauges["cpu_energy_j"] = value
    sample.gpus = len(per_gpu)
    for readings in per_gpu.values():
        for key, value in readings.items():
            sample.gauges[key] = sample.gauges.get(key, 0.0) + value
    if sample.gpus and "gpu_utilization" in sample.gauges:
        sample.gauges["gpu_utilization"] /= sample.gpus  # mean over GPUs; memory and power add up
    return sample


def usd_per_million(cost_per_hour: float, inferences_per_s: float | None) -> float | None:
    """Dollars per million inferences of a server costing `cost_per_hour` at `inferences_per_s`."""
    if not inferences_per_s:
        return None
    return round(cost_per_hour / (inferences_per_s * 3600) * 1e6, 6)


def server_figures(before: Sample | None, after: Sample | None,
                   cost_per_hour: float | None = None) -> dict[str, Any] | None:
    """What the server did between two samples, per request and per inference; None without both."""
    if before is None or after is None:
        return None
    seconds = max(after.t - before.t, 1e-9)
    delta = {key: after.counters.get(key, 0.0) - before.counters.get(key, 0.0)
             for key in after.counters}
    requests = delta.get("requests", 0.0)
    inferences = delta.get("inferences", requests)
    executions = delta.get("executions", 0.0)
    figures: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "requests": int(requests),
        "failures": int(delta.get("failures", 0.0)),
        "inferences": int(inferences),
        "inferences_per_s": round(inferences / seconds, 3),
        "executions": int(executions),
        "mean_batch_size": round(inferences / executions, 3) if executions else None,
    }
    for key in ("request_us", "queue_us", "input_us", "infer_us", "output_us"):
        if key in delta:
            figures[f"{key.removesuffix('_us')}_ms_per_request"] = round(delta[key] / requests / 1000, 4) \
                if requests else None
    if all(key in delta for key in ("input_us", "infer_us", "output_us")) and requests:
        compute = delta["input_us"] + delta["infer_us"] + delta["output_us"]
        figures["compute_ms_per_request"] = round(compute / requests / 1000, 4)
    gauges = after.gauges
    for key in ("cpu_utilization", "gpu_utilization"):
        if key in gauges:
            figures[key] = round(gauges[key], 4)
    if after.gpus:
        figures["gpus"] = after.gpus
        for key in ("gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_power_w"):
            if key in gauges:
                figures[key] = round(gauges[key], 3)
        if "energy_j" in gauges and "energy_j" in before.gauges:
            joules = gauges["energy_j"] - before.gauges["energy_j"]
            figures["energy_j"] = round(joules, 3)
            figures["mean_power_w"] = round(joules / seconds, 3)
            figures["energy_j_per_inference"] = round(joules / inferences, 6) if inferences else None
            figures["energy_source"] = "gpu (NVML)"
    if "energy_j" not in figures and "cpu_energy_j" in gauges and "cpu_energy_j" in before.gauges:
        joules = gauges["cpu_energy_j"] - before.gauges["cpu_energy_j"]  # the whole CPU package, not only the model
        figures["energy_j"] = round(joules, 3)
        figures["mean_power_w"] = round(joules / seconds, 3)
        figures["energy_j_per_inference"] = round(joules / inferences, 6) if inferences else None
        figures["energy_source"] = "cpu packages (RAPL)"
    if cost_per_hour is not None:
        figures["cost_per_hour"] = cost_per_hour
        figures["usd_per_million_inferences"] = usd_per_million(cost_per_hour, inferences / seconds)
    return figures
