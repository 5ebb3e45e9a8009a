"""make-repo's digits models (servers/models/digits.py): trained the same, byte for byte, by two runs of
the command; accurate on the test split (and each variant as accurate as its kind promises); served by
the Triton-compatible server with the same predictions as the model files give in this process.

The slow part, two runs of make-repo (seconds of training each), happens once per session, both at once
(training uses one thread): tests/conftest.py's digits_repositories, whose first the other modules use.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from loadgen.protocols.common.request_data import request_data
from servers.core.model import Model
from servers.models.make_repo import DATA_FOLDER, DIGITS_NAMES, SEEDED_NAMES
from servers.triton.repository import load_model, model_names
from tests.support.processes import Server, start_server, stop_process

FP32_AS_TRAINED = ("digits_cnn", "digits_cnn_onnx")
"""The FP32 CNN and its ONNX export: the same predictions as the TorchScript FP32 model, image for image."""
WRITTEN = SEEDED_NAMES + DIGITS_NAMES
"""The models of these repositories: make-repo --no-minilm (the MiniLM models:
tests/test_minilm_models.py)."""
WITHIN_TWO_POINTS = ("digits_cnn_fp16", "digits_cnn_bf16", "digits_cnn_int8", "digits_cnn_int8_static",
                     "digits_cnn_onnx_int8", "digits_cnn_pruned50")


@pytest.fixture(scope="module")
def repos(digits_repositories: list[tuple[Path, str]]) -> tuple[Path, Path]:
    """Two repositories written by `python -m servers.models.make_repo`, under different hash seeds of
    the calling interpreter (none, and PYTHONHASHSEED=1: the command fixes its own): the session's
    `digits_repositories` (tests/conftest.py), both written at once (training uses one thread)."""
    for _, out in digits_repositories:
        assert f"wrote {len(WRITTEN)} models" in out and "digits: trained in" in out
    first, second = (path for path, _ in digits_repositories)
    return first, second


@pytest.fixture(scope="module")
def repo(repos: tuple[Path, Path]) -> Path:
    return repos[0]


@pytest.fixture(scope="module")
def test_split(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test images ([360, 64] FP32) and labels as make-repo wrote them for clients."""
    entries = json.loads((repo / DATA_FOLDER / "digits_test.json").read_text())["data"]
    labels = json.loads((repo / DATA_FOLDER / "digits_test_labels.json").read_text())
    return np.array([entry["INPUT0"] for entry in entries], dtype=np.float32), np.array(labels)


@pytest.fixture(scope="module")
def in_process(repo: Path) -> Iterator[dict[str, Model]]:
    """Each digits model loaded from its folder in this process, as the server's backends load it."""
    models = {name: load_model(repo, name).versions["1"].instances[0] for name in DIGITS_NAMES}
    yield models
    for model in models.values():
        model.close()


@pytest.fixture(scope="module")
def logits(in_process: dict[str, Model], test_split: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: model.infer({"INPUT0": test_split[0]})["OUTPUT0"] for name, model in in_process.items()}


