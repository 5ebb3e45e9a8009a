"""Workers and batching of one model version, with TorchServe's semantics (PROTOCOLS.md 5.9).

TorchServe keeps one job queue per model version, of `job_queue_size` places (100 by default; a job
that finds it full is refused with 503, as a model without workers), and a set of workers that pull
from it (its Model.pollBatch). A worker that is free takes the model's batch lock, waits as long as
it takes for a first job, then keeps taking jobs until it holds `batch_size` of them or
`max_batch_delay` milliseconds have passed since it took the first, and runs them as one handler
call; meanwhile the other free workers wait for the lock. So with batch_size 1 jobs go one at a time,
under load batches fill by themselves, and with a delay a lone job waits for company at most that
long. A describe call (DESCRIBE in TorchServe) always runs alone.

Batching is the front end's, on its event loop, with no thread of its own: the pool keeps its idle
workers in order, and at most one of them (the gatherer, the holder of the batch lock) collects jobs,
first the queued ones, then those that arrive, until the batch is full or a timer set at its first
job fires; the batch then goes to the worker as one message and the next idle worker may gather.

A worker is, by default, a Python process of its own, as TorchServe's backend workers are:
`python -m servers.torchserve._backend` (ProcessBackend), in the model's folder, connected to the
front end by a Unix socket pair; a batch is one pickled message each way, the request bodies the
bytes they came as (decoding them is the worker's part), so the handlers of a model's workers run on
as many cores. With `worker_mode=thread` a worker is a thread of the server (ThreadBackend), for
handlers that release the GIL. Scaling starts or stops workers; a stopped worker finishes the batch
it runs first.

Failures, as TorchServe's WorkerThread: a worker whose handler fails to load at registration or
scaling (or whose process has not loaded it after startupTimeout, and is killed) leaves the model
with no workers (minWorkers and maxWorkers 0), as the captures of a real TorchServe show. A worker
process that dies later (a crash, a kill, or a batch that runs past the
model's responseTimeout, which kills it) answers its batch 500 "Worker died." (413 when the process
was killed with SIGKILL by someone else: TorchServe's rule for exit value 137, the kernel's
out-of-memory killer), is reported on stderr and started again after TorchServe's back-off (1, 1, 2,
3, 5, 8, ... s; from the start again once a worker loads), for maxRetryTimeoutInSec (300 s by default;
the model-config's own value) at most, then given up. Meanwhile it is listed as UNLOADING and its jobs
wait in the queue for the other workers. A handler answer over `max_response_size` bytes ends its
worker the same way (500 "Worker died.", started again): TorchServe's ModelResponseDecoder refuses the
frame and closes the worker's connection. A worker process's message is judged by its length before
it is read, so an answer of any size is never buffered here.

No job waits for a worker that will never come: once a model version has no worker left (its last
one given up, its workers failed to load, scaled to 0 or unregistered), the jobs still queued are
answered at once with the 503 a job arriving then gets (each job's `refusal`: TorchServe's no-worker
text). TorchServe itself leaves them waiting until the client gives up.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from servers.torchserve._archive import Archive
from servers.torchserve._backend import HEADER, frame
from servers.torchserve._handler import Answer, Failure, HandlerLoadError, Request, load_handler
from servers.torchserve._wire import TsError

__all__ = ["BACK_OFF_S", "MAX_RETRY_S", "Batching", "Job", "JobQueue", "Worker", "WorkerPool", "no_worker_message"]

BACK_OFF_S = (0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597)
"""TorchServe's WorkerThread.BACK_OFF: seconds before the n-th restart of a worker in a row."""
MAX_RETRY_S = 300.0
"""maxRetryTimeoutInSec's default: how long a dying worker is started again before it is given up."""
WORKER_DIED = "Worker died."
MAX_RESPONSE_SIZE = 6553500
"""TorchServe's default max_response_size: the most bytes one answer of a handler may have."""
_FRAME_SLACK = 1 << 20
"""What a batch's message from a worker process may hold beyond its answers' bodies (headers, pickling)."""
_STOP_GRACE_S = 5.0
_ROOT = Path(__file__).resolve().parents[2]


