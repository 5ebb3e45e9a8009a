"""gRPC's `timeout` is a whole-request deadline (loadgen/protocols/common/grpc_h2.py), as HTTP's is in
tests/test_generator_hardening.py: against the Triton-compatible server stopped (SIGSTOP) mid-run, a
call whose answer never comes ends as `timeout` at the deadline (within + 10 %), and in a run every
request sent is counted once: sent == ok + errors + in flight at the end.

The server is stopped rather than slowed: a gRPC server enforces the grpc-timeout the client sends and
would answer DEADLINE_EXCEEDED itself at about the same instant; a stopped one can say nothing, so
the client's own deadline is what ends the call.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.processes import ROOT, finish, loadgen_cmd, pin, stop_process
from tests.support.timing import HostNoise
from tests.support.triton import Fronts, start_fronts

pytestmark = pytest.mark.integration

TIMEOUT_S = 0.4


@pytest.fixture(scope="module")
def server() -> Iterator[Fronts]:
    started = start_fronts()
    yield started
    stop_process(started.proc)


@contextmanager
def stopped(server: Fronts) -> Iterator[None]:
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


_CALLS = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
from loadgen.errors import classify_exception
from loadgen.protocols.common.grpc_h2 import H2Channel
host, port = sys.argv[1].rsplit(":", 1)
channel = H2Channel(host, int(port), connect_timeout=2.0)
ends = []
for _ in range(3):
    start = time.monotonic()
    try:
        channel.unary("/inference.GRPCInferenceService/ModelInfer", b"", float(sys.argv[2]))
        kind = "no error"
    except Exception as exc:
        kind = classify_exception(exc)
    ends.append([kind, time.monotonic() - start])
print(json.dumps(ends))
"""


def test_a_call_to_a_stalled_server_times_out_at_the_deadline(server: Fronts, host_noise: HostNoise) -> None:
    """Three calls on one connection to the stopped server, each `timeout` at 0.4 s (+ 10 %)."""
    with stopped(server):
        done = subprocess.run([sys.executable, "-c", _CALLS, server.grpc_url, str(TIMEOUT_S)], capture_output=True,
                              text=True, timeout=30, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    for kind, took in json.loads(done.stdout):
        assert kind == "timeout"
        assert took >= TIMEOUT_S - 0.005
        host_noise.assert_below(took, TIMEOUT_S * 1.1, what="a stalled gRPC call's end (s)", quantile="max",
                                unit=1000.0)


def test_a_run_against_a_server_stalled_mid_run_counts_every_request_once(server: Fronts, tmp_path: Path) -> None:
    """20 req/s for 1.5 s over kserve-grpc; the server is stopped as the run starts (after its target check
    and warm-up): what was sent is answered ok or ends `timeout`, each counted once."""
    proc = subprocess.Popen(
        loadgen_cmd("run", "--protocol", "kserve-grpc", "--target", f"grpc://{server.grpc_url}", "--model", "mlp",
                    "--rate", "20", "--duration", "1.5s", "--timeout", f"{TIMEOUT_S}s", "--metrics-port", "0",
                    "--no-keep-awake", "--out", str(tmp_path / "out")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    pin(proc.pid, 0)
    said = []
    try:
        while (line := proc.stderr.readline()) and not line.startswith("metrics on "):
            said.append(line)
        assert line, "".join(said)
        with stopped(server):
            _, rest = finish(proc, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 1), "".join(said) + rest
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["errors"]) == {"timeout"}, summary["errors"]
    assert summary["errors"]["timeout"] >= 20, summary  # all but those answered before the stop
    assert summary["sent"] == summary["ok"] + summary["errors"]["timeout"] + summary["in_flight_at_end"]
    assert summary["sent"] + summary["dropped"] + summary["unsent"] == 30
