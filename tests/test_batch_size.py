"""`--batch-size N` (perf_analyzer's -b) for the kserve clients: each request carries N rows, the
server counts N inferences a request, and validation data is checked row by row (integration, with
pure checks of the request building)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadgen.errors import ProtocolMismatch
from loadgen.protocols.common.request_data import request_data
from tests.support.processes import Server, run_loadgen, start_server, stop_process
from tests.support.triton import mlp_input_data


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    started = start_server(["--grpc-port", "0"], module="servers.triton", port_flag="--http-port")
    yield started
    stop_process(started.proc)


def _stats(server: Server) -> tuple[int, int]:
    """(inference_count, successful requests) of mlp."""
    stats = httpx.get(f"{server.url}/v2/models/mlp/stats", timeout=5).json()["model_stats"][0]
    return stats["inference_count"], stats["inference_stats"]["success"]["count"]


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["kserve-http", "kserve-grpc"])
def test_each_request_carries_the_batch(server: Server, protocol: str, tmp_path: Path) -> None:
    target = server.url if protocol == "kserve-http" else f"grpc://{server.fronts['grpc']}"
    rows_before, requests_before = _stats(server)
    run = run_loadgen("--protocol", protocol, "--target", target, "--model", "mlp", "--batch-size", "8",
                      "--input-data", str(mlp_input_data(tmp_path / "good.json")), "--rate", "40", "--duration", "1s",
                      out=tmp_path / "good")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["errors"] == {} and summary["ok"] == 40
    rows, requests = _stats(server)
    assert requests - requests_before == summary["sent"] + summary["warmup_requests"]
    assert rows - rows_before == 8 * (requests - requests_before)
    assert summary["target"]["batch_size"] == 8
    assert summary["achieved_inferences_per_s"] == pytest.approx(8 * summary["achieved_rps"])
    # a wrong expected row is still caught when the entry is repeated 8 times
    bad = run_loadgen("--protocol", protocol, "--target", target, "--model", "mlp", "-b", "8",
                      "--input-data", str(mlp_input_data(tmp_path / "bad.json", wrong=True)), "--rate", "40",
                      "--duration", "1s", out=tmp_path / "bad")
    assert bad.returncode == 0 and bad.summary["errors"] == {"invalid_response": 40}


def test_synthetic_tensors_get_the_batch_dimension() -> None:
    metadata = {"name": "m", "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 16]},
                                        {"name": "LEN", "datatype": "INT32", "shape": [-1, 1]}]}
    (tensors,) = request_data(metadata, 0, {}, None, batch_size=4).tensors
    assert [t["shape"] for t in tensors] == [[4, 16], [4, 1]]
    assert len(tensors[0]["data"]) == 64 and len(set(tensors[0]["data"])) == 64  # four distinct rows


def test_entries_are_repeated_along_the_batch(tmp_path: Path) -> None:
    metadata = {"name": "mlp", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}],
                "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]}
    data = request_data(metadata, 0, {}, str(mlp_input_data(tmp_path / "in.json")), batch_size=3)
    one = request_data(metadata, 0, {}, str(mlp_input_data(tmp_path / "in.json")))
    (tensor,) = data.tensors[0]
    assert tensor["shape"] == [3, 16] and tensor["data"] == one.tensors[0][0]["data"] * 3
    np.testing.assert_array_equal(data.expected[0]["OUTPUT0"], np.tile(one.expected[0]["OUTPUT0"].ravel(), 3))


def test_a_model_without_a_batch_dimension_refuses_a_batch() -> None:
    metadata = {"name": "fixed", "inputs": [{"name": "X", "datatype": "FP32", "shape": [8]}]}
    with pytest.raises(ProtocolMismatch, match="batch_size 2: model 'fixed' has no batch dimension"):
        request_data(metadata, 0, {}, None, batch_size=2)
    assert request_data(metadata, 0, {}, None, batch_size=1).tensors[0][0]["shape"] == [8]


@pytest.mark.integration
def test_batch_size_is_for_the_kserve_protocols(tmp_path: Path) -> None:
    payload = tmp_path / "p.json"
    payload.write_text("[1]")
    run = run_loadgen("--protocol", "torchserve-http", "--target", "http://127.0.0.1:9", "--model", "m",
                      "--payload", str(payload), "-b", "4", "--rate", "10", "--duration", "1s", out=tmp_path / "r")
    assert run.returncode == 2 and "batch_size" in run.stderr


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16", "INT8", "UINT64", "BOOL", "BYTES"])
def test_raw_tensor_forms_round_trip(datatype: str) -> None:
    from loadgen.protocols.common.payloads import synthetic_inputs
    from loadgen.protocols.common.request_data import from_raw, to_raw

    (tensor,) = synthetic_inputs([{"name": "X", "datatype": datatype, "shape": [-1, 6]}], seed=5, batch_size=2)
    back = from_raw(datatype, tensor["shape"], to_raw(datatype, tensor["data"]))
    if datatype == "BYTES":
        assert [item.decode() for item in back] == tensor["data"]
    elif datatype == "BF16":  # 8 bits of mantissa kept
        np.testing.assert_allclose(back.ravel(), tensor["data"], rtol=2 ** -7)
    else:
        np.testing.assert_array_equal(back.ravel(), np.asarray(tensor["data"]).astype(back.dtype))
        assert back.shape == (2, 6)
