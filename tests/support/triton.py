"""What the Triton-compatible server's tests share: sample inputs for each built-in model, the check that
an answer equals the model run in-process, a model of known service time, --input-data files with
validation data for mlp, and the server started with both front ends (`start_fronts`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from servers.models.builtin import MLP, builtin_models
from tests.support.processes import ROOT, pin, stop_process

MODELS = builtin_models()


def sample_input(name: str, batch: int) -> np.ndarray:
    """INPUT0 for model `name` with `batch` rows (seeded by the batch size)."""
    rng = np.random.default_rng(batch)
    if name == "identity_bytes":
        return np.array([[f"row{b}-{i}".encode() for i in range(3)] for b in range(batch)], dtype=object)
    width = 16 if name == "mlp" else 5
    return rng.standard_normal((batch, width)).astype(np.float32)


def assert_matches(name: str, got: np.ndarray, data: np.ndarray) -> None:
    """`got` equals the model's own output for `data`: exactly, but allclose for the float mlp."""
    expected = MODELS[name].infer({"INPUT0": data})["OUTPUT0"]
    assert got.shape == expected.shape
    if name == "mlp":
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    elif name == "identity_bytes":
        as_bytes = [item if isinstance(item, bytes) else item.encode() for item in got.ravel()]
        assert as_bytes == list(expected.ravel())
    else:
        np.testing.assert_array_equal(got, expected)


_PACED = textwrap.dedent('''
    import time
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                time.sleep({service_s})
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", x)]))
            return responses
''')


def write_paced_model(repository: Path, service_s: float, width: int, instances: int = 1,
                      name: str = "paced") -> None:
    """A Python-backend identity model (FP32 [width], no batching) that sleeps `service_s` a request,
    with `instances` execution instances: its capacity is instances / service_s requests a second."""
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "1" / "model.py").write_text(_PACED.format(service_s=service_s))
    (repository / name / "config.pbtxt").write_text(
        f'backend: "python"\nmax_batch_size: 0\ninstance_group [ {{ count: {instances} }} ]\n'
        f'input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {width} ] }} ]\n'
        f'output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {width} ] }} ]\n')


def mlp_input_data(path: Path, wrong: bool = False) -> Path:
    """A perf_analyzer-style --input-data file for mlp at `path`: three rows, each with its validation
    data (the model's output computed here; `wrong` adds 1 to every expected value)."""
    model, rng = MLP(), np.random.default_rng(3)
    data, expected = [], []
    for _ in range(3):
        row = rng.standard_normal((1, 16)).astype(np.float32)
        out = model.infer({"INPUT0": row})["OUTPUT0"] + (1.0 if wrong else 0.0)
        data.append({"INPUT0": {"content": row.ravel().tolist(), "shape": [1, 16]}})
        expected.append({"OUTPUT0": {"content": out.ravel().tolist(), "shape": [1, 10]}})
    path.write_text(json.dumps({"data": data, "validation_data": expected}))
    return path


@dataclass
class Fronts:
    proc: subprocess.Popen
    lines: list[str]
    grpc_url: str
    http_url: str


def start_fronts(*args: str, timeout: float = 20.0) -> Fronts:
    """`python -m servers.triton --http-port 0 --grpc-port 0 ARGS`; reads every line up to the http one."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "servers.triton", "--http-port", "0", "--grpc-port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    pin(proc.pid, 1)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line.strip())
        if line.startswith("listening on http://"):
            grpc_line = next((seen for seen in lines if seen.startswith("grpc listening on ")), "")
            return Fronts(proc, lines, grpc_line.split()[-1], line.split()[-1].removeprefix("http://"))
    stop_process(proc)
    raise RuntimeError(f"servers.triton did not start: {proc.stderr.read()}")
