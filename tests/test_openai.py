"""OpenAI streaming against the reference mock (integration, real processes on 127.0.0.1, port 0).

The mock (servers/openai_mock) writes token chunk k of a stream at its arrival + ttft + k * itl, so
what the generator should measure is known: TTFT = ttft plus the loopback and the parse (well under
a millisecond), every ITL = itl, TPOT = itl, and output tokens = max_tokens per response.
"""

from __future__ import annotations

import itertools
import json
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadgen.protocols.openai import OpenAIClient
from loadgen.recorder import Recorder
from loadgen.scenario import make_target
from loadgen.sinks import read_hlog
from tests.support.processes import Server, run_loadgen, start_server, stop_process
from tests.support.timing import HostNoise

pytestmark = pytest.mark.integration

MODEL = "mock-llm"


@pytest.fixture
def openai_mock() -> Iterator:
    """Factory: openai_mock("--ttft-ms", "30", ...) -> Server (pinned to the server core), stopped after."""
    started: list[Server] = []

    def factory(*args: str) -> Server:
        server = start_server(list(args), module="servers.openai_mock")
        started.append(server)
        return server

    yield factory
    for server in started:
        stop_process(server.proc)


def mock_info(server: Server) -> dict:
    return httpx.get(server.url + "/mock", timeout=5).json()


def run_openai(server: Server, *args: str, out: Path) -> dict:
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, *args, out=out)
    assert run.returncode == 0, run.stderr
    return run.summary


def assert_near(host_noise: HostNoise, figures: dict, truth_ms: float, tolerance_ms: float,
                what: str) -> None:
    """p50 and mean within tolerance_ms of the truth, plus the host's p95 noise (at most 0.5 ms)."""
    __tracebackhide__ = True
    for key in ("p50", "mean"):
        host_noise.assert_near(figures[key], truth_ms, tolerance_ms, what=f"{what} {key} (ms)",
                               quantile="p95", cap_ms=0.5)


# -- the numbers against the declared truth ---------------------------------------------------------


def test_closed_loop_20_streams_measure_the_declared_ttft_and_itl(openai_mock, host_noise: HostNoise,
                                                                  tmp_path) -> None:
    """20 concurrent streams, ttft 30 ms, itl 10 ms, 16 tokens: p50 and mean within 2 ms, p99 within 5 ms
    (TPOT 2 ms).

    The host takes a core away for 1-3 ms a few times a second, sometimes in bursts of tens of ms
    (tests/support/timing.py); a burst delays the chunks due in it, which lifts p99 in some runs whatever
    the generator does. So p99 is allowed the host's p99.9 wake-up lateness over the test (at most 2 ms).
    """
    server = openai_mock("--ttft-ms", "30", "--itl-ms", "10")
    summary = run_openai(server, "--users", "20", "--max-tokens", "16", "--duration", "5s",
                         out=tmp_path / "run")
    assert summary["errors"] == {} and summary["ok"] == summary["requests"] > 400
    ttft, itl, tpot = summary["ttft_ms"], summary["itl_ms"], summary["tpot_ms"]
    assert_near(host_noise, ttft, 30.0, 2.0, "ttft")
    assert_near(host_noise, itl, 10.0, 2.0, "itl")
    assert_near(host_noise, tpot, 10.0, 2.0, "tpot")
    assert ttft["p50"] >= 30.0 and itl["p50"] >= 9.9  # never earlier than the server wrote them
    host_noise.assert_below(ttft["p99"], 35.0, what="ttft p99 (ms)")
    host_noise.assert_below(itl["p99"], 15.0, what="itl p99 (ms)")
    host_noise.assert_below(tpot["p99"], 12.0, what="tpot p99 (ms)")
    # every response is 16 tokens; 20 users each waiting 30 + 15 * 10 ms per response
    assert summary["output_tokens"] == 16 * summary["ok"]
    per_user = 16 / ((30 + 15 * 10) / 1000)
    # responses still in flight at the window's end are not counted (as achieved_rps): up to half a
    # response a user, 1.8 % of 5 s here
    assert 0.95 * 20 * per_user <= summary["output_tokens_per_s"] <= 1.01 * 20 * per_user, summary
    # every request the mock accepted was measured or a warm-up
    assert mock_info(server)["completions"] == summary["requests"] + summary["warmup_requests"]
    hlog = read_hlog(tmp_path / "run" / "latency.hlog")
    assert sum(h.get_total_count() for h in hlog["itl"]) == 15 * summary["ok"]
    assert {"ttft", "ttft_service", "tpot"} <= set(hlog)


