"""The model manager of the TorchServe-compatible server: versions, defaults, workers, predictions.

Both front ends (HTTP and gRPC) ask it for everything, so they answer alike. Its rules are
TorchServe's ModelManager and ApiUtils (PROTOCOLS.md 5.3, ../shared/torchserve-captures):

- a model is a name with one or more versions (the archive's modelVersion); the first registered is
  the default, which requests without a version use and which `set-default` changes;
- settings of a version, highest priority first: the register request's own values, then the
  archive's model-config YAML, then config.properties `models`, then TorchServe's defaults
  (batch_size 1, max_batch_delay 100 ms, response and startup timeouts 120 s);
- workers: a model loaded at start gets `default_workers_per_model`, or one per GPU, or one per CPU
  core; a registered one gets `initial_workers` (default 0: registered, but answering 503 until
  scaled). A version whose workers fail to load keeps its registration with minWorkers and
  maxWorkers 0, and the server goes on serving the others; the jobs that waited for them are
  answered 503 (_workers.py);
- no version gets more workers than `max_workers_per_model` (--max-workers-per-model): a register,
  scale or model-config asking for more is refused with 400 and starts nothing (the implicit default
  of one worker per core at start is cut to it instead); a negative min_worker in a scale request
  is refused with 400 too (TorchServe stores it, stops every worker and answers 500); a negative
  count that TorchServe reads as "not given" (a register's initial_workers, gRPC's min_worker) is
  read so here;
- refusals raise TsError with TorchServe's code, exception class and message.

Everything here runs on the event loop; workers report back through it (_workers.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from servers.torchserve._archive import Archive, open_archive
from servers.torchserve._config import Settings, workers_beyond_limit
from servers.torchserve._handler import Answer, Failure, Request, describe_metadata
from servers.torchserve._metrics import MetricsStore
from servers.torchserve._wire import TsError
from servers.torchserve._workers import MAX_RETRY_S, Batching, Job, Worker, WorkerPool, no_worker_message

__all__ = ["ModelManager", "ModelVersion", "RegisterRequest"]


@dataclass
class RegisterRequest:
    """The parameters of a register call (REST query, REST JSON body or gRPC); -1 = not given."""

    url: str | None
    model_name: str | None = None
    batch_size: int = -1
    max_batch_delay: int = -1
    initial_workers: int | None = None
    synchronous: bool = True
    response_timeout: int = -1
    startup_timeout: int = -1
    runtime: str | None = None
    handler: str | None = None


@dataclass
class ModelVersion:
    """One registered version of a model."""

    archive: Archive
    pool: WorkerPool
    min_workers: int = 0
    max_workers: int = 0
    response_timeout: int = 120
    startup_timeout: int = 120
    max_retry_timeout: int = int(MAX_RETRY_S)
    loaded_at_startup: bool = False
    device_type: str = "cpu"

    @property
    def name(self) -> str:
        return self.archive.name

    @property
    def version(self) -> str:
        return self.archive.version

    def describe(self) -> dict[str, Any]:
        """The fields of TorchServe's DescribeModelResponse, in its order (Gson leaves out nulls)."""
        queue, batching = self.pool.queue, self.pool.batching
        return {
            "modelName": self.name, "modelVersion": self.version, "modelUrl": self.archive.url,
            "runtime": self.archive.runtime, "minWorkers": self.min_workers, "maxWorkers": self.max_workers,
            "batchSize": batching.batch_size, "maxBatchDelay": batching.max_batch_delay_ms,
            "responseTimeout": self.response_timeout, "startupTimeout": self.startup_timeout,
            "maxRetryTimeoutInSec": self.max_retry_timeout, "clientTimeoutInMills": 0, "parallelType": "", "parallelLevel": 0,
            "deviceType": self.device_type, "continuousBatching": False, "useJobTicket": False,
            "useVenv": False, "stateful": False, "sequenceMaxIdleMSec": 0, "sequenceTimeoutMSec": 0,
            "maxNumSequence": 0, "maxSequenceJobQueueSize": 0, "loadedAtStartup": self.loaded_at_startup,
            "workers": [worker.describe() for worker in self.pool.workers],
            "jobQueueStatus": {"remainingCapacity": queue.capacity - len(queue),
                               "pendingRequests": len(queue)},
        }


@dataclass
class _Model:
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    default: str = ""


