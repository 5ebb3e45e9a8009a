"""Built-in reference models, made in code from a seed: identity (FP32), identity_bytes, mlp.

They give the Triton-compatible server (servers/triton) something to host without a model repository,
and give tests an exact expected answer: run the same model in-process and compare.
"""

from __future__ import annotations

import numpy as np

from servers.core.model import Model, TensorSpec

__all__ = ["MLP", "Identity", "builtin_models"]


class Identity(Model):
    """OUTPUT0 = INPUT0 for any length; batches up to 8."""

    max_batch_size = 8

    def __init__(self, name: str = "identity", datatype: str = "FP32") -> None:
        self.name = name
        self.inputs = (TensorSpec("INPUT0", datatype, (-1,)),)
        self.outputs = (TensorSpec("OUTPUT0", datatype, (-1,)),)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"]}


class MLP(Model):
    """Two dense layers with a ReLU between: FP32 [16] -> [hidden] -> [10]; batches up to 32.

    Weights come from numpy's default_rng(seed), so every process with the same seed and hidden size
    computes the same function.
    """

    max_batch_size = 32
    in_features = 16
    out_features = 10

    def __init__(self, name: str = "mlp", hidden: int = 64, seed: int = 0) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.name = name
        self.inputs = (TensorSpec("INPUT0", "FP32", (self.in_features,)),)
        self.outputs = (TensorSpec("OUTPUT0", "FP32", (self.out_features,)),)
        rng = np.random.default_rng(seed)
        self.w1 = (rng.standard_normal((self.in_features, hidden)) / np.sqrt(self.in_features)).astype(np.float32)
        self.b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
        self.w2 = (rng.standard_normal((hidden, self.out_features)) / np.sqrt(hidden)).astype(np.float32)
        self.b2 = (rng.standard_normal(self.out_features) * 0.1).astype(np.float32)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hidden = np.maximum(inputs["INPUT0"] @ self.w1 + self.b1, np.float32(0))
        return {"OUTPUT0": (hidden @ self.w2 + self.b2).astype(np.float32, copy=False)}


def builtin_models(mlp_hidden: int = 64, seed: int = 0) -> dict[str, Model]:
    """A fresh set of the built-in models by name.

    >>> sorted(builtin_models())
    ['identity', 'identity_bytes', 'mlp']
    """
    models: list[Model] = [Identity(), Identity("identity_bytes", "BYTES"), MLP(hidden=mlp_hidden, seed=seed)]
    return {model.name: model for model in models}