def no_worker_message(name: str, version: str | None) -> str:
    """TorchServe's 503 text for a model without workers or with a full queue (sic: its quotes)."""
    named = f'Model "{name}' + (f'" Version {version}' if version is not None else "")
    return (f'{named}" has no worker to serve inference request. '
            "Please use scale workers API to add workers. If this is a sequence inference, please check if "
            "it is closed, or expired; or exceeds maxSequenceJobQueueSize")


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
    refusal: str = ""
    """The 503 message it gets if its model is left without workers while it waits (empty: the
    no-worker text of an inference request)."""


class JobQueue:
    """The bounded FIFO of a model version's jobs waiting for a worker (used on the event loop only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def offer(self, job: Job) -> bool:
        """Queue `job`; False when the queue is full."""
        if len(self._jobs) >= self.capacity:
            return False
        self._jobs.append(job)
        return True

    def put_front(self, jobs: list[Job]) -> None:
        """Jobs taken but not run go back first, in their order."""
        self._jobs.extendleft(reversed(jobs))

    def peek(self) -> Job | None:
        return self._jobs[0] if self._jobs else None

    def take(self) -> Job | None:
        return self._jobs.popleft() if self._jobs else None

    def drain(self) -> list[Job]:
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs


class Backend(Protocol):
    """Where a worker's handler runs: a process (ProcessBackend) or a thread (ThreadBackend).

    It reports to its pool on the event loop: _loaded once, _answered per batch, _part per streamed
    answer, _exited at the end."""

    pid: int

    def send(self, requests: list[tuple]) -> None: ...

    def close(self) -> None:
        """No more batches: the worker ends (after the batch it runs)."""

    def kill(self) -> None: ...


@dataclass(eq=False)
class Worker:
    """One worker of a model version."""

    id: int
    gpu_id: int | None
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    state: str = "LOADING"  # LOADING, READY, STOPPED (dead, waiting to be started again), FAILED
    stopping: bool = False
    load_ms: float = 0.0
    pid: int = 0
    backend: Backend | None = field(default=None, repr=False)
    batch: list[Job] | None = field(default=None, repr=False)
    """The jobs it gathers or runs (None when idle)."""
    started_ns: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    restart: asyncio.TimerHandle | None = field(default=None, repr=False)
    backoff: int = 0
    recovery_start: float | None = None
    killed: bool = False
    """This server killed the process (a response timeout): its death is not the kernel's."""

    def describe(self) -> dict[str, Any]:
        """The worker as TorchServe's describe call lists it."""
        return {
            "id": str(self.id),
            "startTime": f"{self.start_time:%Y-%m-%dT%H:%M:%S}.{self.start_time.microsecond // 1000:03d}Z",
            "status": "READY" if self.state == "READY" and not self.stopping else "UNLOADING",
            "memoryUsage": 0,
            "pid": self.pid or os.getpid(),
            "gpu": self.gpu_id is not None,
            "gpuUsage": "N/A",
        }


