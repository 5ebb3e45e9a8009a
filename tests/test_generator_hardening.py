"""The generator against servers that misbehave on purpose: a server that drips its answer a byte at a
time, one that goes quiet inside a stream, one that answers without end; a client whose send raises;
scenario values that cannot work. Each server is a few lines on 127.0.0.1, port 0, in this process.

What must hold: `timeout` is a deadline for the whole request (a drip cannot keep a request alive), a
stream's first byte and gaps have their own limits, an answer past --max-response-bytes is its own
error kind, every request ends in exactly one count, and a bad value is refused naming its key.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest

from loadgen.driver.context import LoadContext
from loadgen.errors import ScenarioError, classify_exception
from loadgen.outcome import Outcome
from loadgen.protocols.common.http1 import Http1Pool, build_request
from loadgen.protocols.openai import SseStream, StreamPool
from loadgen.scenario import validate_scenario
from loadgen.sinks.summary import write_summary
from tests.support.processes import ROOT, run_loadgen
from tests.support.timing import HostNoise

_REQUEST = build_request("GET", "127.0.0.1", "/")
_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"


class MisbehavingServer:
    """Accepts connections; on each, reads one request head and then runs `act(conn)`, which scripts the
    answer. Every action ends on its own within seconds (or as soon as the client hangs up)."""

    def __init__(self, act: Callable[[socket.socket], None]) -> None:
        self.act = act
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            try:
                self.act(conn)
            except OSError:  # the client hung up: what these tests expect of it
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], MisbehavingServer]]:
    servers: list[MisbehavingServer] = []

    def start(act: Callable[[socket.socket], None]) -> MisbehavingServer:
        server = MisbehavingServer(act)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def drip(head: bytes, interval_s: float, count: int) -> Callable[[socket.socket], None]:
    """Send `head`, then one byte every `interval_s`, `count` bytes in all (far short of the answer)."""

    def act(conn: socket.socket) -> None:
        conn.sendall(head)
        for _ in range(count):
            time.sleep(interval_s)
            conn.sendall(b"x")

    return act


def quiet(head: bytes, for_s: float) -> Callable[[socket.socket], None]:
    def act(conn: socket.socket) -> None:
        conn.sendall(head)
        time.sleep(for_s)

    return act


def timed(call: Callable[[], object]) -> tuple[str, float]:
    """(error kind, seconds) of one call expected to raise."""
    start = time.monotonic()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the kind is what is checked
        return classify_exception(exc), time.monotonic() - start
    return "no error", time.monotonic() - start


# -- timeout: a deadline -------------------------------------------------------------------------

def test_a_dripping_server_times_out_each_request_at_the_deadline(serve, host_noise: HostNoise) -> None:
    """A byte every 0.2 s never leaves the socket idle for a whole timeout: each request must still end
    as `timeout` at 0.5 s (within + 10 %), where a per-read timeout would wait out all 4 s of drip."""
    server = serve(drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 0.2, 20))
    timeout = 0.5
    for _ in range(3):
        pool = Http1Pool("127.0.0.1", server.port, connect_timeout=1.0, timeout=timeout)
        kind, took = timed(lambda pool=pool: pool.send(_REQUEST))
        pool.close()
        assert kind == "timeout"
        assert took >= timeout - 0.005
        host_noise.assert_below(took, timeout * 1.1, what="a dripped request's end (s)", quantile="max",
                                unit=1000.0)


def test_a_dripping_stream_head_times_out_at_the_first_byte_limit(serve, host_noise: HostNoise) -> None:
    """A stream whose head is dripped (never complete) ends at its first-byte limit, not its gap limit."""
    server = serve(drip(b"", 0.1, 40))
    pool = StreamPool("127.0.0.1", server.port, connect_timeout=1.0, timeout=5.0)
    pool.first_byte_timeout, pool.gap_timeout = 0.5, 5.0
    kind, took = timed(lambda: pool.stream(_REQUEST, SseStream(), streamed=True))
    assert kind == "timeout"
    host_noise.assert_below(took, 0.55, what="a dripped stream head's end (s)", quantile="max", unit=1000.0)


def test_a_stream_that_goes_quiet_times_out_at_its_gap_limit(serve, host_noise: HostNoise) -> None:
    server = serve(quiet(_SSE_HEAD + b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', 3.0))
    pool = StreamPool("127.0.0.1", server.port, connect_timeout=1.0, timeout=5.0)
    pool.first_byte_timeout, pool.gap_timeout = 5.0, 0.4
    sse = SseStream()
    kind, took = timed(lambda: pool.stream(_REQUEST, sse, streamed=True))
    assert kind == "timeout"
    assert sse.chunk_tokens == 1  # the event before the silence was taken
    assert took >= 0.4 - 0.005
    host_noise.assert_below(took, 0.44, what="a quiet stream's end (s)", quantile="max", unit=1000.0)


# -- answers too large ---------------------------------------------------------------------------

def endless_chunked(head_extra: bytes = b"") -> Callable[[socket.socket], None]:
    """A chunked answer of 64 KiB chunks, up to 8 MiB: far past the limits the tests set."""

    def act(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + head_extra + b"\r\n")
        chunk = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
        for _ in range(128):
            conn.sendall(chunk)

    return act


def test_an_answer_past_the_limit_is_response_too_large_and_its_connection_closed(serve) -> None:
    server = serve(endless_chunked())
    pool = Http1Pool("127.0.0.1", server.port, connect_timeout=1.0, timeout=5.0, max_response_bytes=256 * 1024)
    kind, _ = timed(lambda: pool.send(_REQUEST))
    assert kind == "response_too_large"
    assert not pool._idle  # the connection was closed, not pooled
    announced = serve(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n"))
    pool = Http1Pool("127.0.0.1", announced.port, connect_timeout=1.0, timeout=5.0, max_response_bytes=1024)
    assert timed(lambda: pool.send(_REQUEST))[0] == "response_too_large"


def test_an_event_that_never_ends_is_cut_at_its_limit(serve) -> None:
    """`data: yyyy...` without the blank line that ends an event: cut at max_event_bytes."""

    def act(conn: socket.socket) -> None:
        conn.sendall(_SSE_HEAD + b"data: ")
        for _ in range(64):
            conn.sendall(b"y" * 0x10000)

    server = serve(act)
    pool = StreamPool("127.0.0.1", server.port, connect_timeout=1.0, timeout=5.0)
    sse = SseStream(max_event_bytes=100_000)
    kind, _ = timed(lambda: pool.stream(_REQUEST, sse, streamed=True))
    assert kind == "event_too_large"
    assert sse.body_bytes < 400_000  # cut near the limit, not at the end of the 4 MiB


# -- every request counted once ------------------------------------------------------------------

class RaisingClient:
    """A protocol client with bugs: every other send raises (a RecursionError, a ValueError), some after
    waiting for an answer, as a plug-in's send might."""

    request_name = "raising"
    warmup_requests = 0

    def __init__(self) -> None:
        self.sent = 0

    def send(self, intended_t: float) -> Outcome:
        self.sent += 1
        number = self.sent
        if number % 4 == 1:
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
        gevent.sleep(0.002)
        if number % 4 == 3:
            raise ValueError("invalid literal for int() with base 10: 'abc'")
        now = time.monotonic()
        return Outcome(intended_t, intended_t, now)


