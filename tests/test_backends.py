"""servers/triton/backends: the Python backend's model.py contract (pb_utils, initialize args, per-request
errors, finalize), the PyTorch positional convention, ONNX graph checks and auto-complete, lazy imports.
Models are written into tmp folders and loaded in-process through servers/triton/repository.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from servers.core.model import RequestError, TensorSpec
from servers.triton.backends import as_declared
from servers.triton.backends import triton_python_backend_utils as pb_utils
from servers.triton.repository import ModelLoadError, load_model


def write(repository: Path, name: str, config: str, files: dict[str, str | bytes]) -> Path:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(textwrap.dedent(config))
    for relative, content in files.items():
        target = folder / relative
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(textwrap.dedent(content))
    return folder


def instances(repository: Path, name: str) -> list:
    return load_model(repository, name, allow_python_backend=True).versions["1"].instances


def close_all(models: list) -> None:
    for model in models:
        model.close()


# --- Python backend ---------------------------------------------------------------------------------

RECORDING_CONFIG = """
    backend: "python"
    max_batch_size: 4
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
    output [ { name: "DOUBLED" data_type: TYPE_FP64 dims: [ 2 ] }, { name: "WHO" data_type: TYPE_STRING dims: [ 1 ] } ]
    parameters { key: "record" value: { string_value: "RECORD" } }
    instance_group [ { count: 2 } ]
"""

RECORDING_PY = '''
    import json
    from pathlib import Path

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            config = json.loads(args["model_config"])
            self.record = Path(config["parameters"]["record"]["string_value"])
            doubled = pb_utils.get_output_config_by_name(config, "DOUBLED")
            self.dtype = pb_utils.triton_string_to_numpy(doubled["data_type"])
            self.who = args["model_instance_name"].encode()
            self.log({"event": "initialize", "args": args})

        def log(self, entry):
            with self.record.open("a") as out:
                out.write(json.dumps(entry) + "\\n")

        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                if (x < 0).any():
                    error = pb_utils.TritonError("negative input", pb_utils.TritonError.INVALID_ARG)
                    responses.append(pb_utils.InferenceResponse(error=error))
                    continue
                doubled = pb_utils.Tensor("DOUBLED", (x * 2).astype(self.dtype))
                who = pb_utils.Tensor("WHO", np.array([[self.who]] * len(x), dtype=object))
                response = pb_utils.InferenceResponse(output_tensors=[doubled, who])
                assert pb_utils.get_output_tensor_by_name(response, "DOUBLED") is doubled
                responses.append(response)
            return responses

        def finalize(self):
            self.log({"event": "finalize", "who": self.who.decode()})
'''


@pytest.fixture
def recording(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "record.jsonl"
    write(tmp_path / "repo", "rec", RECORDING_CONFIG.replace("RECORD", str(record)), {"1/model.py": RECORDING_PY})
    return tmp_path / "repo", record


def events(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_initialize_gets_tritons_args_once_per_instance(recording: tuple[Path, Path]) -> None:
    repository, record = recording
    models = instances(repository, "rec")
    assert len(models) == 2
    first, second = (event["args"] for event in events(record))
    assert set(first) == {"model_config", "model_instance_kind", "model_instance_name", "model_instance_device_id",
                          "model_repository", "model_version", "model_name"}
    assert (first["model_instance_name"], second["model_instance_name"]) == ("rec_0_0", "rec_0_1")
    assert first["model_name"] == "rec" and first["model_version"] == "1"
    assert first["model_instance_kind"] == "CPU" and first["model_instance_device_id"] == "0"
    assert first["model_repository"] == str(repository / "rec")
    config = json.loads(first["model_config"])
    assert config["name"] == "rec" and config["backend"] == "python" and config["max_batch_size"] == 4
    assert config["input"][0] == {**config["input"][0], "name": "X", "data_type": "TYPE_FP32", "dims": [2]}
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] == 2
    close_all(models)


def test_an_error_response_fails_only_its_request(recording: tuple[Path, Path]) -> None:
    models = instances(recording[0], "rec")
    good = np.array([[1, 2], [3, 4]], np.float32)
    results = models[1].infer_batch([{"X": good}, {"X": -good[:1]}, {"X": good[1:] + 1}])
    assert isinstance(results[1], RequestError) and str(results[1]) == "negative input"
    assert results[0]["DOUBLED"].dtype == np.float64
    np.testing.assert_array_equal(results[0]["DOUBLED"], good * 2)
    np.testing.assert_array_equal(results[2]["DOUBLED"], (good[1:] + 1) * 2)
    assert results[2]["WHO"].tolist() == [[b"rec_0_1"]]
    with pytest.raises(RequestError, match="negative input"):
        models[0].infer({"X": -good})
    close_all(models)


def test_close_runs_finalize_once_and_forgets_the_module(recording: tuple[Path, Path]) -> None:
    repository, record = recording
    before = {name for name in sys.modules if name.startswith("_triton_python_model_rec")}
    models = instances(repository, "rec")
    loaded = {name for name in sys.modules if name.startswith("_triton_python_model_rec")} - before
    assert len(loaded) == 1  # one module for the version, shared by both instances
    models[0].close()
    models[0].close()
    assert loaded <= set(sys.modules)  # the second instance still uses it
    models[1].close()
    assert [event for event in events(record) if event["event"] == "finalize"] == [
        {"event": "finalize", "who": "rec_0_0"}, {"event": "finalize", "who": "rec_0_1"}]
    assert not loaded & set(sys.modules)
    assert sys.modules["triton_python_backend_utils"] is pb_utils


PLAIN_CONFIG = """
    backend: "python"
    max_batch_size: 4
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
    output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def test_async_execute_runs_to_completion(tmp_path: Path) -> None:
    source = """
        import asyncio
        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            async def execute(self, requests):
                await asyncio.sleep(0)
                return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", r.inputs()[0].as_numpy() + 1)])
                        for r in requests]
    """
    write(tmp_path, "aio", PLAIN_CONFIG, {"1/model.py": source})
    [model] = instances(tmp_path, "aio")
    np.testing.assert_array_equal(model.infer({"X": np.zeros((1, 2), np.float32)})["Y"], [[1, 1]])