class WorkerPool:
    """The job queue, batching and workers of one model version; every method runs on the event loop.

    `metrics` is the server's MetricsStore (what handlers record through context.metrics goes there);
    `mode` is "process" or "thread"."""

    def __init__(self, archive: Archive, batching: Batching, queue_size: int, *,
                 loop: asyncio.AbstractEventLoop, worker_ids: Callable[[], int], gpus: int,
                 metrics: Any = None, mode: str = "process", decode_input: bool = True,
                 response_timeout_s: float = 120.0, startup_timeout_s: float = 120.0,
                 max_retry_s: float = MAX_RETRY_S, hostname: str = "",
                 max_response_size: int = MAX_RESPONSE_SIZE,
                 on_load: Callable[[Worker], None] | None = None,
                 on_batch: Callable[[float], None] | None = None) -> None:
        self.archive = archive
        self.batching = batching
        self.queue = JobQueue(queue_size)
        self.workers: list[Worker] = []
        self.mode = mode
        self.response_timeout_s = response_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_retry_s = max_retry_s
        self.max_response_size = max_response_size
        self._loop = loop
        self._worker_ids = worker_ids
        self._gpus = gpus
        self._gpu_turn = itertools.count()
        self._metrics = metrics
        self._decode = decode_input
        self._hostname = hostname
        self._on_load = on_load
        self._on_batch = on_batch
        self._idle: deque[Worker] = deque()
        self._gatherer: Worker | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting: dict[Worker, asyncio.Future[bool]] = {}
        self._backends: set[Any] = set()

    @property
    def ready_workers(self) -> int:
        return sum(1 for worker in self.workers if worker.state == "READY" and not worker.stopping)

    # -- jobs and batches ------------------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the model has no worker or its queue is full (TorchServe's 503)."""
        if not self.workers:
            return False
        gatherer = self._gatherer
        if gatherer is None:
            if not self.queue.offer(job):
                return False
            if self._idle:
                self._pump()
            return True
        if job.alone:  # the gatherer's batch ends here; the describe call runs alone after it
            if not self.queue.offer(job):
                return False
            self._dispatch_gathered()
            return True
        batch = gatherer.batch
        batch.append(job)  # the queue is empty while a worker gathers: the job joins its batch
        if len(batch) >= self.batching.batch_size:
            self._dispatch_gathered()
        return True

    def _pump(self) -> None:
        """Idle workers take batches from the queue, one gatherer at a time (TorchServe's batch lock)."""
        delay_s = self.batching.max_batch_delay_ms / 1000
        while self._gatherer is None and self._idle and len(self.queue):
            worker = self._idle.popleft()
            complete = self._take_batch(worker)
            if complete or delay_s <= 0:
                self._dispatch(worker)
            else:
                self._gatherer = worker
                self._deadline = self._loop.call_later(delay_s, self._dispatch_gathered)

    def _take_batch(self, worker: Worker) -> bool:
        """Give `worker` the queued jobs of its next batch; True when the batch can go at once (full, or
        ended by a describe job)."""
        queue, size = self.queue, self.batching.batch_size
        first = queue.take()
        batch = worker.batch = [first]
        if first.alone:
            return True
        while len(batch) < size:
            job = queue.peek()
            if job is None:
                return False
            if job.alone:
                return True
            batch.append(queue.take())
        return True

    def _dispatch_gathered(self) -> None:
        worker, self._gatherer = self._gatherer, None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if worker is not None:
            self._dispatch(worker)
        self._pump()

    def _dispatch(self, worker: Worker) -> None:
        batch = worker.batch
        start_ns = worker.started_ns = time.perf_counter_ns()
        for job in batch:
            job.start_ns = start_ns
        worker.backend.send([(job.request.request_id, job.request.parameters, job.request.headers)
                             for job in batch])
        if self.response_timeout_s > 0:
            worker.timer = self._loop.call_later(self.response_timeout_s, self._timed_out, worker, batch)

    def _timed_out(self, worker: Worker, batch: list[Job]) -> None:
        if worker.batch is not batch or worker.backend is None:
            return
        self._report(worker, f"did not answer in {self.response_timeout_s:g} s; stopping it")
        worker.killed = True
        worker.backend.kill()

    def _load_timed_out(self, worker: Worker, backend: Backend) -> None:
        if worker.backend is not backend or worker.state != "LOADING":
            return
        self._report(worker, f"did not load in {self.startup_timeout_s:g} s (startupTimeout); stopping it")
        worker.killed = True
        backend.kill()

    # -- what backends report --------------------------------------------------------------------------

    def _loaded(self, worker: Worker, backend: Backend, ok: bool, message: str, records: list) -> None:
        if worker.backend is not backend:
            return
        self._record(records)
        if not ok:
            self._report(worker, f"failed to load: {message}")
            worker.state = "FAILED" if worker in self._waiting else "STOPPED"
            return  # the backend ends; _exited follows
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        worker.load_ms = (time.perf_counter_ns() - worker.started_ns) / 1e6
        worker.state = "READY" if not worker.stopping else "STOPPED"
        worker.backoff, worker.recovery_start = 0, None
        if self._on_load is not None:
            self._on_load(worker)
        loaded = self._waiting.pop(worker, None)
        if loaded is not None and not loaded.done():
            loaded.set_result(True)
        if worker.stopping:
            backend.close()
        else:
            self._idle.append(worker)
            self._pump()

    def _answered(self, worker: Worker, backend: Backend, outcomes: list[Answer | Failure],
                  records: list) -> None:
        if worker.backend is not backend:
            return
        largest = max((len(outcome.body) for outcome in outcomes if isinstance(outcome, Answer)), default=0)
        if largest > self.max_response_size:
            self.too_large(worker, backend, largest)
            return
        started = time.perf_counter_ns()
        batch, worker.batch = worker.batch, None
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        self._record(records)
        _settle(batch or [], outcomes)
        if worker.stopping:
            backend.close()
        else:
            self._idle.append(worker)
            self._pump()
        if self._on_batch is not None:  # the front end's own time around the batch (WorkerThreadTime)
            self._on_batch((time.perf_counter_ns() - started) / 1e6)

    def _part(self, worker: Worker, backend: Backend, request_id: str, answer: Answer) -> None:
        """An intermediate answer of a streaming handler, for the request it belongs to."""
        if worker.backend is not backend or worker.batch is None:
            return
        if len(answer.body) > self.max_response_size:
            self.too_large(worker, backend, len(answer.body))
            return
        for job in worker.batch:
            if job.request.request_id == request_id:
                if job.request.on_part is not None and not job.future.done():
                    job.request.on_part(answer)
                return

    def too_large(self, worker: Worker, backend: Backend, size: int) -> None:
        """The worker answered more than max_response_size bytes: as TorchServe closes such a worker's
        connection, it is stopped (its batch answered 500 "Worker died.") and started again."""
        if worker.backend is not backend or worker.killed:
            return
        self._report(worker, f"answered {size} bytes, more than max_response_size {self.max_response_size}; "
                             "stopping it")
        worker.killed = True
        backend.kill()

    def _exited(self, worker: Worker, backend: Backend, returncode: int | None) -> None:
        """The worker's process (or thread) has ended: its batch fails, and it is started again unless
        it was stopped on purpose or never loaded."""
        self._backends.discard(backend)
        if worker.backend is not backend:
            return
        worker.backend = None
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        if self._gatherer is worker:  # gathered jobs never reached it: they go back to the queue
            self._gatherer = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self.queue.put_front(worker.batch)
            worker.batch = None
        elif worker in self._idle:
            self._idle.remove(worker)
        if worker.batch:
            status = 413 if returncode in (-signal.SIGKILL, 137) and not worker.killed else 500
            _settle(worker.batch, [Failure(status, WORKER_DIED)] * len(worker.batch))
        worker.batch = None
        loading = self._waiting.pop(worker, None)
        if loading is not None:  # it never loaded: the pool stops, as TorchServe's does
            if worker.state != "FAILED":
                self._report(worker, f"ended while loading (exit code {returncode})")
            worker.state = "FAILED"
            for other in list(self.workers):
                self._stop(other)
            if not loading.done():
                loading.set_result(False)
            return
        if worker.stopping or worker not in self.workers:
            worker.state = "STOPPED"
            self._pump()
            return
        self._restart_later(worker, returncode)
        self._pump()

    def _restart_later(self, worker: Worker, returncode: int | None) -> None:
        worker.state = "STOPPED"
        now = time.monotonic()
        if worker.recovery_start is None:
            worker.recovery_start = now
        if now - worker.recovery_start >= self.max_retry_s:  # TorchServe's WorkerThread.isHealthy
            self._report(worker, f"died (exit code {returncode}); given up after {self.max_retry_s:g} s "
                                 "of retries (maxRetryTimeoutInSec)")
            self.workers.remove(worker)
            self._answer_orphans()
            return
        worker.backoff = min(worker.backoff + 1, len(BACK_OFF_S) - 1)
        delay = BACK_OFF_S[worker.backoff]
        self._report(worker, f"died (exit code {returncode}); starting it again in {delay} s")
        worker.restart = self._loop.call_later(delay, self._restart, worker)

    def _restart(self, worker: Worker) -> None:
        worker.restart = None
        if worker.stopping or worker not in self.workers:
            return
        worker.killed = False
        worker.state = "LOADING"
        self._launch(worker)

    def _report(self, worker: Worker, what: str) -> None:
        print(f"error: model {self.archive.name} version {self.archive.version}: worker {worker.id} {what}",
              file=sys.stderr, flush=True)

    def _record(self, records: list) -> None:
        """Apply what a process worker's handler recorded through context.metrics."""
        if self._metrics is None:
            return
        for method, name, labels, value, kind, unit in records:
            (self._metrics.add if method == "add" else self._metrics.set)(name, labels, value, kind, unit)

    # -- scaling ---------------------------------------------------------------------------------------

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
        pending = [self._waiting[worker] for worker in starting]
        gathered = asyncio.gather(*pending)
        gathered.add_done_callback(lambda results: done.set_result(all(results.result())))
        return done

    def close(self) -> None:
        """Stop every worker (each finishes the batch it runs); the jobs still queued are refused."""
        for worker in list(self.workers):
            self._stop(worker)
        self._answer_orphans()

    def _answer_orphans(self) -> None:
        """With no worker left, nothing will take the queued jobs: each gets its 503 now."""
        if self.workers or not len(self.queue):
            return
        jobs = self.queue.drain()
        print(f"error: model {self.archive.name} version {self.archive.version}: no worker left; "
              f"{len(jobs)} queued request(s) answered 503", file=sys.stderr, flush=True)
        for job in jobs:
            if not job.future.done():  # the client may have gone away
                refusal = job.refusal or no_worker_message(self.archive.name, None)
                job.future.set_exception(TsError(503, "ServiceUnavailableException", refusal))

    def terminate(self) -> None:
        """End every worker process now and wait for them (the server is stopping)."""
        backends = list(self._backends)
        for backend in backends:
            backend.kill()
        for backend in backends:
            backend.wait(_STOP_GRACE_S)

    def _start(self) -> Worker:
        gpu_id = next(self._gpu_turn) % self._gpus if self._gpus else None
        worker = Worker(self._worker_ids(), gpu_id)
        self.workers.append(worker)
        self._waiting[worker] = self._loop.create_future()
        self._launch(worker)
        return worker

    def _launch(self, worker: Worker) -> None:
        worker.started_ns = time.perf_counter_ns()
        backend_type = ThreadBackend if self.mode == "thread" else ProcessBackend
        spec = {"archive": self.archive, "worker_id": worker.id, "gpu_id": worker.gpu_id,
                "batch_size": self.batching.batch_size, "decode": self._decode, "hostname": self._hostname}
        backend = backend_type(self, worker, self._loop)
        worker.backend = backend
        self._backends.add(backend)
        backend.start(spec)
        worker.pid = backend.pid
        if self.startup_timeout_s > 0 and self.mode != "thread":  # a thread cannot be stopped
            worker.timer = self._loop.call_later(self.startup_timeout_s, self._load_timed_out, worker, backend)

    def _stop(self, worker: Worker) -> None:
        worker.stopping = True
        if worker in self.workers:
            self.workers.remove(worker)
        if worker.restart is not None:
            worker.restart.cancel()
            worker.restart = None
        if self._gatherer is worker:
            self._gatherer = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self.queue.put_front(worker.batch)
            worker.batch = None
        if worker in self._idle:
            self._idle.remove(worker)
        if worker.backend is not None and worker.batch is None and worker.state == "READY":
            worker.backend.close()  # idle: it ends now; busy or loading: once it answers
        self._pump()
        self._answer_orphans()