def test_a_client_whose_send_raises_loses_no_request_from_the_counts() -> None:
    """200 arrivals/s for 0.5 s through the real dispatcher and recorder: sent == ok + errors + in flight
    at the end, and each raise is counted under its type."""
    scenario = validate_scenario({"target": {"url": "http://127.0.0.1:9", "model": "m"},
                                  "open_loop": {"rate": 200, "duration": 0.5, "max_in_flight": 1000}})
    client = RaisingClient()
    ctx = LoadContext(scenario, client)  # type: ignore[arg-type]
    ctx.begin()
    gevent.spawn(ctx.run_open_loop).join()
    in_flight_at_end = ctx.in_flight
    ctx.finish(time.monotonic())
    figures = ctx.recorder.cumulative
    assert client.sent >= 90
    assert client.sent == figures.ok + sum(figures.errors.values()) + in_flight_at_end, figures.errors
    assert figures.errors.get("client_error:RecursionError", 0) >= client.sent // 4
    assert figures.errors.get("client_error:ValueError", 0) >= 1


# -- values that cannot work ---------------------------------------------------------------------

@pytest.mark.parametrize(("section", "patch", "key"), [
    ("open_loop", {"rate": float("inf")}, "open_loop.rate"),
    ("open_loop", {"rate": float("nan")}, "open_loop.rate"),
    ("open_loop", {"duration": float("inf")}, "open_loop.duration"),
    ("open_loop", {"duration": "9" * 400}, "open_loop.duration"),  # overflows a float to inf
    ("target", {"timeout": float("nan")}, "target.timeout"),
    ("target", {"connect_timeout": float("inf")}, "target.connect_timeout"),
    ("target", {"headers": {"X-Key": "a\r\nX-Injected: 1"}}, "target.headers"),
    ("target", {"headers": {"X-Key": "a\nb"}}, "target.headers"),
    ("target", {"headers": {"X Key": "a"}}, "target.headers"),
    ("target", {"max_response_bytes": 0}, "target.max_response_bytes"),
])
def test_values_that_cannot_work_are_refused_naming_their_key(section: str, patch: dict, key: str) -> None:
    data = {"target": {"url": "http://127.0.0.1:9", "model": "m"}, "open_loop": {"rate": 10, "duration": 1}}
    data[section] = {**data[section], **patch}
    with pytest.raises(ScenarioError) as caught:
        validate_scenario(data)
    assert any(problem.startswith(key + ":") for problem in caught.value.problems), caught.value.problems
    assert caught.value.exit_code == 2