class ModelManager:
    """Every registered model; create it on the running event loop."""

    def __init__(self, settings: Settings, metrics: MetricsStore, gpus: int = 0) -> None:
        self.settings = settings
        self.metrics = metrics
        self.gpus = gpus
        self._loop = asyncio.get_running_loop()
        self._models: dict[str, _Model] = {}
        self._worker_ids = iter(range(9000, 2**31)).__next__
        self.startup_models: set[str] = set()

    # -- lookups ---------------------------------------------------------------------------------------

    def lookup(self, name: str, version: str | None = None) -> ModelVersion:
        """The version asked for (the default when None); TsError 404 when there is none."""
        model = self._models.get(name)
        if model is None:
            raise TsError(404, "ModelNotFoundException", f"Model not found: {name}")
        if version is None:
            return model.versions[model.default]
        served = model.versions.get(version)
        if served is None:
            raise TsError(404, "ModelVersionNotFoundException",
                          f"Model version: {version} does not exist for model: {name}")
        return served

    def list_models(self, limit: int, page_token: int) -> dict[str, Any]:
        """ListModelsResponse: default versions by name, paged as TorchServe's ApiUtils.getModelList."""
        limit = 100 if limit > 100 or limit < 0 else limit
        page_token = max(page_token, 0)
        names = sorted(self._models)
        answer: dict[str, Any] = {}
        last = page_token + limit
        if last > len(names):
            last = len(names)
        else:
            answer["nextPageToken"] = str(last)
        answer["models"] = [{"modelName": name, "modelUrl": self.lookup(name).archive.url}
                            for name in names[page_token:last]]
        return answer

    def describe(self, name: str, version: str | None) -> list[ModelVersion]:
        if version == "all":
            self.lookup(name)
            return [self._models[name].versions[v] for v in sorted(self._models[name].versions)]
        return [self.lookup(name, version)]

    async def describe_custom(self, served: ModelVersion) -> dict[str, Any]:
        """The handler's own description (customized=true): a describe call run alone on a worker."""
        request = Request("describe", [], {"describe": "True"})
        job = await self._run(served, request, time.perf_counter_ns(), alone=True,
                              refusal=f'Model "{served.name}" has no worker to serve describe request. '
                                      "Please use scale workers API to add workers.")
        outcome = job.future.result()
        if isinstance(outcome, Failure):
            raise TsError(outcome.code, "InternalServerException", outcome.message)
        return describe_metadata(outcome.body)

    def healthy(self) -> bool:
        """TorchServe's /ping: every model's default version has at least minWorkers ready workers."""
        defaults = [model.versions[model.default] for model in self._models.values()]
        return all(served.pool.ready_workers >= served.min_workers for served in defaults)

    # -- inference -------------------------------------------------------------------------------------

    async def predict(self, name: str, version: str | None, request: Request,
                      arrival_ns: int) -> Answer | Failure:
        """Queue one request on the version's workers and wait for its answer; TsError when refused."""
        job = self.submit(name, version, request, arrival_ns)
        await job.future
        return self.finished(name, version, job)

    def submit(self, name: str, version: str | None, request: Request, arrival_ns: int) -> Job:
        """Queue one request on the version's workers (counted in ts_inference_requests_total); its job's
        future settles with the Answer or Failure. TsError when refused. No task per request: the HTTP
        front end waits on the future itself."""
        served = self.lookup(name, version)
        self.metrics.count_request(name, version)
        return self._queue(served, request, arrival_ns, refusal=no_worker_message(name, version))

    def finished(self, name: str, version: str | None, job: Job) -> Answer | Failure:
        """Record the latencies of a settled job; its outcome (raises what its future holds)."""
        outcome = job.future.result()
        done_ns = time.perf_counter_ns()
        queue_us = (job.start_ns - job.arrival_ns) / 1000 if job.start_ns else None
        self.metrics.record_inference(name, version, (done_ns - job.arrival_ns) / 1000, queue_us)
        return outcome

    async def _run(self, served: ModelVersion, request: Request, arrival_ns: int, *, refusal: str,
                   alone: bool = False) -> Job:
        job = self._queue(served, request, arrival_ns, refusal=refusal, alone=alone)
        await job.future
        return job

    def _queue(self, served: ModelVersion, request: Request, arrival_ns: int, *, refusal: str,
               alone: bool = False) -> Job:
        job = Job(request, arrival_ns, self._loop.create_future(), alone, refusal=refusal)
        if not served.pool.submit(job):
            raise TsError(503, "ServiceUnavailableException", refusal)
        return job

    # -- registration ----------------------------------------------------------------------------------

    async def register(self, request: RegisterRequest, *, startup: bool = False) -> tuple[int, str]:
        """Register an archive of the model store and start its workers: (HTTP status, message)."""
        if request.url is None:
            raise TsError(400, "BadRequestException", "Parameter url is required.")
        if request.runtime is not None and request.runtime not in ("python", "python3", "LSP"):
            raise TsError(400, "BadRequestException", f"Invalid RuntimeType value: {request.runtime}")
        archive = await self._loop.run_in_executor(None, open_archive, self.settings.model_store, request.url,
                                                   request.model_name)
        if request.handler:
            archive.manifest["model"]["handler"] = request.handler
        model = self._models.get(archive.name)
        if model is not None and archive.version in model.versions:
            archive.close()
            raise TsError(409, "ConflictStatusException",
                          f"Model version {archive.version} is already registered for model {archive.name}")
        workers, source = self._initial_workers(archive, request, startup)
        try:
            self._check_workers(source, workers)
        except TsError:
            archive.close()
            raise
        served = self._new_version(archive, request, startup)
        model = self._models.setdefault(archive.name, _Model())
        model.versions[archive.version] = served
        if not model.default:
            model.default = archive.version
        if startup:
            self.startup_models.add(archive.name)
        if workers <= 0:
            return 200, (f'Model "{archive.name}" Version: {archive.version} registered with 0 initial '
                         "workers. Use scale workers API to add workers for the model.")
        status, message = await self._update_workers(served, workers, workers, request.synchronous)
        if status == 200:
            message = (f'Model "{archive.name}" Version: {archive.version} registered with {workers} '
                       "initial workers")
        elif status >= 500:
            message = f"Failed to start workers for model {archive.name} version: {archive.version}"
        return status, message

    def _new_version(self, archive: Archive, request: RegisterRequest, startup: bool) -> ModelVersion:
        configured = self.settings.models.get(archive.name, {}).get(archive.version, {})
        yaml = archive.config

        def choose(given: int, key: str, default: int) -> int:
            if given > 0 or (given == 0 and key == "maxBatchDelay"):
                return given
            for source in (yaml, configured):
                value = source.get(key)
                if isinstance(value, int) and value >= 0:
                    return value
            return default

        batching = Batching(max(1, choose(request.batch_size, "batchSize", 1)),
                            choose(request.max_batch_delay, "maxBatchDelay", 100))
        settings = self.settings
        response_timeout = choose(request.response_timeout, "responseTimeout", settings.default_response_timeout)
        startup_timeout = choose(request.startup_timeout, "startupTimeout", settings.default_startup_timeout)
        max_retry = choose(-1, "maxRetryTimeoutInSec", int(MAX_RETRY_S))

        def record_load_time(worker: Worker) -> None:
            labels = (("WorkerName", f"W-{worker.id}-{archive.name}_{archive.version}"), ("Level", "Host"),
                      ("Hostname", self.metrics.hostname))
            self.metrics.set("WorkerLoadTime", labels, round(worker.load_ms), unit="Milliseconds")

        pool = WorkerPool(archive, batching, settings.job_queue_size, loop=self._loop,
                          worker_ids=self._worker_ids, gpus=self.gpus, metrics=self.metrics,
                          mode=settings.worker_mode, decode_input=settings.decode_input_request,
                          response_timeout_s=response_timeout, startup_timeout_s=startup_timeout,
                          max_retry_s=max_retry, hostname=self.metrics.hostname,
                          max_response_size=settings.max_response_size, on_load=record_load_time, on_batch=self._record_worker_thread_time)
        return ModelVersion(
            archive, pool,
            response_timeout=response_timeout,
            startup_timeout=startup_timeout,
            max_retry_timeout=max_retry,
            loaded_at_startup=startup,
            device_type="gpu" if self.gpus and yaml.get("deviceType") != "cpu" else "cpu",
        )

    def _record_worker_thread_time(self, ms: float) -> None:
        self.metrics.set("WorkerThreadTime", self.metrics.host(), round(ms, 3), unit="Milliseconds")

    def _initial_workers(self, archive: Archive, request: RegisterRequest, startup: bool) -> tuple[int, str]:
        """How many workers a new version starts with, and the setting that said so."""
        configured = self.settings.models.get(archive.name, {}).get(archive.version, {})
        for source in (archive.config, configured):
            low, high = source.get("minWorkers"), source.get("maxWorkers")
            if isinstance(low, int) and low > 0 and isinstance(high, int) and high >= low:
                return low, "minWorkers"
        if request.initial_workers is not None:
            return request.initial_workers, "initial_workers"
        if startup and not self.settings.default_workers_per_model:
            per_device = self.gpus or os.cpu_count() or 1
            return min(per_device, self.settings.max_workers_per_model), "workers per core"
        return self.settings.default_workers_per_model, "default_workers_per_model"

    def _check_workers(self, what: str, count: int) -> None:
        """TsError 400 when `count` workers are more than the server allows per model version."""
        limit = self.settings.max_workers_per_model
        if count > limit:
            raise TsError(400, "BadRequestException", workers_beyond_limit(what, count, limit))

    # -- workers, defaults, removal --------------------------------------------------------------------

    async def scale(self, name: str, version: str | None, min_workers: int, max_workers: int,
                    synchronous: bool) -> tuple[int, str]:
        """Scale a version's workers (TorchServe's ApiUtils.updateModelWorkers): (HTTP status, message)."""
        if max_workers < min_workers:
            raise TsError(400, "BadRequestException", "max_worker cannot be less than min_worker.")
        if min_workers < 0:
            # TorchServe stores the -1, stops every worker, then answers 500 IndexOutOfBoundsException
            # (WorkLoadManager.modelChanged removes index -1): refused here, nothing changed.
            raise TsError(400, "BadRequestException", "min_worker cannot be negative.")
        served = self.lookup(name, version)
        self._check_workers("min_worker", min_workers)
        status, message = await self._update_workers(served, min_workers, max_workers, synchronous)
        if status == 200:
            message = f"Workers scaled to {min_workers} for model: {name}"
            if version:
                message += f", version: {version}"
        elif status >= 500:
            message = f"Failed to start workers for model {name} version: {version}"
        return status, message

    async def _update_workers(self, served: ModelVersion, min_workers: int, max_workers: int,
                              synchronous: bool) -> tuple[int, str]:
        served.min_workers, served.max_workers = min_workers, max_workers
        loaded = served.pool.scale(min_workers)
        loaded.add_done_callback(lambda done: self._after_scale(served, done.result()))
        if not synchronous:
            return 202, "Processing worker updates..."
        ok = await asyncio.shield(loaded)
        return (200, "") if ok else (500, "")

    @staticmethod
    def _after_scale(served: ModelVersion, ok: bool) -> None:
        if not ok:
            served.min_workers = served.max_workers = 0

    def set_default(self, name: str, version: str) -> str:
        model = self._models.get(name)
        if model is None:
            raise TsError(404, "ModelNotFoundException", f"Model not found: {name}")
        if version not in model.versions:
            raise TsError(404, "ModelVersionNotFoundException",
                          f"Model version {version} does not exist for model {name}")
        model.default = version
        return f'Default version successfully updated for model "{name}" to "{version}"'

    def unregister(self, name: str, version: str | None) -> str:
        model = self._models.get(name)
        if model is None:
            raise TsError(404, "ModelNotFoundException", f"Model not found: {name}")
        version = model.default if version is None else version
        if version not in model.versions:
            raise TsError(404, "ModelVersionNotFoundException",
                          f"Model version: {version} does not exist for model: {name}")
        if version == model.default and len(model.versions) > 1:
            raise TsError(403, "InvalidModelVersionException",
                          f"Cannot remove default version for model {name}")
        self._remove(model.versions.pop(version))
        if not model.versions:
            del self._models[name]
            self.startup_models.discard(name)
        return f'Model "{name}" unregistered'

    def _remove(self, served: ModelVersion) -> None:
        served.pool.close()  # the jobs still queued are answered 503
        served.archive.close()

    def close(self) -> None:
        """Stop every worker, end their processes and remove the unpacked archives (the server is
        stopping)."""
        for model in self._models.values():
            for served in model.versions.values():
                self._remove(served)
                served.pool.terminate()
        self._models.clear()