def test_a_reply_that_is_not_one_response_per_request_fails_the_batch(tmp_path: Path) -> None:
    source = """
        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            def execute(self, requests):
                return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", requests[0].inputs()[0].as_numpy())])]
    """
    write(tmp_path, "short", PLAIN_CONFIG, {"1/model.py": source})
    [model] = instances(tmp_path, "short")
    x = {"X": np.zeros((1, 2), np.float32)}
    assert model.infer(x)["Y"].shape == (1, 2)
    with pytest.raises(RuntimeError, match="execute returned 1 responses for 2 requests"):
        model.infer_batch([x, x])


@pytest.mark.parametrize(("source", "message"), [
    ("import triton_python_backend_utils\n", "1/model.py defines no class TritonPythonModel"),
    ("class TritonPythonModel:\n    def initialize(self, args):\n        raise ValueError('no weights')\n",
     "1/model.py line 3: initialize failed: ValueError: no weights"),
    ("def broken(:\n", "1/model.py line 1: SyntaxError"),
])
def test_model_py_problems_are_load_errors(tmp_path: Path, source: str, message: str) -> None:
    write(tmp_path, "bad", PLAIN_CONFIG, {"1/model.py": source})
    before = set(sys.modules)
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path, "bad", allow_python_backend=True)
    assert str(caught.value).startswith("model 'bad': version 1: ") and message in str(caught.value)
    assert not {name for name in set(sys.modules) - before if name.startswith("_triton_python_model_")}


def test_pb_utils_helpers() -> None:
    assert pb_utils.TritonError("x").code() == pb_utils.TritonError.INTERNAL
    codes = [getattr(pb_utils.TritonError, code) for code in ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG",
                                                               "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS",
                                                               "CANCELLED")]
    assert len(set(codes)) == 8
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.triton_string_to_numpy("TYPE_NOPE")
    config = {"input": [{"name": "A", "dims": [1]}], "output": []}
    assert pb_utils.get_input_config_by_name(config, "A") == {"name": "A", "dims": [1]}
    assert pb_utils.get_output_config_by_name(config, "A") is None
    request = pb_utils.InferenceRequest([pb_utils.Tensor("A", np.ones(1))], request_id="7")
    assert pb_utils.get_input_tensor_by_name(request, "B") is None and request.request_id() == "7"
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.Tensor("A", [1, 2])
    assert pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL == 1


# --- PyTorch backend --------------------------------------------------------------------------------

