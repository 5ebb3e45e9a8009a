"""What the Triton-compatible server's HTTP and gRPC tests share: sample inputs for each built-in
model, the check that an answer equals the model run in-process, and a model of known service time."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from servers.models.builtin import builtin_models

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
