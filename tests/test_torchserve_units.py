"""Pieces of the TorchServe-compatible server that need no server: config.properties, Gson's JSON,
Java's doubles, TorchServe's backend answer format, the job queue and its batches, the GPU count of a
torch build without GPU support (and a front end without models, which imports no torch)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers.torchserve import load_settings, read_properties
from servers.torchserve.__main__ import _built_without_gpu, _torch_may_see_a_gpu
from servers.torchserve._archive import Archive
from servers.torchserve._config import Address
from servers.torchserve._handler import Request, decode_predict_response, decode_value, parse_json
from servers.torchserve._metrics import HandlerMetrics, MetricsStore, java_double
from servers.torchserve._wire import TsError, error_reply, format_reply, gson, json_reply
from servers.torchserve._workers import Batching, Job, JobQueue, WorkerPool
from tests.support.processes import stop_process
from tests.support.torchserve import start_torchserve

PROPERTIES = r"""
# a comment
! another
inference_address=http://0.0.0.0:9080
management_address : http://127.0.0.1:9081
metrics_address http://127.0.0.1:9082
grpc_inference_port=9070
model_store=/models
load_models=a.mar, b=b.mar
models={\
  "mlp": {\
    "1.0": {"batchSize": 8, "maxBatchDelay": 5, "minWorkers": 2, "maxWorkers": 2}\
  }\
}
default_workers_per_model=3
job_queue_size=7
disable_token_authorization=true
enable_model_api=true
metrics_mode=prometheus
unknown_key=is ignored
"""


def test_properties_as_torchserve_reads_them() -> None:
    props = read_properties(PROPERTIES)
    settings, problems = load_settings(props, environ={})
    assert problems == []
    assert settings.inference == Address("0.0.0.0", 9080)
    assert settings.management == Address("127.0.0.1", 9081)
    assert settings.metrics == Address("127.0.0.1", 9082)
    assert settings.grpc_inference == Address("127.0.0.1", 9070)
    assert settings.grpc_management == Address("127.0.0.1", 7071)
    assert str(settings.model_store) == "/models" and settings.load_models == ["a.mar", "b=b.mar"]
    mlp = {"batchSize": 8, "maxBatchDelay": 5, "minWorkers": 2, "maxWorkers": 2}
    assert settings.models == {"mlp": {"1.0": mlp}}
    assert (settings.default_workers_per_model, settings.job_queue_size) == (3, 7)
    assert (settings.token_auth, settings.model_api, settings.metrics_mode) == (False, True, "prometheus")


def test_defaults_are_torchserves() -> None:
    settings, problems = load_settings({}, environ={})
    assert problems == []
    assert (settings.inference.port, settings.management.port, settings.metrics.port) == (8080, 8081, 8082)
    assert (settings.grpc_inference.port, settings.grpc_management.port) == (7070, 7071)
    assert settings.token_auth and not settings.model_api and settings.metrics_mode == "log"
    assert (settings.job_queue_size, settings.max_request_size) == (100, 6553500)
    assert settings.default_workers_per_model == 0
    assert settings.worker_mode == "process"  # TorchServe's workers are processes
    assert load_settings({"worker_mode": "Thread"}, environ={})[0].worker_mode == "thread"


def test_every_bad_setting_is_reported_at_once() -> None:
    props = {"inference_address": "https://127.0.0.1:8443", "management_address": "nonsense",
             "job_queue_size": "many", "metrics_mode": "loud", "models": "{not json",
             "enable_model_api": "yes", "worker_mode": "fibers",
             "grpc_management_port": "99999"}
    _, problems = load_settings(props, environ={})
    assert len(problems) == 8, problems
    assert "worker_mode: expected process or thread, got 'fibers'" in problems
    assert any("https is not supported" in problem for problem in problems)
    assert any(problem.startswith("job_queue_size") for problem in problems)


def test_environment_overrides_only_when_enabled() -> None:
    environ = {"TS_JOB_QUEUE_SIZE": "5", "TS_ENABLE_MODEL_API": "true"}
    settings, _ = load_settings({"job_queue_size": "9"}, environ=environ)
    assert settings.job_queue_size == 9 and not settings.model_api
    settings, _ = load_settings({"job_queue_size": "9", "enable_envvars_config": "true"}, environ=environ)
    assert settings.job_queue_size == 5 and settings.model_api


def test_gson_pretty_printing_and_html_escapes() -> None:
    assert gson({"status": "Healthy"}) == '{\n  "status": "Healthy"\n}'
    assert gson({"a": [], "b": {}, "c": "x=<y>&'z'"}) == \
        '{\n  "a": [],\n  "b": {},\n  "c": "x\\u003d\\u003cy\\u003e\\u0026\\u0027z\\u0027"\n}'
    assert json.loads(gson({"c": "x=<y>"})) == {"c": "x=<y>"}


def test_replies_carry_torchserves_headers() -> None:
    ok = format_reply(json_reply({"status": "Healthy"}))
    head, body = ok.split(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "content-type", "x-request-id", "Pragma", "Cache-Control", "Expires", "content-length", "connection"]
    assert lines[-1] == "connection: keep-alive" and body == b'{\n  "status": "Healthy"\n}\n'
    error = format_reply(error_reply(TsError(404, "ModelNotFoundException", "Model not found: x")))
    assert error.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"\r\nconnection: close\r\n" in error


@pytest.mark.parametrize(("value", "text"), [
    (6.0, "6.0"), (100567.57, "100567.57"), (23336.6484375, "23336.6484375"), (0.0, "0.0"), (1e7, "1.0E7"),
    (12345678.0, "1.2345678E7"), (0.0005, "5.0E-4"), (-3.5e8, "-3.5E8"), (float("inf"), "+Inf"),
])
def test_java_double(value: float, text: str) -> None:
    assert java_double(value) == text


def test_backend_answers_decode_as_torchserve_encodes_them() -> None:
    """ts.protocol.otf_message_handler.create_predict_response (TorchServe's own encoder) round trip."""
    from ts.context import Context, RequestProcessor
    from ts.protocol.otf_message_handler import create_predict_response

    context = Context("m", "/tmp", {}, 2, None, "0.12.0")
    context.request_processor = [RequestProcessor({}), RequestProcessor({})]
    context.set_response_status(201, "Made", 1)
    context.set_response_header(1, "x-extra", "yes")
    context.set_response_content_type(1, "text/plain")
    message = create_predict_response([[1.5, 2.0], "text"], {0: "id-a", 1: "id-b"}, "Prediction success", 200,
                                      context)
    code, text, answers = decode_predict_response(bytes(message))
    assert (code, text) == (200, "Prediction success")
    first, second = answers["id-a"], answers["id-b"]
    assert first[:5] == (200, "", None, (), b"[\n  1.5,\n  2.0\n]")
    assert (second.status, second.reason, second.content_type, second.body) == (201, "Made", "text/plain",
                                                                                 b"text")
    assert ("x-extra", "yes") in second.headers
    failed = create_predict_response(None, {0: "id-a"}, "Prediction failed", 503)
    assert decode_predict_response(bytes(failed))[:2] == (503, "Prediction failed")


def test_handler_metrics_reach_the_page() -> None:
    store = MetricsStore("host")
    metrics = HandlerMetrics(store, "mlp")
    metrics.add_time("HandlerTime", 1.25, None, "ms")
    metrics.add_counter("Served", 2)
    metrics.add_counter("Served", 3)
    page = store.render("prometheus")
    assert 'HandlerTime{ModelName="mlp",Level="Model",Hostname="host",} 1.25' in page
    assert "# TYPE Served counter" in page
    assert 'Served{ModelName="mlp",Level="Model",Hostname="host",} 5.0' in page
    assert store.render("log") == ""
    legacy = store.render("legacy")
    assert "HandlerTime" not in legacy and "# TYPE ts_inference_requests_total counter" in legacy


def _job(value: object, loop: asyncio.AbstractEventLoop, alone: bool = False) -> Job:
    request = Request(str(value), [("body", "text/plain", str(value).encode())])
    return Job(request, time.perf_counter_ns(), loop.create_future(), alone)


def test_job_queue_is_a_bounded_fifo() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = JobQueue(2)
        assert queue.offer(_job(1, loop)) and queue.offer(_job(2, loop)) and not queue.offer(_job(3, loop))
        first, second = queue.take(), queue.take()
        assert (first.request.request_id, second.request.request_id) == ("1", "2")
        assert queue.take() is None and queue.peek() is None
        queue.offer(_job(4, loop))
        queue.put_front([first, second])  # taken but not run: back first, in their order
        assert [job.request.request_id for job in queue.drain()] == ["1", "2", "4"]
        assert len(queue) == 0
    finally:
        loop.close()


BATCH_PROBE = '''
import os
import time


def handle(data, context):
    if data is None:
        return None
    bodies = [str(row.get("body")) for row in data]
    if "slow" in bodies:
        time.sleep(0.2)
    return [{"batch": bodies, "pid": os.getpid()}] * len(data)
'''


def _probe_archive(folder) -> Archive:
    (folder / "probe.py").write_text(BATCH_PROBE)
    manifest = {"runtime": "python", "model": {"modelName": "probe", "modelVersion": "1.0", "handler": "probe.py"}}
    return Archive("probe.mar", folder, manifest)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_batches_form_as_torchserve_polls_them(mode: str, tmp_path) -> None:
    """One worker running a real handler: a batch takes what is queued up to batch_size; a lone job
    waits max_batch_delay for company; a describe job runs alone and is not pulled into another batch.
    In process mode the handler runs in another process."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        store = MetricsStore("host")
        pool = WorkerPool(_probe_archive(tmp_path), Batching(batch_size=3, max_batch_delay_ms=80), 100,
                          loop=loop, worker_ids=iter(range(9000, 9100)).__next__, gpus=0, metrics=store,
                          mode=mode)
        assert await asyncio.wait_for(pool.scale(1), 60)
        try:
            async def batches(*jobs: Job) -> list[list[str]]:
                for job in jobs:
                    assert pool.submit(job)
                answers = [json.loads((await job.future).body) for job in jobs]
                return [answer["batch"] for answer in answers]

            jobs = [_job(value, loop) for value in range(5)]
            assert await batches(*jobs) == [["0", "1", "2"]] * 3 + [["3", "4"]] * 2
            waited = (jobs[3].start_ns - jobs[0].start_ns) / 1e9  # [3, 4] waited 80 ms for a third job
            assert 0.08 <= waited < 2.0, waited
            busy = [_job("slow", loop), _job("a", loop), _job("b", loop)]
            alone = _job("describe", loop, alone=True)
            got = await batches(*busy, _job(5, loop), alone, _job(6, loop))
            assert got[3:] == [["5"], ["describe"], ["6"]]
            pid = json.loads(jobs[0].future.result().body)["pid"]
            assert (pid != os.getpid()) == (mode == "process")
            assert pool.workers[0].describe()["pid"] == pid
        finally:
            pool.close()
            pool.terminate()

    asyncio.run(scenario())


def test_command_line_reports_every_bad_setting_and_exits_2(tmp_path) -> None:
    config = tmp_path / "config.properties"
    config.write_text("inference_address=https://127.0.0.1:8443\njob_queue_size=many\n")
    done = subprocess.run([sys.executable, "-m", "servers.torchserve", "--ts-config", str(config),
                           "--model-store", str(tmp_path / "absent"), "--metrics-port", "70000"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, done.stderr


TORCH_VERSION_PY = """from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '2.13.0+{build}'
debug = False
cuda: Optional[str] = {cuda}
git_version = 'cf30153c4c131c8164ee7798e5022d810682e2cb'
hip: Optional[str] = {hip}
rocm: Optional[str] = None
xpu: Optional[str] = None
"""
"""torch/version.py as the torch 2.13 wheels write it (the CPU wheel's, with `cuda` and `hip` filled in)."""


@pytest.mark.parametrize(("build", "cuda", "hip", "without_gpu"), [
    ("cpu", "None", "None", True), ("cu128", "'12.8'", "None", False), ("rocm6.4", "None", "'6.4.43482'", False)])
def test_a_torch_build_without_gpu_support_is_told_by_its_version_file(tmp_path, build: str, cuda: str, hip: str,
                                                                       without_gpu: bool) -> None:
    version = tmp_path / "version.py"
    version.write_text(TORCH_VERSION_PY.format(build=build, cuda=cuda, hip=hip))
    assert _built_without_gpu(version) is without_gpu


def test_a_version_file_that_cannot_be_read_means_torch_is_asked(tmp_path) -> None:
    assert not _built_without_gpu(tmp_path / "absent.py")
    (tmp_path / "version.py").write_text("cuda = (\n")
    assert not _built_without_gpu(tmp_path / "version.py")
    (tmp_path / "version.py").write_text("cuda = None\n")  # no hip: an unknown layout
    assert not _built_without_gpu(tmp_path / "version.py")


def test_the_installed_torch_is_judged_as_torch_itself_says(tmp_path) -> None:
    """The installed torch's version file against torch.version, and a front end started without models
    (here, with that torch) has torch in its memory exactly when its build may see a GPU."""
    import torch

    assert _torch_may_see_a_gpu() is not (torch.version.cuda is None and torch.version.hip is None)
    store = tmp_path / "store"
    store.mkdir()
    server = start_torchserve(store, tmp_path, "--disable-token-auth", grpc=False)
    try:
        mapped = Path(f"/proc/{server.server.proc.pid}/maps").read_text()
    finally:
        stop_process(server.server.proc)
    assert ("libtorch" in mapped) is _torch_may_see_a_gpu(), "libtorch in the front end's memory"


def test_loadgen_serve_torchserve_is_the_server() -> None:
    done = subprocess.run([sys.executable, "-m", "loadgen", "serve", "torchserve", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    assert "usage: loadgen serve torchserve" in done.stdout and "--model-store" in done.stdout


JSON_EDGES = [
    b"[1] x", b"[123456789012345678901234567890]", b"-9223372036854775809", b"9007199254740993", b"1e400",
    b"-1e400", b"1e-400", b"-0.0", b"-0", b"1E5", b"1.5E-3", b"NaN", b"[NaN, Infinity, -Infinity]", b"nan",
    b'{"a": 1, "a": 2, "b": 3}', b'{"a": 1, "b": 3, "a": [2]}', b'"\\ud800"', b'"\\ud83d\\ude00"',
    b'"\\uDFFF\\uD800"', b'"a\nb"', b'"a\tb"', b'"\x01"', b'"\\u0000"', b"01", b"1.", b".5", b"+1", b"-",
    b"", b" ", b"\xef\xbb\xbf[1]", b" [1, 2] \n", b"\x0b[1]", b"\x0c[1]", b"[1,]", b"[,1]", b'{"a":}',
    b"tru", b"true", b"null", b'"\\x"', b"[" * 300 + b"]" * 300, b"[" * 3000 + b"]" * 3000, b'"\xff"',
    b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'{"\xc3\xa9": 1}', b"0x10", b"1_000", b"[1 2]", b"{'a': 1}",
    b"[1]\x00", b"4.9e-324", b"2.4703282292062328e-324", b"2.4703282292062327e-324",
    b"1.00000000000000011102230246251565404236316680908203125",
    b"1.00000000000000011102230246251565404236316680908203124", b"[true, false, null, {}, []]",
]


def _loads(data: bytes) -> tuple[str, str]:
    try:
        return "ok", repr(json.loads(data.decode("utf-8")))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return "error", type(exc).__name__


def _parsed(data: bytes) -> tuple[str, str]:
    try:
        return "ok", repr(parse_json(data))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return "error", type(exc).__name__


def test_json_inputs_decode_as_json_loads_does() -> None:
    """The backend's JSON parser gives json.loads's value (same types, same repr) or fails where it
    fails, on edge cases and on 30,000 random floats (doubles' shortest repr, long decimals,
    exponents near the limits)."""
    rng = random.Random(5)
    numbers = []
    for _ in range(10_000):
        numbers.append(repr(struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]).encode())
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30))).lstrip("0") or "0"
        fraction = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25)))
        numbers.append(f"-{digits}.{fraction}e{rng.randint(-340, 320)}".encode())
        numbers.append(f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 20)}f}".encode())
    for data in [*JSON_EDGES, *numbers, b"[" + b", ".join(numbers[:784]) + b"]"]:
        expected = _loads(data)
        assert _parsed(data)[0] == expected[0], data[:80]
        if expected[0] == "ok":
            assert _parsed(data) == expected, data[:80]
    assert decode_value("application/json", b"{bad", True) == b"{bad"
    assert decode_value("application/json", b"[1.5]", False) == b"[1.5]"
    assert decode_value("text/plain", "é".encode(), True) == "é"