def test_a_users_count_no_host_could_hold_is_refused_naming_its_key() -> None:
    data = {"target": {"url": "http://127.0.0.1:9", "model": "m"}, "closed_loop": {"users": 2_000_000, "duration": 1}}
    with pytest.raises(ScenarioError) as caught:
        validate_scenario(data)
    assert any(problem.startswith("closed_loop.users:") for problem in caught.value.problems), caught.value.problems


_UNDER_HARD_LIMIT = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
sys.argv = ["loadgen", *sys.argv[1:]]
runpy.run_module("loadgen", run_name="__main__")
"""


def _under_hard_limit(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """`loadgen run ARGS` against a closed port (the target check fails, exit 2, once the users are taken),
    with a hard open-file limit of 1024 that its workers inherit; the answer, and the closed port."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", _UNDER_HARD_LIMIT, "run", "--target", f"http://127.0.0.1:{closed}",
                           "--model", "m", *args, "--duration", "1s", "--connect-timeout", "0.5s", "--no-keep-awake",
                           "--out", "/nonexistent/never-written"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    return done, closed


def test_more_users_than_the_hard_file_limit_holds_are_refused_before_anything_is_sent() -> None:
    """Under a hard open-file limit of 1024: 900 users (1,156 descriptors with the headroom) exit 2 naming
    closed_loop.users before the target is even tried; 700 fit, and go on to the target check (nothing
    listens there: exit 2 for that)."""
    refused, _ = _under_hard_limit("--users", "900")
    assert refused.returncode == 2
    assert ("closed_loop.users: 900 connections need 1156 open files, more than this host's hard limit of 1024"
            in refused.stderr), refused.stderr
    fits, closed = _under_hard_limit("--users", "700")
    assert fits.returncode == 2 and "closed_loop.users" not in fits.stderr
    assert f"127.0.0.1:{closed}" in fits.stderr, fits.stderr


