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
  themselves, and with a queue delay they form even when instances are free. As in Triton without
  `allow_ragged_batch`, requests batch together only when every input has the same shape past the batch
  dimension (the token ids of sentences of different lengths cannot be stacked): a request whose shapes
  differ from the batch's first one ends the batch and heads the next.

The queue is bounded as Triton bounds it: with dynamic_batching's default_queue_policy.max_queue_size
set, a request that finds that many requests already waiting is refused at once (QueueFull, Triton's
"Exceeds maximum queue size", answered 503 / UNAVAILABLE) rather than held: an overloaded model answers
its clients instead of growing its queue (and the server's memory) without end. 0, the default, is no
limit, as in Triton.

The queue delay is timed by a PreciseScheduler (loadgen/lowlevel/precise_timer.py, a timerfd the loop
watches), not by loop.call_later, which is whole milliseconds: asyncio rounds a wait up (a 500 us
delay held a batch 1.08 ms, median, on the development machine) and uvloop truncates it (a 500 us delay
became a 0 ms timer, re-armed until the delay had passed: on time, but the loop spun all along). The
timerfd is made when the first delay is armed, so a model without a delay costs none.

Each request then gets its own rows back (Model.infer_batch). Times are recorded as Triton's
statistics define them: queue = arrival to the start of its execution, compute_infer = the execution.

The hop to an instance and back is the cheapest the loop offers, once per execution (not per
request): the batch goes to the instance thread on a SimpleQueue, and the thread hands the outcome
back with one call_soon_threadsafe. A ThreadPoolExecutor with run_in_executor costs a
concurrent.futures.Future, a wrapping asyncio.Future and a chained callback more per execution,
about 12 us of the 45 us a round trip took on one core of the development machine. Per request,
`enqueue` takes a callback rather than making a future, so the HTTP front end answers without a
Task per request (`submit` is the awaitable form). The scheduler keeps the loop its first request
came from (asyncio.get_running_loop reads the process id, a system call, on every call).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from loadgen.lowlevel.precise_timer import PreciseScheduler, ScheduledCall
from servers.core.model import Model, RequestError
from servers.triton._stats import ModelStats

__all__ = ["QUEUE_FULL", "Batching", "Done", "Executed", "QueueFull", "Scheduler"]

QUEUE_FULL = "Exceeds maximum queue size"
"""Triton's message for a request refused by a full queue (status UNAVAILABLE: HTTP 503)."""


class QueueFull(RuntimeError):
    """A request refused because its model's queue already holds max_queue_size requests."""


@dataclass(frozen=True)
class Batching:
    """A dynamic_batching block: preferred sizes (ascending) and the longest wait for more rows."""

    preferred: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    """default_queue_policy.max_queue_size: the most requests waiting for an instance; 0: no limit."""


@dataclass(frozen=True)
class Executed:
    """The outcome of one request: its own outputs, its queue time and its execution's time."""

    outputs: dict[str, np.ndarray]
    queue_ns: int
    infer_ns: int


Done = Callable[[Executed | BaseException], None]
"""Called on the loop with a request's outcome: its Executed, or the error it failed with."""


@dataclass(slots=True)
class _Waiting:
    inputs: dict[str, np.ndarray]
    rows: int
    arrival_ns: int
    done: Done = field(repr=False)


Outcome = tuple[list, int, BaseException | None]
"""What an instance thread hands back: the results of its execution, its nanoseconds, or the error."""


class _InstanceThread:
    """The thread one instance runs on: executions arrive on a queue, outcomes go back to their loop."""

    def __init__(self, instance: Model, name: str) -> None:
        self.instance = instance
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def execute(self, requests: list[dict[str, np.ndarray]], loop: asyncio.AbstractEventLoop,
                done: Callable[[Outcome], None]) -> None:
        """Run `requests` as one execution; done(outcome) is then called on `loop`."""
        self._work.put((requests, loop, done))

    def stop(self) -> None:
        """Close the instance once the executions already handed over are done, and end the thread."""
        self._work.put(None)

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            requests, loop, done = work
            try:
                outcome: Outcome = (*_execute(self.instance, requests), None)
            except BaseException as exc:  # noqa: BLE001 - whatever the model raised is the requests' answer
                outcome = ([], 0, exc)
            try:
                loop.call_soon_threadsafe(done, outcome)
            except RuntimeError:  # the loop is closed: nobody waits for these requests any more
                pass
        try:
            self.instance.close()
        except Exception:  # noqa: BLE001, S110 - an unloading model's failure to let go has no one to tell
            pass


class Scheduler:
    """Runs requests for one model version on its instances; `submit` from the event loop only."""

    def __init__(self, instances: list[Model], stats: ModelStats, batching: Batching | None) -> None:
        if not instances:
            raise ValueError("a model version needs at least one instance")
        self.stats = stats
        self.batching = batching
        self.max_batch_size = instances[0].max_batch_size
        self._limit = batching.max_queue_size if batching is not None else 0
        self._threads = [_InstanceThread(instance, f"{instance.name}-instance{index}")
                         for index, instance in enumerate(instances)]
        self._idle = list(reversed(self._threads))
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._timer: ScheduledCall | None = None
        self._clock: PreciseScheduler | None = None
        """Times the queue delay on the loop; made when a delay is first armed."""
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pending(self) -> int:
        """Requests waiting for an instance right now."""
        return len(self._queue)

    async def submit(self, inputs: dict[str, np.ndarray], rows: int, arrival_ns: int) -> Executed:
        """Queue one checked request (`rows` = its batch size) and wait for its outputs.

        Raises RequestError when the model refused this request, or what the model raised.
        """
        future: asyncio.Future[Executed] = asyncio.get_running_loop().create_future()
        self.enqueue(inputs, rows, arrival_ns, lambda outcome: _settle(future, outcome))
        return await future

    def enqueue(self, inputs: dict[str, np.ndarray], rows: int, arrival_ns: int, done: Done) -> None:
        """`submit` with a callback: queue the request; done(outcome) runs on the loop once it is
        answered, with its Executed or what `submit` would raise. Raises RuntimeError at once when
        the model is being unloaded, QueueFull when max_queue_size requests already wait."""
        if self._closed:
            raise RuntimeError("the model is being unloaded")
        if self._limit and len(self._queue) >= self._limit:
            raise QueueFull(QUEUE_FULL)
        loop = self._loop
        if loop is None or loop.is_closed():
            self._loop = asyncio.get_running_loop()
            self._drop_clock()  # it watched the closed loop
        self._queue.append(_Waiting(inputs, rows, arrival_ns, done))
        self._queued_rows += rows
        self.stats.add_pending(1)
        self._dispatch()

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
        first = batch[0].inputs
        while (self._queue and rows + self._queue[0].rows <= target
               and _same_shapes(first, self._queue[0].inputs)):
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
        if self._clock is None:
            self._clock = PreciseScheduler(self._loop)
        self._timer = self._clock.call_at(time.monotonic() + delay_ns / 1e9, self._on_timer)

    def _drop_clock(self) -> None:
        clock, self._clock, self._timer = self._clock, None, None
        if clock is not None:
            clock.close()  # also once its loop is closed (asyncio and uvloop both allow it)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _start(self, instance: _InstanceThread, batch: list[_Waiting]) -> None:
        start_ns = time.perf_counter_ns()
        instance.execute([w.inputs for w in batch], self._loop,
                         lambda outcome: self._finish(instance, batch, start_ns, outcome))

    def _finish(self, instance: _InstanceThread, batch: list[_Waiting], start_ns: int,
                outcome: Outcome) -> None:
        self._idle.append(instance)
        results, infer_ns, error = outcome
        if error is not None:
            for waiting in batch:
                self._answer(waiting, error)
        else:
            self.stats.record_execution(sum(w.rows for w in batch), 0, infer_ns, 0)
            for waiting, result in zip(batch, results):
                if isinstance(result, RequestError):
                    self._answer(waiting, result)
                else:
                    self._answer(waiting, Executed(result, start_ns - waiting.arrival_ns, infer_ns))
        if not self._closed:
            self._dispatch()

    def _answer(self, waiting: _Waiting, outcome: Executed | BaseException) -> None:
        """Hand a request its outcome; a callback that raises is reported, never stops the others."""
        try:
            waiting.done(outcome)
        except Exception as exc:  # noqa: BLE001 - one front end's bug must not strand the batch
            self._loop.call_exception_handler({"message": "a scheduler callback failed", "exception": exc})

    def close(self) -> None:
        """Refuse new work, fail what still waits, and release the instances once idle."""
        self._closed = True
        self._drop_clock()
        while self._queue:
            self._answer(self._pop(), RuntimeError("the model is being unloaded"))
        for instance in self._threads:
            instance.stop()


def _execute(instance: Model, requests: list[dict[str, np.ndarray]]) -> tuple[list, int]:
    start = time.perf_counter_ns()
    results = instance.infer_batch(requests)
    elapsed = time.perf_counter_ns() - start
    if len(results) != len(requests):
        raise RuntimeError(f"model '{instance.name}' answered {len(results)} of {len(requests)} requests")
    return results, elapsed


def _same_shapes(first: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> bool:
    """Whether two requests' inputs have the same shapes past the batch dimension (then they stack)."""
    return all(array.shape[1:] == other[name].shape[1:] for name, array in first.items())


def _settle(future: asyncio.Future[Executed], outcome: Executed | BaseException) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
