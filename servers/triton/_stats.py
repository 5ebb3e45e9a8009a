"""Per-model inference statistics in the shape of Triton's statistics extension (PROTOCOLS.md 1.11).

Every duration is a cumulative {"count", "ns"} pair, so a client diffs two samples for an interval.
Counting rules, as Triton's: `inference_count` adds the batch size of each successful request,
`execution_count` adds one per model execution (a dynamic batch of many requests is one execution,
and `batch_stats` counts executions by their batch size); `success` and `fail` count requests; `queue` is the wait for a worker thread (zero when the model
runs on the event loop); compute_input is decoding, compute_infer the model, compute_output encoding.
A failed request adds its time from arrival to the failure to `fail`. `pending` counts requests
waiting for a worker thread right now (Triton's nv_inference_pending_request_count).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from servers.core.model import Model

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
              "cache_hit", "cache_miss")


class ModelStats:
    """The counters of one model version; safe to update from worker threads."""

    def __init__(self, model: Model, memory_usage: list[dict[str, Any]] | None = None) -> None:
        self.name = model.name
        self.memory_usage = list(memory_usage or [])
        """What loading the model took, as Triton's statistics report it: [{type, id, byte_size}]."""
        self.version = model.version
        self._batches: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._durations = {key: [0, 0] for key in _DURATIONS}
        self._pending = 0
        self._failures_by_reason: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return self._pending

    def add_pending(self, delta: int) -> None:
        """+1 when a request is queued for a worker thread, -1 when a worker picks it up."""
        with self._lock:
            self._pending += delta

    def record_success(self, batch_size: int, queue_ns: int, input_ns: int, infer_ns: int,
                       output_ns: int) -> None:
        """One successful request that ran as an execution of its own: times in nanoseconds, by stage."""
        self.record_execution(batch_size, input_ns, infer_ns, output_ns)
        self.record_request(queue_ns, input_ns, infer_ns, output_ns)

    def record_request(self, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One successful request; infer_ns is the execution it was part of."""
        with self._lock:
            self._last_inference_ms = time.time_ns() // 1_000_000
            self._add("success", queue_ns + input_ns + infer_ns + output_ns)
            self._add("queue", queue_ns)
            self._add("compute_input", input_ns)
            self._add("compute_infer", infer_ns)
            self._add("compute_output", output_ns)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution over `batch_size` rows (one request, or a dynamic batch of several)."""
        with self._lock:
            self._inference_count += batch_size
            self._execution_count += 1
            entry = self._batches.setdefault(batch_size, [0, 0, 0, 0])
            entry[0] += 1
            entry[1] += input_ns
            entry[2] += infer_ns
            entry[3] += output_ns

    def record_failure(self, elapsed_ns: int, reason: str = "OTHER") -> None:
        """One failed request; reason as Triton's metrics label it: BACKEND (the model), REJECTED (a
        full queue) or OTHER."""
        with self._lock:
            self._add("fail", elapsed_ns)
            self._failures_by_reason[reason] = self._failures_by_reason.get(reason, 0) + 1

    def failures_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self._failures_by_reason)

    def _add(self, key: str, ns: int) -> None:
        pair = self._durations[key]
        pair[0] += 1
        pair[1] += ns

    def snapshot(self) -> dict[str, Any]:
        """This model's entry of `model_stats`."""
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self._last_inference_ms,
                "inference_count": self._inference_count,
                "execution_count": self._execution_count,
                "inference_stats": {key: {"count": count, "ns": ns}
                                    for key, (count, ns) in self._durations.items()},
                "response_stats": {},
                "batch_stats": [
                    {"batch_size": size, **{key: {"count": count, "ns": ns} for key, ns in
                                            zip(("compute_input", "compute_infer", "compute_output"), times)}}
                    for size, (count, *times) in sorted(self._batches.items())],
                "memory_usage": [dict(usage) for usage in self.memory_usage],
            }
