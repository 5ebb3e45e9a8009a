"""What the Triton-compatible server's HTTP and gRPC tests share: sample inputs for each built-in
model, and the check that an answer equals the model run in-process."""

from __future__ import annotations

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
