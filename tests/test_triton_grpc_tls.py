"""The Triton-compatible server's gRPC port over TLS (--grpc-use-ssl, --grpc-use-ssl-mutual), judged by
tritonclient.grpc and by loadgen's kserve-grpc client (integration); certificates from a private CA."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
from tritonclient.utils import InferenceServerException

from tests.support.processes import ROOT, Server, run_loadgen, start_server, stop_process
from tests.support.tls import PrivateCa, private_ca

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCa:
    return private_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server(ca: PrivateCa) -> Iterator[Server]:
    started = start_server(["--grpc-port", "0", "--grpc-use-ssl", "--grpc-server-cert", str(ca.server_cert),
                            "--grpc-server-key", str(ca.server_key)],
                           module="servers.triton", port_flag="--http-port")
    yield started
    stop_process(started.proc)


def _identity_input() -> list:
    tensor = tritonclient_grpc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    return [tensor]


def _success_count(server: Server, model: str) -> int:
    stats = httpx.get(f"{server.url}/v2/models/{model}/stats", timeout=5).json()["model_stats"][0]
    return stats["inference_stats"]["success"]["count"]


def test_tritonclient_with_the_ca_infers_and_without_tls_it_cannot(server: Server, ca: PrivateCa) -> None:
    client = tritonclient_grpc.InferenceServerClient(server.fronts["grpc"], ssl=True,
                                                     root_certificates=str(ca.ca))
    plain = tritonclient_grpc.InferenceServerClient(server.fronts["grpc"])
    try:
        assert client.is_server_ready()
        result = client.infer("identity", _identity_input())
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                      np.arange(4, dtype=np.float32).reshape(1, 4))
        with pytest.raises(InferenceServerException) as raised:
            plain.is_server_live(client_timeout=5)
    finally:
        client.close()
        plain.close()
    assert raised.value.status() == "StatusCode.UNAVAILABLE"


def test_loadgen_over_grpcs_counts_what_the_server_counts(server: Server, ca: PrivateCa,
                                                          tmp_path: Path) -> None:
    before = _success_count(server, "identity")
    run = run_loadgen("--protocol", "kserve-grpc", "--target", f"grpcs://{server.fronts['grpc']}", "--model",
                      "identity", "--ca-file", str(ca.ca), "--rate", "50", "--duration", "1s",
                      out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["errors"] == {} and summary["sent"] == 50 and summary["ok"] == 50
    assert _success_count(server, "identity") - before == summary["sent"] + summary["warmup_requests"]


def test_loadgen_without_the_ca_is_refused_with_a_certificate_error(server: Server, tmp_path: Path) -> None:
    run = run_loadgen("--protocol", "kserve-grpc", "--target", f"grpcs://{server.fronts['grpc']}", "--model",
                      "identity", "--rate", "10", "--duration", "1s", "--connect-timeout", "2s",
                      out=tmp_path / "run")
    assert run.returncode == 2 and f"cannot reach grpcs://{server.fronts['grpc']}" in run.stderr
    # loadgen's own error says why (grpc itself only logs the failed handshake)
    assert "TLS: the server's certificate is not trusted" in run.stderr and "--ca-file" in run.stderr


def test_mutual_tls_needs_a_client_certificate(ca: PrivateCa) -> None:
    server = start_server(["--grpc-port", "0", "--grpc-use-ssl-mutual", "--grpc-server-cert",
                           str(ca.server_cert), "--grpc-server-key", str(ca.server_key), "--grpc-root-cert",
                           str(ca.ca)],
                          module="servers.triton", port_flag="--http-port")
    url = server.fronts["grpc"]
    with_cert = tritonclient_grpc.InferenceServerClient(url, ssl=True, root_certificates=str(ca.ca),
                                                        private_key=str(ca.client_key),
                                                        certificate_chain=str(ca.client_cert))
    without = tritonclient_grpc.InferenceServerClient(url, ssl=True, root_certificates=str(ca.ca))
    try:
        assert with_cert.is_server_ready()
        with pytest.raises(InferenceServerException) as raised:
            without.is_server_live(client_timeout=5)
    finally:
        with_cert.close()
        without.close()
        stop_process(server.proc)
    assert raised.value.status() == "StatusCode.UNAVAILABLE"


def _run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servers.triton", "--http-port", "0", *args],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_tls_flags_are_checked_before_serving(ca: PrivateCa, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases = {
        "--grpc-use-ssl needs --grpc-server-key": ("--grpc-port", "0", "--grpc-use-ssl", "--grpc-server-cert",
                                                   str(ca.server_cert)),
        "--grpc-use-ssl-mutual needs --grpc-root-cert": (
            "--grpc-port", "0", "--grpc-use-ssl-mutual", "--grpc-server-cert", str(ca.server_cert),
            "--grpc-server-key", str(ca.server_key)),
        "--grpc-server-cert needs --grpc-use-ssl": ("--grpc-port", "0", "--grpc-server-cert",
                                                    str(ca.server_cert)),
        "--grpc-use-ssl needs --grpc-port": ("--grpc-use-ssl", "--grpc-server-cert", str(ca.server_cert),
                                             "--grpc-server-key", str(ca.server_key)),
        f"--grpc-server-key {not_pem}: not a PEM file with a private key": (
            "--grpc-port", "0", "--grpc-use-ssl=true", "--grpc-server-cert", str(ca.server_cert),
            "--grpc-server-key", str(not_pem)),
        f"--grpc-server-cert {tmp_path / 'missing.pem'}: cannot read it": (
            "--grpc-port", "0", "--grpc-use-ssl", "1", "--grpc-server-cert", str(tmp_path / "missing.pem"),
            "--grpc-server-key", str(ca.server_key)),
    }
    for expected, args in cases.items():
        done = _run_server(*args)
        assert done.returncode == 2 and f"error: {expected}" in done.stderr, (args, done.stderr)


def test_a_key_that_does_not_match_the_certificate_cannot_serve(ca: PrivateCa) -> None:
    done = _run_server("--grpc-port", "0", "--grpc-use-ssl", "--grpc-server-cert", str(ca.server_cert),
                       "--grpc-server-key", str(ca.client_key))
    assert done.returncode == 1
    assert "the TLS certificate and key do not match or cannot be loaded" in done.stderr
