"""Staging reality for every client (integration): perf_analyzer --input-data files with validation
(a wrong answer is an invalid_response error and the run goes on), TLS with a private CA, and bearer
tokens that reach the server but never the results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.processes import run_loadgen, start_server, stop_process
from tests.support.tls import private_ca
from tests.support.torchserve import MLP_JSON, ONE_MLP_WORKER, start_torchserve
from tests.support.triton import mlp_input_data

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("protocol", ["kserve-http", "kserve-grpc"])
def test_input_data_is_sent_and_answers_are_validated(protocol: str, tmp_path: Path) -> None:
    server = start_server(["--grpc-port", "0"], module="servers.triton", port_flag="--http-port")
    target = server.url if protocol == "kserve-http" else f"grpc://{server.fronts['grpc']}"
    try:
        good = run_loadgen("--protocol", protocol, "--target", target, "--model", "mlp", "--input-data",
                           str(mlp_input_data(tmp_path / "good.json")), "--rate", "60", "--duration", "1s",
                           out=tmp_path / "good")
        bad = run_loadgen("--protocol", protocol, "--target", target, "--model", "mlp", "--input-data",
                          str(mlp_input_data(tmp_path / "bad.json", wrong=True)), "--rate", "60", "--duration", "1s",
                          out=tmp_path / "bad")
    finally:
        stop_process(server.proc)
    assert good.returncode == 0, good.stderr
    assert good.summary["errors"] == {} and good.summary["ok"] == 60
    # the warm-up only checks that the model accepts the requests; every measured answer is then wrong
    assert bad.returncode == 0, bad.stderr
    assert bad.summary["errors"] == {"invalid_response": 60} and bad.summary["ok"] == 0


def test_bad_input_data_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"data": [{"INPUT0": [1.0] * 16}, {"WRONG": [1.0]}]}))
    server = start_server([], module="servers.triton", port_flag="--http-port")
    try:
        run = run_loadgen("--target", server.url, "--model", "mlp", "--input-data", str(path), "--rate", "10",
                          "--duration", "1s", out=tmp_path / "run")
    finally:
        stop_process(server.proc)
    assert run.returncode == 2 and "data[1]" in run.stderr and "INPUT0" in run.stderr


def test_https_with_a_private_ca(tmp_path: Path) -> None:
    made = private_ca(tmp_path)
    ca, cert, key = made.ca, made.server_cert, made.server_key
    server = start_server(["--delay-ms", "2", "--tls-cert", str(cert), "--tls-key", str(key)])
    try:
        assert server.url.startswith("https://")
        trusted = run_loadgen("--target", server.url, "--model", "m", "--ca-file", str(ca), "--rate", "50",
                              "--duration", "1s", out=tmp_path / "trusted")
        untrusted = run_loadgen("--target", server.url, "--model", "m", "--rate", "50", "--duration", "1s",
                                out=tmp_path / "untrusted")
    finally:
        stop_process(server.proc)
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.summary["ok"] == 50 and trusted.summary["latency_ms"]["p50"] >= 2.0
    assert untrusted.returncode == 2
    assert "cannot reach" in untrusted.stderr and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_bearer_token_reaches_the_server_and_never_the_results(model_store: Path, tmp_path: Path) -> None:
    server = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar",
                              config=[ONE_MLP_WORKER])  # token authorization on
    payload = tmp_path / "input.json"
    payload.write_text(MLP_JSON)
    common = ("--protocol", "torchserve-http", "--target", server.inference, "--model", "mlp", "--payload",
              str(payload), "--rate", "20", "--duration", "1s")
    try:
        token = server.keys()["inference"]
        os.environ["LOADGEN_TEST_TOKEN"] = token
        with_token = run_loadgen(*common, "--bearer-token-env", "LOADGEN_TEST_TOKEN", out=tmp_path / "with")
        without = run_loadgen(*common, out=tmp_path / "without")
    finally:
        os.environ.pop("LOADGEN_TEST_TOKEN", None)
        server.stop()
    assert with_token.returncode == 0, with_token.stderr
    assert with_token.summary["ok"] == 20
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "with").iterdir())
    assert token not in written + with_token.stdout + with_token.stderr
    assert without.returncode == 2 and "400 Token Authorization failed" in without.stderr


def test_unset_token_variable_is_an_input_error(tmp_path: Path) -> None:
    run = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--bearer-token-env", "LOADGEN_NOT_SET_X",
                      "--rate", "1", "--duration", "1s", out=tmp_path / "run")
    assert run.returncode == 2 and "LOADGEN_NOT_SET_X is not set" in run.stderr