def test_open_loop_ttft_counts_from_the_intended_send(openai_mock, host_noise: HostNoise, tmp_path) -> None:
    """Poisson arrivals: TTFT is measured from each intended instant, so it is the service-side TTFT
    (from the actual send) plus the schedule lag, request by request."""
    server = openai_mock("--ttft-ms", "20", "--itl-ms", "5")
    summary = run_openai(server, "--rate", "40", "--arrival", "poisson", "--duration", "4s",
                         "--max-tokens", "8", "--endpoint", "completions", out=tmp_path / "run")
    assert summary["errors"] == {} and summary["dropped"] == 0 and summary["requests"] > 100
    ttft, service, lag = summary["ttft_ms"], summary["ttft_service_ms"], summary["lag_ms"]
    assert_near(host_noise, ttft, 20.0, 2.0, "ttft")
    assert_near(host_noise, summary["itl_ms"], 5.0, 2.0, "itl")
    # mean(first - intended) = mean(first - sent) + mean(sent - intended); HDR buckets are 0.1 % wide
    assert ttft["mean"] == pytest.approx(service["mean"] + lag["mean"], abs=0.05)
    host_noise.assert_near(summary["latency_ms"]["p50"], 20 + 7 * 5, 2.0, what="latency p50 (ms)",
                           quantile="p95", cap_ms=0.5)


def test_a_late_send_counts_in_ttft_but_not_in_the_service_ttft(openai_mock, host_noise: HostNoise) -> None:
    """The client and recorder without Locust (plain sockets): a request whose intended instant was
    0.5 s before it could be sent has TTFT 0.5 s + ttft, and service-side TTFT ttft."""
    server = openai_mock("--ttft-ms", "20", "--itl-ms", "4")
    target = make_target(url=server.url, model=MODEL, protocol="openai", max_tokens=6, input_tokens=8)
    client = OpenAIClient(target, seed=1)
    try:
        client.prepare()
        outcome = client.send(time.monotonic() - 0.5)
    finally:
        client.close()
    assert outcome.error is None and outcome.output_tokens == 6 and len(outcome.token_times) == 6
    rec = Recorder(start_t=outcome.intended_t, streams=True)
    rec.record_stream(outcome.intended_t, outcome.sent_t, outcome.done_t, outcome.error, outcome.token_times,
                      outcome.output_tokens)
    rec.finish(outcome.done_t + 1)
    figures = rec.cumulative
    # one request: each figure is one event, allowed the host's largest wake-up lateness (at most 2 ms)
    for which, truth, tolerance in (("ttft", 520.0, 2.0), ("ttft_service", 20.0, 2.0), ("lag", 500.0, 1.0),
                                    ("tpot", 4.0, 1.0)):
        host_noise.assert_near(figures.percentiles_ms(which)["max"], truth, tolerance, what=f"{which} (ms)",
                               quantile="max")