def test_a_workers_share_of_users_beyond_its_hard_file_limit_is_refused_by_the_worker() -> None:
    """`--processes 2` under a hard open-file limit of 1024 (the workers inherit it): 1800 users are 900 a
    worker, which cannot fit; each worker refuses its share naming closed_loop.users and the run exits 2
    before anything is sent. 1400 (700 a worker) fit and go on to the target check (nothing listens: exit 2
    for that)."""
    refused, _ = _under_hard_limit("--users", "1800", "--processes", "2")
    assert refused.returncode == 2, refused.stderr
    assert "closed_loop.users: this worker's 900 users: 900 connections need 1156 open files" in refused.stderr, \
        refused.stderr
    fits, closed = _under_hard_limit("--users", "1400", "--processes", "2")
    assert fits.returncode == 2 and "closed_loop.users" not in fits.stderr, fits.stderr
    assert f"127.0.0.1:{closed}" in fits.stderr, fits.stderr


# -- results whole or not at all; no credentials in them -----------------------------------------

def test_a_summary_whose_writing_fails_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    """Writing stops part-way (a value JSON cannot write, as a kill would stop it): summary.json is still
    the previous complete file, and no partial file is left beside it."""
    path = tmp_path / "summary.json"
    write_summary(path, {"sent": 1, "ok": 1})
    with pytest.raises(TypeError):
        write_summary(path, {"sent": 2, "ok": 2, "notes": object()})
    assert json.loads(path.read_text()) == {"sent": 1, "ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_url_s_user_and_password_are_never_printed_or_written(calibration_server, tmp_path: Path) -> None:
    server = calibration_server()
    port = server.url.rsplit(":", 1)[1]
    secret_url = f"http://ann:s3cret-pw@127.0.0.1:{port}"
    run = run_loadgen("--target", secret_url, "--model", "m", "--rate", "50", "--duration", "1s",
                      out=tmp_path / "ok", timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.summary["target"]["url"] == f"http://***@127.0.0.1:{port}"
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "ok").iterdir() if p.is_file())
    assert "s3cret-pw" not in run.stdout + run.stderr + written
    with socket.socket() as unused:  # a port nothing listens on: the run fails, naming the URL
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    failed = run_loadgen("--target", f"http://ann:s3cret-pw@127.0.0.1:{closed}", "--model", "m", "--rate", "5",
                         "--duration", "1s", "--connect-timeout", "0.5s", out=tmp_path / "failed", timeout=60)
    assert failed.returncode == 2
    assert "cannot reach http://***@127.0.0.1" in failed.stderr
    assert "s3cret-pw" not in failed.stdout + failed.stderr


# -- the open-file limit -------------------------------------------------------------------------

_FD_PROBE = """
import resource, sys
from loadgen.lowlevel.fdlimit import FD_HEADROOM, ensure_fd_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 1024))
fits = ensure_fd_limit(1024 - FD_HEADROOM)
raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
short = ensure_fd_limit(5000)
print(repr(fits), raised, resource.getrlimit(resource.RLIMIT_NOFILE)[0], short, sep="|")
"""


def test_the_open_file_limit_is_raised_to_what_the_connections_need_or_the_run_says_why() -> None:
    """In a child with a soft limit of 64 under a hard one of 1024: a need within the hard limit raises the
    soft one to it, silently; a need past it raises it to the hard limit and says so."""
    import subprocess
    import sys

    from loadgen.driver.selfcheck import SelfCheck

    done = subprocess.run([sys.executable, "-c", _FD_PROBE], capture_output=True, text=True, timeout=30, check=True)
    fits, raised, at_hard, short = done.stdout.strip().split("|")
    assert fits == "''" and int(raised) == 1024 and int(at_hard) == 1024
    assert "hard limit" in short and "5000 connections" in short
    check = SelfCheck(lag_ms={}, fd_note=short).as_json()
    assert check["bound"] and {"kind": "fd_limit", "text": short} in check["findings"]
    assert SelfCheck.from_json(check).fd_note == short