class DiffAndCount(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a - b, (a > b).sum(dim=1, keepdim=True)


TORCH_CONFIG = """
    platform: "pytorch_libtorch"
    max_batch_size: 8
    input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 3 ] } ]
    output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "OUTPUT__1" data_type: TYPE_INT64 dims: [ 1 ] } ]
"""


@pytest.fixture
def torch_file(tmp_path: Path) -> bytes:
    path = tmp_path / "diff.pt"
    torch.jit.save(torch.jit.script(DiffAndCount()), str(path))
    return path.read_bytes()


def test_torchscript_takes_inputs_by_position_and_maps_outputs_in_order(tmp_path: Path, torch_file: bytes) -> None:
    write(tmp_path, "diff", TORCH_CONFIG, {"1/model.pt": torch_file})
    [model] = instances(tmp_path, "diff")
    a = np.array([[1, 5, 3], [0, 0, 9]], np.float32)
    b = np.array([[2, 2, 2], [1, 1, 1]], np.float32)
    out = model.infer({"INPUT__1": b, "INPUT__0": a})
    np.testing.assert_array_equal(out["OUTPUT__0"], a - b)
    assert out["OUTPUT__1"].dtype == np.int64 and out["OUTPUT__1"].tolist() == [[2], [1]]
    frozen = np.frombuffer(a.tobytes(), np.float32).reshape(2, 3)  # read-only, like a decoded wire buffer
    np.testing.assert_array_equal(model.infer({"INPUT__0": frozen, "INPUT__1": b})["OUTPUT__0"], a - b)


def test_torchscript_output_count_must_match_the_config(tmp_path: Path, torch_file: bytes) -> None:
    one_output = TORCH_CONFIG.replace(', { name: "OUTPUT__1" data_type: TYPE_INT64 dims: [ 1 ] }', "")
    write(tmp_path, "diff", one_output, {"1/model.pt": torch_file})
    [model] = instances(tmp_path, "diff")
    with pytest.raises(RuntimeError, match=r"forward returned 2 value\(s\).*declares 1 output"):
        model.infer({"INPUT__0": np.ones((1, 3), np.float32), "INPUT__1": np.ones((1, 3), np.float32)})


def test_torchscript_thread_parameter(tmp_path: Path, torch_file: bytes) -> None:
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    param = 'parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "%s" } }\n'
    write(tmp_path, "good", TORCH_CONFIG + param % wanted, {"1/model.pt": torch_file})
    write(tmp_path, "bad", TORCH_CONFIG + param % "many", {"1/model.pt": torch_file})
    try:
        instances(tmp_path, "good")
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ModelLoadError, match=r"model 'bad': version 1: parameters.INTRA_OP_THREAD_COUNT: 'many'"):
        load_model(tmp_path, "bad", allow_python_backend=True)


def test_torchscript_refuses_bytes_tensors(tmp_path: Path, torch_file: bytes) -> None:
    write(tmp_path, "words", TORCH_CONFIG.replace("TYPE_FP32", "TYPE_STRING", 1), {"1/model.pt": torch_file})
    with pytest.raises(ModelLoadError, match=r"input\[0\].data_type: TYPE_STRING is not supported by the pytorch"):
        load_model(tmp_path, "words", allow_python_backend=True)


# --- ONNX Runtime backend ---------------------------------------------------------------------------

def onnx_bytes(node: onnx.NodeProto, inputs: list, outputs: list) -> bytes:
    graph = helper.make_graph([node], "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


ADD = onnx_bytes(helper.make_node("Add", ["A", "B"], ["SUM"]),
                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3]) for name in ("A", "B")],
                 [helper.make_tensor_value_info("SUM", TensorProto.FLOAT, ["N", 3])])
STRINGS = onnx_bytes(helper.make_node("Identity", ["TEXT"], ["SAME"]),
                     [helper.make_tensor_value_info("TEXT", TensorProto.STRING, [2])],
                     [helper.make_tensor_value_info("SAME", TensorProto.STRING, [2])])
