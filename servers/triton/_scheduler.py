"""Scheduling of one model version over its execution instances, with Triton's dynamic batcher.

Every instance (one per `instance_group` count) owns one thread, as Triton's backend instances do: an
execution runs there while the asyncio loop goes on accepting requests. Requests wait in one FIFO queue
per model version; an idle instance takes work from its head:

- without `dynamic_batching`, one request per execution;
- with it, requests are stacked along the batch dimension into one execution of at most
  max_batch_size rows. A batch leaves at once when the queue holds enough rows for the largest
  preferred size (max_batch_size when none is given); otherwise it waits until the oldest request has
  waited max_queue_delay_microseconds (0 by default: leave at once), then takes the largest preferred
  size the queue can fill, or all it holds. Requests are never split: a request whose rows would
  overflow the batch waits for the next one. So under load (every instance busy) batches form by
  themselves, and with a queue delay they form even when instances are free.

Each request then gets its own rows back (Model.infer_batch). Times are recorded as Triton's
statistics define them: queue = arrival to the start of its execution, compute_infer = the execution.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from servers.core.model import Model, RequestError
from servers.triton._stats import ModelStats

__all__ = ["Batching", "Executed", "Scheduler"]


@dataclass(frozen=True)
class Batching:
    """A dynamic_batching block: preferred sizes (ascending) and the longest wait for more rows."""

    preferred: tuple[int, ...] = ()
    max_queue_delay_us: int = 0


@dataclass(frozen=True)
class Executed:
    """The outcome of one request: its own outputs, its queue time and its execution's time."""

    outputs: dict[str, np.ndarray]
    queue_ns: int
    infer_ns: int


@dataclass
class _Waiting:
    inputs: dict[str, np.ndarray]
    rows: int
    arrival_ns: int
    future: asyncio.Future[Executed] = field(repr=False)


class Scheduler:
    """Runs requests for one model version on its instances; `submit` from the event loop only."""

    def __init__(self, instances: list[Model], stats: ModelStats, batching: Batching | None) -> None:
        if not instances:
            raise ValueError("a model version needs at least one instance")
        self.stats = stats
        self.batching = batching
        self.max_batch_size = instances[0].max_batch_size
        self._idle = list(reversed(instances))
        self._threads = {id(instance): ThreadPoolExecutor(1, thread_name_prefix=f"{instance.name}-instance{index}")
                         for index, instance in enumerate(instances)}
        self._instances = list(instances)
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Requests waiting for an instance right now."""
        return len(self._queue)

    async def submit(self, inputs: dict[str, np.ndarray], rows: int, arrival_ns: int) -> Executed:
        """Queue one checked request (`rows` = its batch size) and wait for its outputs.

        Raises RequestError when the model refused this request, or what the model raised.
        """
        if self._closed:
            raise RuntimeError("the model is being unloaded")
        future: asyncio.Future[Executed] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(inputs, rows, arrival_ns, future))
        self._queued_rows += rows
        self.stats.add_pending(1)
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            batch = self._take()
            if batch is None:
                return
            self._start(self._idle.pop(), batch)

    def _take(self) -> list[_Waiting] | None:
        """The requests of the next execution, or None to wait for more rows (a timer is armed)."""
        if self.batching is None or self.max_batch_size <= 0:
            return [self._pop()]
        limit = self.max_batch_size
        preferred = self.batching.preferred
        target = min(preferred[-1], limit) if preferred else limit
        if self._queued_rows < target:
            waited_ns = time.perf_counter_ns() - self._queue[0].arrival_ns
            delay_ns = self.batching.max_queue_delay_us * 1000
            if waited_ns < delay_ns:
                self._arm(delay_ns - waited_ns)
                return None
            fitting = [size for size in preferred if size <= self._queued_rows]
            target = fitting[-1] if fitting else min(self._queued_rows, limit)
        batch = [self._pop()]
        rows = batch[0].rows
        while self._queue and rows + self._queue[0].rows <= target:
            rows += self._queue[0].rows
            batch.append(self._pop())
        return batch

    def _pop(self) -> _Waiting:
        waiting = self._queue.popleft()
        self._queued_rows -= waiting.rows
        self.stats.add_pending(-1)
        return waiting

    def _arm(self, delay_ns: int) -> None:
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay_ns / 1e9, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _start(self, instance: Model, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        start_ns = time.perf_counter_ns()
        work = loop.run_in_executor(self._threads[id(instance)], _execute, instance, [w.inputs for w in batch])
        work.add_done_callback(lambda done: self._finish(instance, batch, start_ns, done))

    def _finish(self, instance: Model, batch: list[_Waiting], start_ns: int, done: asyncio.Future) -> None:
        self._idle.append(instance)
        if done.cancelled():
            error: BaseException | None = RuntimeError("the model is being unloaded")
        else:
            error = done.exception()
        if error is not None:
            for waiting in batch:
                _settle(waiting.future, error=error)
        else:
            results, infer_ns = done.result()
            self.stats.record_execution(sum(w.rows for w in batch), 0, infer_ns, 0)
            for waiting, result in zip(batch, results):
                if isinstance(result, RequestError):
                    _settle(waiting.future, error=result)
                else:
                    _settle(waiting.future, Executed(result, start_ns - waiting.arrival_ns, infer_ns))
        if not self._closed:
            self._dispatch()

    def close(self) -> None:
        """Refuse new work, fail what still waits, and release the instances once idle."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        while self._queue:
            _settle(self._pop().future, error=RuntimeError("the model is being unloaded"))
        for instance in self._instances:
            thread = self._threads[id(instance)]
            thread.submit(instance.close)
            thread.shutdown(wait=False)


def _execute(instance: Model, requests: list[dict[str, np.ndarray]]) -> tuple[list, int]:
    start = time.perf_counter_ns()
    results = instance.infer_batch(requests)
    elapsed = time.perf_counter_ns() - start
    if len(results) != len(requests):
        raise RuntimeError(f"model '{instance.name}' answered {len(results)} of {len(requests)} requests")
    return results, elapsed


def _settle(future: asyncio.Future, result: Executed | None = None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
