"""Unit tests of servers/core/model.py and servers/models/builtin.py: declared tensors, config, numbers."""

from __future__ import annotations

import numpy as np
import pytest

from servers.core.model import Model, TensorSpec
from servers.models.builtin import MLP, Identity, builtin_models


def test_registry_names_and_fresh_instances() -> None:
    first, second = builtin_models(), builtin_models()
    assert sorted(first) == ["identity", "identity_bytes", "mlp"]
    assert all(first[name] is not second[name] for name in first)
    assert all(model.name == name and model.version == "1" for name, model in first.items())


def test_identity_returns_its_input_for_fp32_and_bytes() -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert Identity().infer({"INPUT0": data})["OUTPUT0"] is data
    words = np.array([[b"a", b""]], dtype=object)
    assert Identity("identity_bytes", "BYTES").infer({"INPUT0": words})["OUTPUT0"] is words


def test_mlp_is_two_dense_layers_with_relu() -> None:
    model = MLP(hidden=7, seed=3)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    expected = np.maximum(x @ model.w1 + model.b1, 0) @ model.w2 + model.b2
    got = model.infer({"INPUT0": x})["OUTPUT0"]
    assert got.dtype == np.float32 and got.shape == (5, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert model.w1.shape == (16, 7)


def test_mlp_weights_follow_the_seed() -> None:
    x = np.ones((1, 16), np.float32)
    same = [MLP(seed=0).infer({"INPUT0": x})["OUTPUT0"] for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], MLP(seed=1).infer({"INPUT0": x})["OUTPUT0"])
    with pytest.raises(ValueError, match="hidden"):
        MLP(hidden=0)


def test_metadata_has_a_leading_batch_dim_only_when_batching() -> None:
    mlp = MLP().metadata()
    assert mlp["platform"] == "python" and mlp["versions"] == ["1"]
    assert mlp["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]
    assert mlp["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]

    class Plain(Model):
        name = "plain"
        inputs = (TensorSpec("X", "INT64", (2, -1)),)

    assert Plain().metadata()["inputs"][0]["shape"] == [2, -1]


def test_config_is_tritons_model_config_shape() -> None:
    config = Identity("identity_bytes", "BYTES").config()
    assert config["max_batch_size"] == 8 and config["backend"] == "python"
    assert config["input"][0]["data_type"] == "TYPE_STRING" and config["input"][0]["dims"] == [-1]
    assert config["output"][0]["name"] == "OUTPUT0"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert MLP().config()["input"][0]["data_type"] == "TYPE_FP32"
