"""A distributed run trusts nothing it has not checked: workers prove the cluster key before they get a
scenario, secrets never travel to them, a worker reads files only inside its --data-dir, and a bogus
message from either side is logged and ignored.

The rules are unit-tested (loadgen/driver/trust.py imports no locust); the rest with real processes on
127.0.0.1: masters and workers, a calibration server, a TorchServe-compatible server that refuses requests
without its token, and a raw ZeroMQ peer standing in for a hostile master or worker on the same channel
(Locust's frames: msgpack of (type, data, node id)).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from loadgen.driver.trust import confine_paths, load_cluster_key, message_problem, prove, proves
from tests.support.distributed import Master, received, shipped, start_worker
from tests.support.processes import loadgen_cmd, stop_process
from tests.support.torchserve import MLP_JSON, ONE_MLP_WORKER, start_torchserve

KEY = "0123456789abcdef0123456789abcdef"
WRONG_KEY = "fedcba9876543210fedcba9876543210"


# -- the rules -------------------------------------------------------------------------------------------

def test_a_proof_binds_the_key_the_side_and_the_worker() -> None:
    proof = prove(KEY.encode(), "worker", "n1", "w1")
    assert proves(KEY.encode(), "worker", "n1", "w1", proof)
    assert KEY not in proof
    for key, role, nonce, client in ((WRONG_KEY, "worker", "n1", "w1"), (KEY, "master", "n1", "w1"),
                                     (KEY, "worker", "n2", "w1"), (KEY, "worker", "n1", "w2")):
        assert not proves(key.encode(), role, nonce, client, proof)
    assert not proves(KEY.encode(), "worker", "n1", "w1", None)


def test_cluster_keys_are_read_from_a_variable_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LG_TEST_KEY", KEY + "\n")
    assert load_cluster_key("LG_TEST_KEY", None) == KEY.encode()
    (tmp_path / "key").write_text(KEY)
    assert load_cluster_key(None, tmp_path / "key") == KEY.encode()
    assert load_cluster_key(None, None) is None
    monkeypatch.setenv("LG_SHORT_KEY", "abc")
    for env, file, message in (("LG_UNSET_KEY_X", None, "LG_UNSET_KEY_X is not set"),
                               ("LG_SHORT_KEY", None, "holds 3 bytes"),
                               (None, tmp_path / "none", "cannot read"),
                               ("LG_TEST_KEY", tmp_path / "key", "exclude each other")):
        with pytest.raises(ValueError, match=message):
            load_cluster_key(env, file)


@pytest.mark.parametrize(("kind", "data", "problem"), [
    ("loadgen_interval", [1, 2], "its data is a list"),
    ("loadgen_interval", {"run": "r", "start_s": 0, "end_s": 1}, "'figures' is missing"),
    ("loadgen_interval", {"run": "r", "start_s": "0", "end_s": 1, "figures": {}}, "'start_s' is a str"),
    ("loadgen_setup", {"run": "r", "scenario": {}, "index": True, "count": 1, "seed": 1}, "'index' is a bool"),
    ("loadgen_done", {"run": "r", "generator": "x"}, "'generator' is a str"),
    ("loadgen_nonsense", {}, "unknown message type"),
])
def test_a_message_with_bad_fields_is_named(kind: str, data: object, problem: str) -> None:
    assert problem in message_problem(kind, data)


def test_good_messages_pass() -> None:
    assert message_problem("loadgen_start", {"run": "r", "start_epoch_s": 1.5, "share": [0, 1, 0.0], "users": 0}) \
        is None
    assert message_problem("loadgen_done", {"run": "r", "generator": None, "error": None}) is None


def test_files_resolve_inside_the_data_dir_and_nowhere_else(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (data / "in.json").write_text("{}")
    (outside / "secret.txt").write_text("x")
    (data / "link.json").symlink_to(outside / "secret.txt")
    (data / "images").mkdir()
    (data / "images" / "a.jpg").write_text("x")

    def scenario(**target: str) -> dict:
        return {"target": {"url": "http://h:1", "model": "m", **target}, "open_loop": {"rate": 1}}

    got = confine_paths(scenario(input_data="in.json", ca_file=str(data / "in.json"), payload="images"), data)
    assert got["target"]["input_data"] == got["target"]["ca_file"] == str((data / "in.json").resolve())
    assert got["target"]["payload"] == str((data / "images").resolve())
    mixed = confine_paths({**scenario(), "mix": [{"weight": 1, "input_data": "in.json"}]}, data)
    assert mixed["mix"][0]["input_data"] == str((data / "in.json").resolve())
    refused = [
        (scenario(input_data="../outside/secret.txt"), "target.input_data = '../outside/secret.txt' lies outside"),
        (scenario(dataset=str(outside / "secret.txt")), "target.dataset"),
        (scenario(labels="link.json"), "target.labels = 'link.json' lies outside"),
        ({**scenario(), "open_loop": {"trace": "/etc/passwd"}}, "open_loop.trace"),
        ({**scenario(), "mix": [{"weight": 1, "tokenizer": "../outside/secret.txt"}]}, "mix[0].tokenizer"),
    ]
    (data / "images" / "b.jpg").symlink_to(outside / "secret.txt")
    refused.append((scenario(payload="images"), "b.jpg links outside"))
    for sent, message in refused:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            confine_paths(sent, data)
    with pytest.raises(ValueError, match="start it with --data-dir DIR"):
        confine_paths(scenario(input_data="in.json"), None)
    assert confine_paths(scenario(), None) == scenario()  # no file named: nothing to refuse


# -- a hostile peer on the channel ---------------------------------------------------------------------

def frame(kind: str, data: object, node_id: str) -> bytes:
    return msgpack.dumps((kind, data, node_id))


def test_a_master_refuses_workers_without_the_key_and_ignores_bogus_messages(calibration_server,
                                                                             tmp_path: Path) -> None:
    server = calibration_server()
    debug = tmp_path / "debug"
    master = Master(["--target", server.url, "--model", "m", "--rate", "50", "--duration", "1s",
                     "--cluster-key-env", "LG_TEST_KEY"], tmp_path / "run", workers=1, env={"LG_TEST_KEY": KEY})
    workers = []
    try:
        context = zmq.Context()
        intruder = context.socket(zmq.DEALER)
        intruder.setsockopt(zmq.IDENTITY, b"intruder")
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(f"tcp://127.0.0.1:{master.port}")
        for raw in (b"\xc1 not msgpack", msgpack.dumps([1, 2]), frame("client_ready", 5, "intruder"),
                    frame("client_ready", -1, "intruder"), frame("heartbeat", [1, 2], "intruder"),
                    frame("loadgen_interval", {"run": 1}, "intruder"), frame("loadgen_done", {}, "someone-else"),
                    frame("loadgen_nonsense", {}, "intruder"), frame("quit", None, "intruder")):
            intruder.send(raw)
        keyless = start_worker(master.port, debug, stderr=subprocess.PIPE)
        wrong = start_worker(master.port, debug, "--cluster-key-env", "LG_TEST_KEY", env={"LG_TEST_KEY": WRONG_KEY},
                             stderr=subprocess.PIPE)
        workers += [keyless, wrong]
        _, keyless_said = keyless.communicate(timeout=60)
        _, wrong_said = wrong.communicate(timeout=60)
        good = start_worker(master.port, debug, "--cluster-key-env", "LG_TEST_KEY", env={"LG_TEST_KEY": KEY})
        workers.append(good)
        code, said = master.finish()
        intruder.close()
        context.term()
    finally:
        for worker in workers:
            stop_process(worker)
    assert keyless.returncode == 2 and "refused by the master: it has no cluster key" in keyless_said, keyless_said
    assert wrong.returncode == 2 and "does not prove the cluster key (a wrong key)" in wrong_said, wrong_said
    assert code == 0, said
    assert said.count("master: refused worker") == 2, said
    assert "ignored an undecodable message" in said and "ignored a bogus 'heartbeat' message" in said
    assert "speaking for 'someone-else'" in said and "which has not proved the cluster key" in said
    assert master.summary["ok"] == 50
    for refused in (keyless, wrong):  # never sent a scenario
        assert "loadgen_setup" not in received(debug, refused.pid)
    assert "loadgen_setup" in received(debug, good.pid)
    assert KEY not in received(debug, good.pid) + said


def test_a_master_without_a_key_warns_when_other_hosts_can_reach_it(tmp_path: Path) -> None:
    run = subprocess.run(loadgen_cmd("run", "--target", "http://127.0.0.1:9", "--model", "m", "--rate", "1",
                                     "--duration", "1s", "--master", "--expect-workers", "1", "--master-bind-host",
                                     "0.0.0.0", "--master-bind-port", "0", "--expect-workers-max-wait", "0.3",
                                     "--out", str(tmp_path / "run")),
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "warning: no cluster key" in run.stderr and "any host that reaches port" in run.stderr, run.stderr


def test_a_worker_ignores_bogus_messages_and_leaves_a_master_that_cannot_prove_the_key(tmp_path: Path) -> None:
    context = zmq.Context()
    master = context.socket(zmq.ROUTER)
    master.setsockopt(zmq.LINGER, 0)
    port = master.bind_to_random_port("tcp://127.0.0.1")
    debug = tmp_path / "debug"
    worker = start_worker(port, debug, "--cluster-key-env", "LG_TEST_KEY", env={"LG_TEST_KEY": KEY},
                          stderr=subprocess.PIPE)
    try:
        def next_of(kind: str) -> tuple[bytes, object]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if master.poll(1000):
                    ident, raw = master.recv_multipart()
                    got, data, _ = msgpack.loads(raw)
                    if got == kind:
                        return ident, data
            raise AssertionError(f"no {kind} from the worker")

        ident, _ = next_of("client_ready")
        wid = ident.decode()
        master.send_multipart([ident, frame("ack", {"index": 0}, wid)])
        next_of("loadgen_hello")
        setup = {"run": "r1", "scenario": {"target": {"url": "http://127.0.0.1:9", "model": "m"},
                                           "open_loop": {"rate": 1, "duration": "1s"}},
                 "index": 0, "count": 1, "seed": 1}
        for raw in (b"\xc1 not msgpack", msgpack.dumps([1]), frame("ack", 5, wid),
                    frame("spawn", {"user_classes_count": {"OpenLoopUser": 1}}, wid),
                    frame("loadgen_setup", {"run": "r0"}, wid), frame("loadgen_start", [], wid),
                    frame("loadgen_challenge", {"nonce": 5}, wid), frame("loadgen_setup", setup, wid)):
            master.send_multipart([ident, raw])
        _, failed = next_of("loadgen_failed")  # the valid SETUP, from a master that has not proved the key
        assert "the master has not proven it" in failed["error"]
        master.send_multipart([ident, frame("loadgen_challenge", {"nonce": "n1"}, wid)])
        _, proof = next_of("loadgen_proof")
        assert proves(KEY.encode(), "worker", "n1", wid, proof["proof"]) and KEY not in json.dumps(proof)
        wrong = prove(WRONG_KEY.encode(), "master", proof["nonce"], wid)
        master.send_multipart([ident, frame("loadgen_welcome", {"proof": wrong}, wid)])
        _, said = worker.communicate(timeout=30)
    finally:
        stop_process(worker)
        master.close()
        context.term()
    assert worker.returncode == 2, said
    assert "the master's answer does not prove the cluster key" in said
    for ignored in ("ignored an undecodable message", "ignored a bogus 'ack' message", "ignored a 'spawn' message",
                    "ignored a bogus loadgen_setup message from the master: field 'scenario' is missing",
                    "ignored a bogus loadgen_start message from the master: its data is a list",
                    "ignored a bogus loadgen_challenge message from the master: field 'nonce' is a int"):
        assert ignored in said, said


# -- secrets and files ---------------------------------------------------------------------------------

def test_a_secret_header_is_read_by_each_worker_and_never_sent_to_it(model_store: Path, tmp_path: Path) -> None:
    server = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar", config=[ONE_MLP_WORKER],
                              grpc=False)  # token auth on
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.json").write_text(MLP_JSON)
    debug = tmp_path / "debug"
    worker = None
    try:
        token = server.keys()["inference"]
        secret = {"LG_TEST_AUTH": f"Bearer {token}", "LG_TEST_KEY": KEY}
        master = Master(["--protocol", "torchserve-http", "--target", server.inference, "--model", "mlp",
                         "--payload", str(data / "input.json"), "--header-env", "Authorization=LG_TEST_AUTH",
                         "--rate", "20", "--duration", "1s", "--cluster-key-env", "LG_TEST_KEY"],
                        tmp_path / "run", workers=1, env=secret)
        worker = start_worker(master.port, debug, "--cluster-key-env", "LG_TEST_KEY", "--data-dir", str(data),
                              env=secret)
        code, said = master.finish()
    finally:
        if worker is not None:
            stop_process(worker)
        server.stop()
    assert code == 0, said
    assert master.summary["ok"] == 20  # the server refuses a request without the token
    wire = received(debug, worker.pid)
    assert '"header_env": {"Authorization": "LG_TEST_AUTH"}' in wire
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").iterdir())
    assert token not in wire + json.dumps(shipped(debug, worker.pid)) + written + said


def test_a_worker_refuses_files_outside_its_data_dir(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "private.json").write_text("{}")
    (data / "inputs.json").symlink_to(outside / "private.json")  # inside by name, outside in fact
    master = Master(["--target", "http://127.0.0.1:9", "--model", "m", "--input-data", str(data / "inputs.json"),
                     "--rate", "1", "--duration", "1s"], tmp_path / "run", workers=1)
    worker = start_worker(master.port, tmp_path / "debug", "--data-dir", str(data))
    try:
        code, said = master.finish()
    finally:
        stop_process(worker)
    assert code == 2, said
    assert f"target.input_data = '{data / 'inputs.json'}' lies outside this worker's --data-dir" in said, said