ADD_CONFIG = """
    backend: "onnxruntime"
    max_batch_size: 2
    input [ { name: "A" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 3 ] } ]
    output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 3 ] } ]
    parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def test_onnx_feeds_by_name_and_passes_bytes(tmp_path: Path) -> None:
    write(tmp_path, "add", ADD_CONFIG, {"1/model.onnx": ADD})
    strings = """
        backend: "onnxruntime"
        input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 2 ] } ]
        output [ { name: "SAME" data_type: TYPE_STRING dims: [ 2 ] } ]
    """
    write(tmp_path, "text", strings, {"1/model.onnx": STRINGS})
    [add], [text] = instances(tmp_path, "add"), instances(tmp_path, "text")
    a, b = np.ones((2, 3), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(add.infer({"B": b, "A": a})["SUM"], a + b)
    same = text.infer({"TEXT": np.array([b"caf\xc3\xa9", b""], dtype=object)})["SAME"]
    assert same.dtype == object and same.tolist() == [b"caf\xc3\xa9", b""]


@pytest.mark.parametrize(("change", "message"), [
    (('name: "A"', 'name: "C"'), "input[0].name: 'C' is not a graph input of model.onnx (it has: A, B)"),
    (("TYPE_FP32", "TYPE_INT32"), "input[0].data_type: TYPE_INT32, but the graph's 'A' is tensor(float)"),
    (("max_batch_size: 2", "max_batch_size: 0"), "input[0].dims: [3] with max_batch_size 0 is rank 1"),
    (('"intra_op_thread_count" value: { string_value: "1"', '"intra_op_thread_count" value: { string_value: "x"'),
     "parameters.intra_op_thread_count: 'x'"),
])
def test_onnx_config_is_held_against_the_graph(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    write(tmp_path, "add", ADD_CONFIG.replace(*change, 1), {"1/model.onnx": ADD})
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path, "add", allow_python_backend=True)
    assert str(caught.value).startswith("model 'add': version 1: ") and message in str(caught.value)


def test_onnx_without_config_is_completed_from_the_graph(tmp_path: Path) -> None:
    for name, graph in (("add", ADD), ("text", STRINGS)):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.onnx").write_bytes(graph)
    add = load_model(tmp_path, "add", allow_python_backend=True)
    assert (add.config.platform, add.config.backend, add.config.max_batch_size) == ("onnxruntime_onnx",
                                                                                     "onnxruntime", 4)
    assert add.config.HasField("dynamic_batching")
    [model] = add.versions["1"].instances
    assert model.inputs == (TensorSpec("A", "FP32", (3,)), TensorSpec("B", "FP32", (3,)))
    assert model.outputs == (TensorSpec("SUM", "FP32", (3,)),)
    np.testing.assert_array_equal(model.infer({"A": np.ones((1, 3), np.float32), "B": np.ones((1, 3), np.float32)})
                                  ["SUM"], [[2, 2, 2]])
    text = load_model(tmp_path, "text", allow_python_backend=True)  # a fixed first dimension: no batching
    assert text.config.max_batch_size == 0 and not text.config.HasField("dynamic_batching")
    assert text.versions["1"].instances[0].inputs == (TensorSpec("TEXT", "BYTES", (2,)),)


# --- shared pieces ----------------------------------------------------------------------------------

def test_as_declared_casts_within_a_kind_and_refuses_across() -> None:
    spec = TensorSpec("Y", "FP32", (1,))
    assert as_declared(np.ones(2, np.float64), spec).dtype == np.float32
    with pytest.raises(TypeError, match="output 'Y' is float64, but the config declares INT32"):
        as_declared(np.ones(2, np.float64), TensorSpec("Y", "INT32", (1,)))
    words = as_declared(np.array(["a", "é"]), TensorSpec("W", "BYTES", (1,)))
    assert words.dtype == object and words.tolist() == [b"a", "é".encode()]


def test_a_python_model_is_refused_before_its_code_runs_unless_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write(tmp_path, "marking", PLAIN_CONFIG, {"1/model.py": f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("ran")

        class TritonPythonModel:
            def execute(self, requests):
                return []
    """})
    with pytest.raises(ModelLoadError, match="--allow-python-backend"):
        load_model(tmp_path, "marking")
    assert not marker.exists()
    close_all(load_model(tmp_path, "marking", allow_python_backend=True).versions["1"].instances)
    assert marker.read_text() == "ran"


def test_the_server_side_imports_no_framework_until_a_model_needs_it(tmp_path: Path) -> None:
    write(tmp_path, "plain", PLAIN_CONFIG, {"1/model.py": """
        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            def execute(self, requests):
                return [pb_utils.InferenceResponse([r.inputs()[0]]) for r in requests]
    """})
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from servers.triton.repository import load_model
        load_model(Path({str(tmp_path)!r}), "plain", allow_python_backend=True)
        print("torch" in sys.modules, "onnxruntime" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["False", "False"]