@pytest.fixture(scope="module")
def accuracy(logits: dict[str, np.ndarray], test_split: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    return {name: float(np.mean(values.argmax(axis=1) == test_split[1])) for name, values in logits.items()}


def test_two_runs_write_the_same_bytes(repos: tuple[Path, Path]) -> None:
    first, second = ({path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}
                     for root in repos)
    assert sorted(first) == sorted(second)
    assert {path.parts[0] for path in first} == {*WRITTEN, DATA_FOLDER}
    different = [str(path) for path in sorted(first) if first[path] != second[path]]
    assert different == []


def test_the_test_data_is_loadgens_input_data(repo: Path, test_split: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = test_split
    assert images.shape == (360, 64) and labels.shape == (360,)
    assert images.min() == 0 and images.max() == 16 and sorted(set(labels.tolist())) == list(range(10))
    assert np.bincount(labels).min() >= 35  # stratified: every digit about a tenth of the test split
    metadata = {"name": "digits_cnn", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}],
                "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]}
    requests = request_data(metadata, 0, {}, str(repo / DATA_FOLDER / "digits_test.json"))
    assert len(requests.tensors) == 360
    [first] = requests.tensors[0]
    assert (first["name"], first["shape"], first["datatype"]) == ("INPUT0", [1, 64], "FP32")
    assert first["data"] == images[0].tolist()


def test_accuracy(accuracy: dict[str, float], repo: Path) -> None:
    fp32 = accuracy["digits_cnn"]
    assert fp32 >= 0.95
    assert accuracy["digits_cnn_onnx"] == fp32
    for name in WITHIN_TWO_POINTS:
        assert accuracy[name] >= fp32 - 0.02, name
    assert accuracy["digits_cnn_pruned90"] >= fp32 - 0.05
    assert accuracy["digits_student"] >= fp32 - 0.05
    written = json.loads((repo / DATA_FOLDER / "digits_accuracy.json").read_text())
    assert list(written) == list(DIGITS_NAMES)
    assert written == {name: round(accuracy[name], 4) for name in DIGITS_NAMES}


def test_the_variants_are_what_they_say(repo: Path, logits: dict[str, np.ndarray]) -> None:
    def size(name: str) -> int:
        return sum(path.stat().st_size for path in (repo / name / "1").iterdir())

    def parameters(name: str) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():  # torch.jit is deprecated, still Triton's format
            warnings.simplefilter("ignore", DeprecationWarning)
            return dict(torch.jit.load(str(repo / name / "1" / "model.pt")).named_parameters())

    assert size("digits_student") * 5 < size("digits_cnn")
    assert sum(p.numel() for p in parameters("digits_student").values()) * 10 < \
        sum(p.numel() for p in parameters("digits_cnn").values())
    for name, share in (("digits_cnn_pruned50", 0.5), ("digits_cnn_pruned90", 0.9)):
        weights = [p for key, p in parameters(name).items() if key.endswith("weight")]
        zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
        assert share <= zeros < share + 0.01, name
    assert size("digits_cnn_int8_static") < size("digits_cnn") / 2
    assert size("digits_cnn_onnx_int8") < size("digits_cnn_onnx") / 2
    config = (repo / "digits_cnn_int8_static" / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in config and "dims: [ 64 ]" in config and "max_batch_size: 32" in config
    for name in ("digits_cnn_fp16", "digits_cnn_bf16", "digits_cnn_int8"):  # reduced precision: not the same
        assert not np.array_equal(logits[name], logits["digits_cnn"]), name
    np.testing.assert_allclose(logits["digits_cnn_onnx"], logits["digits_cnn"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Server]:
    started = start_server(["--model-repository", str(repo)], timeout=120, module="servers.triton",
                           port_flag="--http-port")
    yield started
    stop_process(started.proc)


@pytest.mark.integration
def test_the_server_skips_the_data_folder(server: Server, repo: Path) -> None:
    assert (repo / DATA_FOLDER).is_dir() and DATA_FOLDER not in model_names(repo)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    index = client.get_model_repository_index()
    assert sorted(row["name"] for row in index) == sorted(WRITTEN)
    assert all(row["state"] == "READY" for row in index)
    assert client.is_server_ready()


@pytest.mark.integration
def test_the_server_answers_as_the_models_in_process(server: Server, logits: dict[str, np.ndarray],
                                                     test_split: tuple[np.ndarray, np.ndarray]) -> None:
    images = test_split[0]
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    for name in DIGITS_NAMES:
        metadata = client.get_model_metadata(name)
        assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}]
        assert metadata["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]
        answers = []
        for start, count in ((0, 1), *((start, 32) for start in range(1, len(images), 32))):
            rows = images[start:start + count]
            tensor = httpclient.InferInput("INPUT0", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            answers.append(client.infer(name, [tensor]).as_numpy("OUTPUT0"))
        served = np.concatenate(answers)
        assert served.shape == (len(images), 10) and served.dtype == np.float32
        expected = logits["digits_cnn" if name in FP32_AS_TRAINED else name]
        assert np.array_equal(served.argmax(axis=1), expected.argmax(axis=1)), name
