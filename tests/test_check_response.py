"""`--check-response` (integration): every answer is checked against the model's metadata. A model
whose answers break its own declared output shape gets invalid_response errors (and the run goes on);
an honest model none; without the flag the same wrong answers pass."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import Server, run_loadgen, start_server, stop_process
from tests.support.triton import write_paced_model

pytestmark = pytest.mark.integration

_DOUBLING = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                out.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT0", np.concatenate([x, x]))]))
            return out
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = tmp_path_factory.mktemp("repo")
    write_paced_model(repository, 0.0, width=4, name="honest")
    write_paced_model(repository, 0.0, width=4, name="doubling")  # declares OUTPUT0 [4], answers [8]
    (repository / "doubling" / "1" / "model.py").write_text(_DOUBLING)
    started = start_server(["--grpc-port", "0", "--model-repository", str(repository), "--allow-python-backend"], module="servers.triton",
                           port_flag="--http-port")
    yield started
    stop_process(started.proc)


@pytest.mark.parametrize("protocol", ["kserve-http", "kserve-grpc"])
def test_answers_that_break_the_declared_shape_are_invalid(server: Server, protocol: str, tmp_path: Path) -> None:
    target = server.url if protocol == "kserve-http" else f"grpc://{server.fronts['grpc']}"

    def run(model: str, *flags: str) -> dict:
        done = run_loadgen("--protocol", protocol, "--target", target, "--model", model, *flags, "--rate", "40",
                           "--duration", "1s", out=tmp_path / f"{model}{len(flags)}")
        assert done.returncode == 0, done.stderr
        return done.summary

    assert run("honest", "--check-response")["errors"] == {}
    checked = run("doubling", "--check-response")
    assert checked["errors"] == {"invalid_response": 40} and checked["ok"] == 0
    assert run("doubling")["errors"] == {}  # unchecked, the same answers count as good
