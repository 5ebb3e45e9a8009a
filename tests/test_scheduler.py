"""The per-version scheduler (servers/triton/_scheduler.py): instances, dynamic batching, own rows back.

The model here takes a known time per execution (it sleeps, releasing the GIL as a real backend does)
and remembers each batch it ran, so the tests check how requests were grouped, not only the outputs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from servers.core.model import Model, RequestError, TensorSpec
from servers.triton._scheduler import Batching, Scheduler
from servers.triton._stats import ModelStats
from servers.triton.repository import load_model
from tests.support.timing import HostNoise


class _Scaled(Model):
    """OUTPUT0 = INPUT0 * 2 after `service_s` seconds; refuses rows whose first value is negative."""

    max_batch_size = 16
    inline = False
    inputs = (TensorSpec("INPUT0", "FP32", (4,)),)
    outputs = (TensorSpec("OUTPUT0", "FP32", (4,)),)

    def __init__(self, service_s: float = 0.02, name: str = "scaled") -> None:
        self.name = name
        self.service_s = service_s
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.closed = False

    def infer_batch(self, requests: list[dict[str, np.ndarray]]) -> list:
        self.batches.append(sum(request["INPUT0"].shape[0] for request in requests))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.service_s)
        return [RequestError("negative input") if request["INPUT0"][0, 0] < 0 else
                {"OUTPUT0": request["INPUT0"] * 2} for request in requests]

    def close(self) -> None:
        self.closed = True


def _request(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"INPUT0": np.full((rows, 4), value, dtype=np.float32)}


async def _submit_all(scheduler: Scheduler, values: list[float], rows: int = 1, gap_s: float = 0.0) -> list:
    tasks = []
    for value in values:
        tasks.append(asyncio.ensure_future(scheduler.submit(_request(value, rows), rows, time.perf_counter_ns())))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_without_batching_each_request_is_one_execution() -> None:
    model = _Scaled(0.005)
    scheduler = Scheduler([model], ModelStats(model), None)
    results = asyncio.run(_submit_all(scheduler, [float(i) for i in range(8)]))
    assert model.batches == [1] * 8
    for value, result in zip(range(8), results):
        assert np.array_equal(result.outputs["OUTPUT0"], _request(value)["INPUT0"] * 2)
    assert scheduler.stats.snapshot()["execution_count"] == 8


def test_busy_instance_lets_a_batch_form_and_each_request_gets_its_own_rows(host_noise: HostNoise) -> None:
    model = _Scaled(0.03)
    stats = ModelStats(model)
    scheduler = Scheduler([model], stats, Batching())
    values = [float(i) for i in range(1, 17)]
    results = asyncio.run(_submit_all(scheduler, values))
    # the first request starts alone; the other 15 queue behind it (submitted within microseconds, long
    # before its 30 ms are over) and leave as one batch
    host_noise.assert_holds(model.batches == [1, 15], what=f"batches {model.batches}", margin_ms=30.0)
    for value, result in zip(values, results):
        assert np.array_equal(result.outputs["OUTPUT0"], np.full((1, 4), value * 2, dtype=np.float32))
    snapshot = stats.snapshot()
    assert snapshot["execution_count"] == 2 and snapshot["inference_count"] == 16
    assert [entry["batch_size"] for entry in snapshot["batch_stats"]] == [1, 15]


def test_queue_delay_gathers_requests_up_to_the_largest_preferred_size(host_noise: HostNoise) -> None:
    model = _Scaled(0.001)
    scheduler = Scheduler([model], ModelStats(model), Batching((4, 8), max_queue_delay_us=200_000))
    started = time.perf_counter()
    results = asyncio.run(_submit_all(scheduler, [float(i) for i in range(8)], gap_s=0.002))
    elapsed = time.perf_counter() - started
    # eight requests 2 ms apart (about 20 ms in all) fill the preferred 8 long before the 200 ms delay ends
    host_noise.assert_holds(model.batches == [8], what=f"batches {model.batches}", margin_ms=150.0)
    host_noise.assert_below(elapsed, 0.15, what="seconds to answer all eight", quantile="max", unit=1000.0)
    assert all(not isinstance(result, BaseException) for result in results)


def test_expired_delay_sends_the_largest_preferred_size_the_queue_fills(host_noise: HostNoise) -> None:
    model = _Scaled(0.001)
    scheduler = Scheduler([model], ModelStats(model), Batching((4, 8), max_queue_delay_us=30_000))
    started = time.perf_counter()
    results = asyncio.run(_submit_all(scheduler, [float(i) for i in range(6)]))
    elapsed = time.perf_counter() - started
    # six queued rows never reach 8: after the 30 ms delay a preferred 4 leaves, then the other 2
    assert model.batches[0] == 4 and sum(model.batches) == 6
    assert 0.03 <= elapsed
    host_noise.assert_below(elapsed, 0.5, what="seconds to answer all six", quantile="max", unit=1000.0)
    assert [float(result.outputs["OUTPUT0"][0, 0]) for result in results] == [2.0 * i for i in range(6)]


def test_requests_are_never_split_and_never_exceed_max_batch_size() -> None:
    model = _Scaled(0.02)
    scheduler = Scheduler([model], ModelStats(model), Batching())
    results = asyncio.run(_submit_all(scheduler, [float(i) for i in range(1, 9)], rows=6))
    assert all(size <= 16 and size % 6 == 0 for size in model.batches)
    assert sum(model.batches) == 48
    for value, result in zip(range(1, 9), results):
        assert result.outputs["OUTPUT0"].shape == (6, 4)
        assert np.all(result.outputs["OUTPUT0"] == value * 2)


class _Lengths(_Scaled):
    """OUTPUT0 = INPUT0 * 2 for INPUT0 of any length (dims [-1]), stacked by Model.infer_batch; remembers
    each execution's input shape."""

    inputs = (TensorSpec("INPUT0", "FP32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "FP32", (-1,)),)

    def __init__(self, service_s: float) -> None:
        super().__init__(service_s, name="lengths")
        self.shapes: list[tuple[int, ...]] = []

    def infer_batch(self, requests: list[dict[str, np.ndarray]]) -> list:
        return Model.infer_batch(self, requests)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.shapes.append(inputs["INPUT0"].shape)
        time.sleep(self.service_s)
        return {"OUTPUT0": inputs["INPUT0"] * 2}


def test_only_requests_of_the_same_shapes_batch_together(host_noise: HostNoise) -> None:
    model = _Lengths(0.03)
    scheduler = Scheduler([model], ModelStats(model), Batching())
    lengths = [4, 3, 3, 5, 5, 3]

    async def scenario() -> list:
        tasks = [asyncio.ensure_future(scheduler.submit({"INPUT0": np.full((1, length), float(i), np.float32)}, 1,
                                                        time.perf_counter_ns()))
                 for i, length in enumerate(lengths)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    # the first runs alone; behind it, a batch ends where the next request's length differs
    host_noise.assert_holds(model.shapes == [(1, 4), (2, 3), (2, 5), (1, 3)], what=str(model.shapes),
                            margin_ms=30.0)  # all six are queued before the first 30 ms execution ends
    for i, (length, result) in enumerate(zip(lengths, results)):
        assert np.array_equal(result.outputs["OUTPUT0"], np.full((1, length), 2.0 * i, np.float32))


def test_instances_run_in_parallel_on_their_own_threads(host_noise: HostNoise) -> None:
    instances = [_Scaled(0.05, name="scaled") for _ in range(4)]
    scheduler = Scheduler(instances, ModelStats(instances[0]), None)
    started = time.perf_counter()
    asyncio.run(_submit_all(scheduler, [1.0] * 4))
    elapsed = time.perf_counter() - started
    # four 50 ms executions at once, not one after the other (200 ms)
    host_noise.assert_below(elapsed, 0.15, what="seconds for four executions", quantile="max", unit=1000.0)
    assert all(instance.batches == [1] for instance in instances)
    assert len({name for instance in instances for name in instance.threads}) == 4


def test_a_refused_request_fails_alone_and_the_rest_of_its_batch_succeeds() -> None:
    model = _Scaled(0.02)
    scheduler = Scheduler([model], ModelStats(model), Batching())
    results = asyncio.run(_submit_all(scheduler, [1.0, 2.0, -1.0, 3.0]))
    assert isinstance(results[2], RequestError)
    assert [float(results[i].outputs["OUTPUT0"][0, 0]) for i in (0, 1, 3)] == [2.0, 4.0, 6.0]


def test_queue_time_is_the_wait_for_the_instance(host_noise: HostNoise) -> None:
    model = _Scaled(0.04)
    scheduler = Scheduler([model], ModelStats(model), None)
    first, second = asyncio.run(_submit_all(scheduler, [1.0, 2.0]))
    host_noise.assert_below(first.queue_ns, 10_000_000, what="first request's queue time (ns)",
                            quantile="max", unit=1e-6)
    assert 30_000_000 <= second.queue_ns  # waited for the first execution (40 ms)
    assert first.infer_ns >= 40_000_000


def test_close_fails_waiting_requests_and_releases_instances(host_noise: HostNoise) -> None:
    model = _Scaled(0.05)
    scheduler = Scheduler([model], ModelStats(model), None)

    async def scenario() -> list:
        tasks = [asyncio.ensure_future(scheduler.submit(_request(1.0), 1, time.perf_counter_ns())) for _ in range(3)]
        await asyncio.sleep(0.01)
        scheduler.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(RuntimeError, match="unloaded"):
            await scheduler.submit(_request(1.0), 1, time.perf_counter_ns())
        return results

    results = asyncio.run(scenario())
    assert not isinstance(results[0], BaseException)  # already running: it finishes
    assert all(isinstance(result, RuntimeError) for result in results[1:])
    time.sleep(0.1)
    # the instance closes once its running execution is over, when the results are in: 0.1 s to spare
    host_noise.assert_holds(model.closed, what="the instance was not closed 0.1 s after the results",
                            margin_ms=100.0)


def _loop_factories() -> list:
    factories = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.mark.parametrize("loop_factory", _loop_factories())
def test_a_sub_millisecond_queue_delay_is_kept_to_the_microsecond_scale(loop_factory,
                                                                       host_noise: HostNoise) -> None:
    # A lone request (1 row of 16) waits out max_queue_delay_microseconds: 500. Loop timers round
    # that up to 1 ms (and wake late); the delay must hold it 500 us, give or take the wake-up.
    model = _Scaled(0.0)
    scheduler = Scheduler([model], ModelStats(model), Batching(max_queue_delay_us=500))

    async def one_at_a_time() -> list[int]:
        waits = []
        for value in range(41):
            executed = await scheduler.submit(_request(float(value)), 1, time.perf_counter_ns())
            waits.append(executed.queue_ns)
            await asyncio.sleep(0.002)
        return waits[1:]  # the first one also pays for making the timer

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        waits_us = sorted(wait / 1000 for wait in runner.run(one_at_a_time()))
    scheduler.close()
    assert model.batches == [1] * 41
    assert waits_us[0] >= 500  # never leaves before the delay
    median, p90 = waits_us[len(waits_us) // 2], waits_us[len(waits_us) * 9 // 10]
    # timers rounded to the loop's millisecond would hold it 1000 us or more: the caps keep that failing
    host_noise.assert_below(median, 700, what="median queue time (us)", quantile="p50", cap_ms=0.25,
                            unit=0.001)
    host_noise.assert_below(p90, 900, what="p90 queue time (us)", quantile="p90", cap_ms=0.1, unit=0.001)


class _Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class _ThreadProbe(Model):
    """An instance as the scheduler sees it: runs the backend's instance, then reads torch's intra-op
    thread count on the thread that ran it (the instance thread)."""

    def __init__(self, instance: Model) -> None:
        self.instance = instance
        self.name, self.max_batch_size = instance.name, instance.max_batch_size
        self.inputs, self.outputs = instance.inputs, instance.outputs
        self.seen: list[tuple[str, int]] = []

    def infer_batch(self, requests: list[dict[str, np.ndarray]]) -> list:
        results = self.instance.infer_batch(requests)
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))
        return results

    def close(self) -> None:
        self.instance.close()


def _torchscript_doubler(repository: Path, name: str, threads: int) -> None:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(_Doubler()), str(folder / "1" / "model.pt"))
    (folder / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 4\ninstance_group [ { count: 2 kind: KIND_CPU } ]\n'
        'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        f'parameters {{ key: "INTRA_OP_THREAD_COUNT" value: {{ string_value: "{threads}" }} }}\n')


def test_intra_op_thread_count_reaches_the_instance_threads(tmp_path: Path) -> None:
    # torch.set_num_threads sets the count a thread takes when it first uses torch. So when a second
    # model with another count loads before the first model's instance threads ran anything, those
    # threads would take the second count: the backend sets its own on each instance thread.
    default = torch.get_num_threads()
    wanted, other = default + 1, default + 2
    _torchscript_doubler(tmp_path, "first", wanted)
    _torchscript_doubler(tmp_path, "second", other)
    try:
        first = load_model(tmp_path, "first", allow_python_backend=True).versions["1"].instances
        probes = [_ThreadProbe(instance) for instance in first]
        scheduler = Scheduler(probes, ModelStats(probes[0]), None)  # its two threads start, idle
        second = load_model(tmp_path, "second", allow_python_backend=True).versions["1"].instances
        fresh: list[int] = []
        untouched = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        untouched.start()
        untouched.join()
        assert fresh == [other]  # what a thread that never set its own count now takes

        async def four() -> list:
            requests = [{"INPUT__0": np.full((1, 4), value, np.float32)} for value in (1.0, 2.0, 3.0, 4.0)]
            return await asyncio.gather(*(scheduler.submit(request, 1, time.perf_counter_ns())
                                          for request in requests))

        results = asyncio.run(four())
        scheduler.close()
        for instance in second:
            instance.close()
    finally:
        torch.set_num_threads(default)
    assert [float(result.outputs["OUTPUT__0"][0, 0]) for result in results] == [2.0, 4.0, 6.0, 8.0]
    seen = [pair for probe in probes for pair in probe.seen]
    assert len({name for name, _ in seen}) == 2  # both instance threads ran
    assert {count for _, count in seen} == {wanted}
