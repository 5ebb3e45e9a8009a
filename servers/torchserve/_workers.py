"""Workers and batching of one model version, with TorchServe's semantics (PROTOCOLS.md 5.9).

TorchServe keeps one job queue per model version, of `job_queue_size` places (100 by default; a job
that finds it full is refused with 503, as a model without workers), and a set of workers that pull
from it (its Model.pollBatch). A worker that is free takes the model's batch lock, waits as long as
it takes for a first job, then keeps taking jobs until it holds `batch_size` of them or
`max_batch_delay` milliseconds have passed since it took the first, and runs them as one handler
call; meanwhile the other free workers wait for the lock. So with batch_size 1 jobs go one at a time,
under load batches fill by themselves, and with a delay a lone job waits for company at most that
long. A describe call (DESCRIBE in TorchServe) always runs alone.

A worker here is a thread that loads its own handler (_handler.py) and then loops over batches; the
event loop only queues jobs and hears back through call_soon_threadsafe, once per batch. Scaling
starts or stops threads; a worker whose handler fails to load leaves the model with no workers
(minWorkers and maxWorkers 0), as the captures of a real TorchServe show.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from servers.torchserve._archive import Archive
from servers.torchserve._handler import Answer, Failure, Handler, HandlerLoadError, Request, load_handler

__all__ = ["Batching", "Job", "JobQueue", "Worker", "WorkerPool"]


@dataclass(frozen=True)
class Batching:
    """batch_size requests at most per handler call, gathered for at most max_batch_delay_ms."""

    batch_size: int = 1
    max_batch_delay_ms: int = 100


@dataclass(slots=True)
class Job:
    """One request waiting for a worker; `future` is settled on the event loop."""

    request: Request
    arrival_ns: int
    future: asyncio.Future
    alone: bool = False
    start_ns: int = 0


class JobQueue:
    """The bounded FIFO a model version's workers pull from; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition(threading.Lock())

    def __len__(self) -> int:
        return len(self._jobs)

    def offer(self, job: Job) -> bool:
        """Queue `job`; False when the queue is full."""
        with self._ready:
            if len(self._jobs) >= self.capacity:
                return False
            self._jobs.append(job)
            self._ready.notify()
        return True

    def put_front(self, job: Job) -> None:
        with self._ready:
            self._jobs.appendleft(job)
            self._ready.notify()

    def take(self, worker: Worker, deadline: float | None) -> Job | None:
        """The oldest job, waiting until `deadline` (time.monotonic(); None = no limit); None on timeout
        or when `worker` is asked to stop."""
        with self._ready:
            while not self._jobs:
                if worker.stopping:
                    return None
                if deadline is None:
                    self._ready.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if (remaining <= 0 or not self._ready.wait(remaining)) and not self._jobs:
                        return None
            return self._jobs.popleft()

    def wake_all(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def drain(self) -> list[Job]:
        with self._ready:
            jobs = list(self._jobs)
            self._jobs.clear()
        return jobs


@dataclass(eq=False)
class Worker:
    """One worker thread of a model version."""

    id: int
    gpu_id: int | None
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    state: str = "LOADING"  # LOADING, READY, STOPPED, FAILED
    stopping: bool = False
    load_ms: float = 0.0
    thread: threading.Thread | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """The worker as TorchServe's describe call lists it."""
        return {
            "id": str(self.id),
            "startTime": f"{self.start_time:%Y-%m-%dT%H:%M:%S}.{self.start_time.microsecond // 1000:03d}Z",
            "status": "READY" if self.state == "READY" and not self.stopping else "UNLOADING",
            "memoryUsage": 0,
            "pid": os.getpid(),
            "gpu": self.gpu_id is not None,
            "gpuUsage": "N/A",
        }


class WorkerPool:
    """The job queue and workers of one model version; public methods are called on the event loop."""

    def __init__(self, archive: Archive, batching: Batching, queue_size: int, *,
                 loop: asyncio.AbstractEventLoop, worker_ids: Callable[[], int], gpus: int,
                 metrics: Callable[[], Any],
                 on_load: Callable[[Worker], None] | None = None,
                 on_batch: Callable[[float], None] | None = None) -> None:
        self.archive = archive
        self.batching = batching
        self.queue = JobQueue(queue_size)
        self.workers: list[Worker] = []
        self._loop = loop
        self._worker_ids = worker_ids
        self._gpus = gpus
        self._gpu_turn = itertools.count()
        self._metrics = metrics
        self._on_load = on_load
        self._on_batch = on_batch
        self._batch_lock = threading.Lock()
        self._waiting: dict[Worker, asyncio.Future[bool]] = {}

    @property
    def ready_workers(self) -> int:
        return sum(1 for worker in self.workers if worker.state == "READY" and not worker.stopping)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the model has no worker or its queue is full (TorchServe's 503)."""
        if not self.workers:
            return False
        return self.queue.offer(job)

    def scale(self, count: int) -> asyncio.Future[bool]:
        """Start or stop workers until `count` run; the future is True once the new ones are loaded,
        False if one of them failed to load (the pool then stops every worker)."""
        live = [worker for worker in self.workers if not worker.stopping]
        done: asyncio.Future[bool] = self._loop.create_future()
        if len(live) > count:
            for worker in live[count:]:
                self._stop(worker)
        starting = [self._start() for _ in range(count - len(live))]
        if not starting:
            done.set_result(True)
            return done
        pending = [self._loop.create_future() for _ in starting]
        for worker, loaded in zip(starting, pending):
            self._waiting[worker] = loaded
        gathered = asyncio.gather(*pending)
        gathered.add_done_callback(lambda results: done.set_result(all(results.result())))
        return done

    def close(self) -> list[Job]:
        """Stop every worker (each finishes the batch it runs) and return the jobs still queued."""
        for worker in list(self.workers):
            self._stop(worker)
        self.queue.wake_all()
        return self.queue.drain()

    def _start(self) -> Worker:
        gpu_id = next(self._gpu_turn) % self._gpus if self._gpus else None
        worker = Worker(self._worker_ids(), gpu_id)
        worker.thread = threading.Thread(target=self._run, args=(worker,), daemon=True,
                                         name=f"W-{worker.id}-{self.archive.name}_{self.archive.version}")
        self.workers.append(worker)
        worker.thread.start()
        return worker

    def _stop(self, worker: Worker) -> None:
        worker.stopping = True
        if worker in self.workers:
            self.workers.remove(worker)
        self.queue.wake_all()

    def _run(self, worker: Worker) -> None:
        started = time.perf_counter()
        try:
            handler = load_handler(self.archive, worker.id, worker.gpu_id, self.batching.batch_size,
                                   self._metrics())
        except HandlerLoadError as exc:
            print(f"error: model {self.archive.name} version {self.archive.version}: worker {worker.id} "
                  f"failed to load: {exc}", file=sys.stderr, flush=True)
            self._call_soon(self._loaded, worker, False)
            return
        worker.load_ms = (time.perf_counter() - started) * 1000
        self._call_soon(self._loaded, worker, True)
        try:
            while not worker.stopping:
                batch = self._gather(worker)
                if batch:
                    self._execute(handler, batch)
        finally:
            handler.close()
            worker.state = "STOPPED"

    def _loaded(self, worker: Worker, ok: bool) -> None:
        loaded = self._waiting.pop(worker, None)
        if ok:
            worker.state = "READY" if not worker.stopping else "STOPPED"
            if self._on_load is not None:
                self._on_load(worker)
        else:
            worker.state = "FAILED"
            for other in list(self.workers):
                self._stop(other)
        if loaded is not None and not loaded.done():
            loaded.set_result(ok)

    def _gather(self, worker: Worker) -> list[Job]:
        """The next batch, as TorchServe's Model.pollBatch forms it."""
        with self._batch_lock:
            first = self.queue.take(worker, None)
            if first is None:
                return []
            batch = [first]
            if first.alone:
                return batch
            deadline = time.monotonic() + self.batching.max_batch_delay_ms / 1000
            while len(batch) < self.batching.batch_size:
                job = self.queue.take(worker, deadline)
                if job is None:
                    break
                if job.alone:
                    self.queue.put_front(job)
                    break
                batch.append(job)
            return batch

    def _execute(self, handler: Handler, batch: list[Job]) -> None:
        start_ns = time.perf_counter_ns()
        for job in batch:
            job.start_ns = start_ns
        try:
            outcomes: list[Answer | Failure] = handler.predict([job.request for job in batch])
        except Exception as exc:  # noqa: BLE001 - a failure outside the handler's own call: the worker goes on
            outcomes = [Failure(500, f"Worker error: {type(exc).__name__}: {exc}")] * len(batch)
        handled_ns = time.perf_counter_ns()
        self._call_soon(_settle, batch, outcomes)
        if self._on_batch is not None:  # the worker thread's own time around the handler (WorkerThreadTime)
            self._on_batch((time.perf_counter_ns() - handled_ns) / 1e6)

    def _call_soon(self, callback: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass


def _settle(batch: list[Job], outcomes: list[Answer | Failure]) -> None:
    for job, outcome in zip(batch, outcomes):
        if not job.future.done():  # the client may have gone away
            job.future.set_result(outcome)