def _log_fd() -> int | None:
    """Where a worker process writes its stdout: the server's stderr (its stdout announces the APIs)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def _settle(batch: list[Job], outcomes: list[Answer | Failure]) -> None:
    for job, outcome in zip(batch, outcomes):
        if not job.future.done():  # the client may have gone away
            job.future.set_result(outcome)


# -- backends ------------------------------------------------------------------------------------------

class ProcessBackend(asyncio.Protocol):
    """A worker process (_backend.py) and its end of the socket pair, read by the event loop.

    The process runs in the model's folder with `python -P` (that folder is not put first on
    sys.path, so an archive's file cannot shadow a standard module; load_handler appends it) and
    writes its output to the server's stderr."""

    def __init__(self, pool: WorkerPool, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._worker = worker
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._buffer = bytearray()
        self._closing = False
        self._exit_seen = False
        self._too_large = False
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def start(self, spec: dict[str, Any]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_ROOT), env.get("PYTHONPATH"))))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "servers.torchserve._backend", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), cwd=str(spec["archive"].model_dir), env=env,
                stdin=subprocess.DEVNULL, stdout=_log_fd())
        except OSError as exc:
            ours.close()
            theirs.close()
            self._loop.call_soon(self._pool._loaded, self._worker, self, False, f"cannot start: {exc}", [])
            self._loop.call_soon(self._pool._exited, self._worker, self, None)
            return
        theirs.close()
        self.pid = self.proc.pid
        self._pending.append(frame(("load", spec)))
        ours.setblocking(False)
        connecting = asyncio.ensure_future(self._loop.create_unix_connection(lambda: self, sock=ours))
        connecting.add_done_callback(self._connected)

    def _connected(self, connecting: asyncio.Future) -> None:
        if connecting.cancelled() or connecting.exception() is not None:
            self.kill()
            self._wait_for_exit()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self._closing:
            transport.close()
            return
        transport.writelines(self._pending)
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._too_large:  # the process is being stopped: what it still sends is dropped unread
            return
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
        size, offset, end = HEADER.size, 0, len(data)
        pool = self._pool
        most = pool.max_response_size * pool.batching.batch_size + _FRAME_SLACK
        while end - offset >= size:
            (length,) = HEADER.unpack_from(data, offset)
            if length > most:  # judged from its length alone, before it is buffered
                self._too_large = True
                self._buffer = bytearray()
                pool.too_large(self._worker, self, length)
                return
            start = offset + size
            if end - start < length:
                break
            offset = start + length
            self._handle(pickle.loads(data[start:offset]))
        self._buffer = bytearray(data[offset:]) if offset < end else bytearray()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        pool, worker = self._pool, self._worker
        if kind == "done":
            pool._answered(worker, self, message[1], message[2])
        elif kind == "part":
            pool._part(worker, self, message[1], message[2])
        elif kind == "loaded":
            pool._loaded(worker, self, message[1], message[2], message[3])

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._wait_for_exit()

    def _wait_for_exit(self) -> None:
        if self._exit_seen or self.proc is None:
            return
        self._exit_seen = True
        waiting = self._loop.run_in_executor(None, self.wait, _STOP_GRACE_S)
        waiting.add_done_callback(lambda done: self._pool._exited(self._worker, self, done.result()))

    # Backend
    def send(self, requests: list[tuple]) -> None:
        message = frame(("predict", requests))
        if self._transport is not None:
            self._transport.write(message)
        else:
            self._pending.append(message)

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()  # the worker reads the end of its socket and exits

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def wait(self, timeout: float) -> int | None:
        """The exit code, once the process has ended (killed after `timeout` seconds)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class ThreadBackend:
    """A worker thread of this server (worker_mode=thread): the handler runs under the server's GIL."""

    def __init__(self, pool: WorkerPool, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._worker = worker
        self._loop = loop
        self._inbox: queue.SimpleQueue[list[tuple] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()

    def start(self, spec: dict[str, Any]) -> None:
        archive = spec["archive"]
        self._thread = threading.Thread(target=self._run, args=(spec,), daemon=True,
                                        name=f"W-{self._worker.id}-{archive.name}_{archive.version}")
        self._thread.start()

    def _run(self, spec: dict[str, Any]) -> None:
        from servers.torchserve._metrics import HandlerMetrics

        pool, worker = self._pool, self._worker
        archive = spec["archive"]
        try:
            handler = load_handler(archive, worker.id, worker.gpu_id, spec["batch_size"],
                                   HandlerMetrics(pool._metrics, archive.name), spec["decode"])
        except HandlerLoadError as exc:
            self._call(pool._loaded, worker, self, False, str(exc), [])
            self._call(pool._exited, worker, self, 1)
            return
        self._call(pool._loaded, worker, self, True, "", [])
        try:
            while (requests := self._inbox.get()) is not None:
                batch = [Request(request_id, parameters, headers, self._part_sender(request_id))
                         for request_id, parameters, headers in requests]
                try:
                    outcomes: list[Answer | Failure] = handler.predict(batch)
                except Exception as exc:  # noqa: BLE001 - a failure outside the handler's call: it goes on
                    outcomes = [Failure(500, f"Worker error: {type(exc).__name__}: {exc}")] * len(batch)
                self._call(pool._answered, worker, self, outcomes, [])
        finally:
            handler.close()
            self._call(pool._exited, worker, self, 0)

    def _part_sender(self, request_id: str) -> Callable[[Answer], None]:
        return lambda answer: self._call(self._pool._part, self._worker, self, request_id, answer)

    def _call(self, callback: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def send(self, requests: list[tuple]) -> None:
        self._inbox.put(requests)

    def close(self) -> None:
        self._inbox.put(None)

    def kill(self) -> None:
        self.close()  # a thread cannot be killed: it ends after its batch

    def wait(self, timeout: float) -> int | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return 0