def test_the_mock_keeps_its_declared_timing_on_the_wire(openai_mock, host_noise: HostNoise) -> None:
    """A plain blocking socket times one stream: the ground truth is exact before loadgen measures it."""
    server = openai_mock("--ttft-ms", "25", "--itl-ms", "8")
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                       "stream": True}).encode()
    request = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ttfts, gaps = [], []
        for stream in range(4):  # the first stream warms both sides; the other three are timed
            sent = time.monotonic()
            sock.sendall(request + body)
            arrivals, data = [], b""
            while not data.endswith(b"0\r\n\r\n"):
                piece = sock.recv(65536)
                assert piece, "connection closed mid-stream"
                data += piece
                arrivals += [time.monotonic()] * piece.count(b'"content":" ')
            assert len(arrivals) == 12
            if stream:
                ttfts.append((arrivals[0] - sent) * 1000)
                gaps += [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    # a mock on the loop's millisecond timers would be off by up to 1 ms: the caps keep that failing
    host_noise.assert_near(statistics.median(ttfts), 25.0, 0.5, what=f"median ttft (ms) of {ttfts}",
                           quantile="p95", cap_ms=0.3)
    host_noise.assert_near(statistics.median(gaps), 8.0, 0.1, what=f"median gap (ms) of {gaps}",
                           quantile="p95", cap_ms=0.3)
    host_noise.assert_within(  # a host pause may move one gap, and the p99 noise each a little
        lambda allowance_ms: sum(abs(g - 8.0) < 0.5 + allowance_ms for g in gaps) >= 0.9 * len(gaps),
        lambda allowance_ms: f"under 90 % of the gaps within {0.5 + allowance_ms:.3f} ms of 8 ms: {gaps}",
        quantile="p99", cap_ms=0.3)


# -- errors -------------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_connection_keeps_serving(openai_mock) -> None:
    server = openai_mock()
    url = server.url
    chat = f"{url}/v1/chat/completions"
    with httpx.Client(timeout=5) as client:
        user = [{"role": "user", "content": "x"}]
        cases = [
            (b"{not json", 400, None, None),
            (json.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, None, None),
            (json.dumps({"model": MODEL}), 400, "messages", "missing_required_parameter"),
            (json.dumps({"model": MODEL, "messages": []}), 400, "messages", "empty_array"),
            (json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400,
             "messages[0].role", "invalid_value"),
            (json.dumps({"model": MODEL, "messages": user, "max_tokens": 0}), 400,
             "max_tokens", "integer_below_min_value"),
            (json.dumps({"model": MODEL, "messages": user, "max_tokens": "3"}), 400,
             "max_tokens", "invalid_type"),
            (json.dumps({"model": MODEL, "messages": user, "stream_options": {"include_usage": True}}), 400,
             "stream_options", None),
            (json.dumps({"model": "gpt-nope", "messages": user}), 404, None, "model_not_found"),
        ]
        for body, status, param, code in cases:
            response = client.post(chat, content=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["type"] == "invalid_request_error"
            assert (error["param"], error["code"]) == (param, code), (body, error)
        no_prompt = client.post(f"{url}/v1/completions", json={"model": MODEL})
        assert no_prompt.status_code == 400 and no_prompt.json()["error"]["param"] == "prompt"
        assert client.get(chat).status_code == 405
        assert client.get(f"{url}/v1/nothing").json()["error"]["code"] == "unknown_url"
        # the same keep-alive connection still serves, streamed and not
        answer = client.post(chat, json={"model": MODEL, "messages": [{"role": "user", "content": "a b"}],
                                         "max_tokens": 3})
        assert answer.status_code == 200
        assert answer.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"
        with client.stream("POST", chat, json={"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                                                "max_tokens": 2, "stream": True}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line for line in stream.iter_lines() if line]
        assert events[-1] == "data: [DONE]" and len(events) == 5  # role, 2 tokens, finish, [DONE]
        models = client.get(f"{url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL] and client.get(f"{url}/health").status_code == 200
    assert mock_info(server)["rejected"] == len(cases) + 3


def test_cut_streams_and_error_events_are_errors_of_their_own_kind(openai_mock, tmp_path) -> None:
    server = openai_mock("--ttft-ms", "2", "--itl-ms", "1", "--truncate-every", "4", "--error-every", "5")
    summary = run_openai(server, "--users", "4", "--max-tokens", "8", "--duration", "2s",
                         out=tmp_path / "run")
    warmups, total = summary["warmup_requests"], summary["warmup_requests"] + summary["requests"]

    def multiples(k: int) -> set[int]:
        return {n for n in range(warmups + 1, total + 1) if n % k == 0}

    truncated, errored = multiples(4), multiples(5) - multiples(4)
    assert summary["errors"] == {"stream_truncated": len(truncated), "stream_error": len(errored)}
    assert summary["ok"] == summary["requests"] - len(truncated) - len(errored)
    assert summary["output_tokens"] == 8 * summary["ok"]  # failed streams give no tokens
    info = mock_info(server)
    assert info["streams"] == total and info["truncated"] == len(truncated)


def test_unknown_model_and_unreachable_target_exit_2(openai_mock, tmp_path) -> None:
    server = openai_mock()
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", "other", "--users", "1",
                      "--duration", "1s", out=tmp_path / "a")
    assert run.returncode == 2
    assert "model 'other' is not served" in run.stderr and MODEL in run.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = run_loadgen("--protocol", "openai", "--target", f"http://127.0.0.1:{port}", "--model", MODEL,
                      "--users", "1", "--duration", "1s", "--connect-timeout", "1s", out=tmp_path / "b")
    assert run.returncode == 2 and "cannot reach" in run.stderr


# -- scenario files -----------------------------------------------------------------------------


def test_scenario_file_with_prompt_file_runs(openai_mock, tmp_path) -> None:
    server = openai_mock("--ttft-ms", "1", "--itl-ms", "1")
    prompts = tmp_path / "prompts.jsonl"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompts.write_text(json.dumps({"prompt": "tell me a story"}) + "\n"
                       + json.dumps({"messages": messages, "max_tokens": 3}) + "\n")
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'[target]\nurl = "{server.url}"\nmodel = "{MODEL}"\nprotocol = "openai"\n'
                        f'max_tokens = 5\nprompt_file = "{prompts}"\n'
                        '[closed_loop]\nusers = 2\nduration = "1s"\n')
    run = run_loadgen(str(scenario), out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["errors"] == {} and summary["ok"] > 10
    # the lines alternate: 5 tokens (the target's max_tokens), then the line's own 3
    assert 3 * summary["ok"] <= summary["output_tokens"] <= 5 * summary["ok"]
    assert "ttft" in run.stdout and "output" in run.stdout


def test_scenario_file_with_bad_keys_exits_2_naming_each(tmp_path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('[target]\nurl = "http://127.0.0.1:9"\nmodel = "m"\nprotocol = "openai"\n'
                        'max_token = 16\nendpoint = "embeddings"\ninput_tokens = "uniform:9,3"\n'
                        '[closed_loop]\nusers = 1\nduration = "1s"\n')
    run = run_loadgen(str(scenario), out=tmp_path / "run", timeout=30)
    assert run.returncode == 2
    for named in ("target.max_token: unknown key", "target.endpoint", "target.input_tokens", "low <= high"):
        assert named in run.stderr, run.stderr
