"""OpenAI streaming, without servers: SSE parsing, what the recorder makes of token timings, the sinks'
stream figures, token-count specs and prompt files."""

from __future__ import annotations

import doctest
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from loadgen.errors import ConnectionClosed
from loadgen.protocols import openai as openai_client
from loadgen.protocols.common.http1 import _Reader
from loadgen.protocols.openai import (
    SseStream,
    _read_streamed,
    read_prompt_file,
    sample_counts,
    synthetic_prompt,
)
from loadgen.recorder import HistogramSet, Recorder
from loadgen.scenario import ScenarioError, TokenCount, load_scenario
from loadgen.sinks import build_summary, read_hlog, render_table, write_hlog
from servers.openai_mock._app import Completion, MockApp, MockConfig, Renderer, Reply


def chunk(content: str | None = None, *, text: str | None = None, usage: dict | None = None) -> bytes:
    if text is not None:
        choices = [{"index": 0, "text": text, "finish_reason": None}]
    elif content is not None:
        choices = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    else:
        choices = []
    return b"data: " + json.dumps({"choices": choices, "usage": usage}).encode() + b"\n\n"


# -- SSE parsing ------------------------------------------------------------------------------------


def test_events_split_anywhere_are_reassembled_and_stamped_when_complete() -> None:
    usage = chunk(usage={"completion_tokens": 7})
    body = b"".join([chunk(""), chunk("a"), b": keep-alive\n\n", chunk("b"), usage, b"data: [DONE]\n\n"])
    sse = SseStream()
    for i in range(len(body)):  # one byte a read: each event completes at the read of its last byte
        sse.feed(body[i:i + 1], float(i))
    ends = [body.index(c) + len(c) - 1 for c in (chunk("a"), chunk("b"))]
    assert sse.token_times == [float(end) for end in ends]
    assert sse.done and sse.chunk_tokens == 2
    assert sse.output_tokens == 7  # usage wins over the chunk count
    assert sse.body_bytes == len(body)


def test_crlf_events_role_only_chunks_and_completions_text() -> None:
    sse = SseStream()
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\r\n\r\n'
    sse.feed(role + chunk("x").replace(b"\n", b"\r\n"), 1.0)
    sse.feed(chunk(text="y") + chunk(text=""), 2.0)
    assert sse.token_times == [1.0, 2.0]  # the role chunk and the empty text are not tokens
    assert not sse.done and sse.output_tokens == 2  # no usage: counted from chunks


def test_error_events_and_bad_json_are_kept() -> None:
    sse = SseStream()
    sse.feed(chunk("a") + b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n', 1.0)
    assert sse.error == "overloaded"
    named = SseStream()
    named.feed(b'event: error\ndata: {"message": "bad"}\n\n', 1.0)
    assert named.error == "bad"
    broken = SseStream()
    broken.feed(b"data: {not json\n\n", 1.0)
    assert broken.invalid is not None and "not JSON" in broken.invalid


def test_multi_line_data_is_joined() -> None:
    sse = SseStream()
    sse.feed(b'data: {"choices":\ndata: [{"delta":{"content":"z"}}]}\n\n', 3.0)
    assert sse.token_times == [3.0]


# -- the body framings a stream may come in ---------------------------------------------------------


def read_from_bytes(wire: bytes) -> tuple[SseStream, int, bool]:
    """Parse `wire` (a whole response) the way StreamPool does; returns the SSE state, status, keep."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(wire)
        theirs.shutdown(socket.SHUT_WR)
        sse = SseStream()
        response, keep = _read_streamed(_Reader(ours, timestamps=False), sse)
        return sse, response.status, keep


EVENTS = chunk("a") + chunk("b") + b"data: [DONE]\n\n"
SSE_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def test_chunked_length_and_read_to_close_bodies() -> None:
    pieces = [EVENTS[:7], EVENTS[7:40], EVENTS[40:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    for head, body, kept in [
        (SSE_HEAD + "Transfer-Encoding: chunked\r\n\r\n", chunked, True),
        (SSE_HEAD + f"Content-Length: {len(EVENTS)}\r\n\r\n", EVENTS, True),
        (SSE_HEAD + "Connection: close\r\n\r\n", EVENTS, False),
    ]:
        sse, status, keep = read_from_bytes(head.encode() + body)
        assert (status, keep, sse.chunk_tokens, sse.done) == (200, kept, 2, True), head


def test_a_cut_chunked_stream_raises_connection_closed_after_its_tokens() -> None:
    wire = (SSE_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n" % (9, chunk("a")[:9])
    with pytest.raises(ConnectionClosed):
        read_from_bytes(wire)
    whole = chunk("a")
    sse = SseStream()
    with pytest.raises(ConnectionClosed):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall((SSE_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode()
                           + b"%x\r\n%s\r\n" % (len(whole), whole))
            theirs.shutdown(socket.SHUT_WR)
            _read_streamed(_Reader(ours, timestamps=False), sse)
    assert sse.status == 200 and sse.chunk_tokens == 1 and not sse.done


def test_an_error_status_is_read_whole() -> None:
    body = b'{"error": {"message": "bad max_tokens", "type": "invalid_request_error"}}'
    wire = f"HTTP/1.1 400 Bad Request\r\nContent-Length: {len(body)}\r\n\r\n"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(wire.encode() + body)
        sse = SseStream()
        response, keep = _read_streamed(_Reader(ours, timestamps=False), sse)
    assert (response.status, response.body, keep, sse.body_bytes) == (400, body, True, 0)


# -- recorder ------------------------------------------------------------------------------------------


def test_record_stream_ttft_from_intended_itl_pooled_tpot_per_response() -> None:
    rec = Recorder(start_t=0.0, window_end_t=10.0, streams=True)
    # intended 1.000, sent 1.002 (2 ms late), tokens at 1.030, 1.040, 1.055; usage says 3 tokens
    rec.record_stream(1.000, 1.002, 1.056, None, [1.030, 1.040, 1.055], 3)
    # a second response: two chunks carrying 5 tokens (usage), completes after the window
    rec.record_stream(2.000, 2.000, 10.5, None, [2.100, 2.120], 5)
    rec.record_stream(3.000, 3.000, 3.5, "stream_truncated", [3.1], 1)  # failed: no token figures
    rec.record_stream(4.000, 4.000, 4.1, None, [], 0)  # ok without a token chunk
    rec.finish(11.0)
    figures = rec.cumulative
    stream = figures.stream
    assert stream is not None
    assert figures.ok == 3 and figures.errors == {"stream_truncated": 1}
    assert stream.streams == 3 and stream.output_tokens == 8 and stream.output_tokens_in_window == 3
    assert sorted(_values(stream.ttft)) == pytest.approx([30_000, 100_000], rel=1e-3)  # from intended
    assert sorted(_values(stream.ttft_service)) == pytest.approx([28_000, 100_000], rel=1e-3)
    # gaps inside each response only: 10 ms, 15 ms, 20 ms (not the 1.055 -> 2.100 one)
    assert sorted(_values(stream.itl)) == pytest.approx([10_000, 15_000, 20_000], rel=1e-3)
    # (1.055 - 1.030) / 2 = 12.5 ms; (2.120 - 2.100) / 4 = 5 ms
    assert sorted(_values(stream.tpot)) == pytest.approx([5_000, 12_500], rel=1e-3)
    assert figures.latency.get_total_count() == 3 and figures.lag.get_total_count() == 4


def _values(hist) -> list[int]:
    return [item.value_iterated_to for item in hist.get_recorded_iterator()
            for _ in range(item.count_at_value_iterated_to)]


def test_stream_figures_merge_and_encode_exactly() -> None:
    parts = [Recorder(start_t=0.0, streams=True) for _ in range(2)]
    for k, rec in enumerate(parts):
        rec.record_stream(0.0, 0.0, 0.2, None, [0.03 + k * 0.01, 0.04 + k * 0.01, 0.05 + k * 0.02], 3)
        rec.finish(1.0)
    merged = HistogramSet()
    for rec in parts:
        merged.add(HistogramSet.decode(json.loads(json.dumps(rec.cumulative.encode()))))
    assert merged.stream is not None and merged.stream.output_tokens == 6
    for which in ("ttft", "ttft_service", "itl", "tpot"):
        assert merged.stream and getattr(merged.stream, which).get_total_count() > 0
        assert merged.percentiles_ms(which)["max"] > 0
    plain = Recorder(start_t=0.0)
    plain.record(0.0, 0.0, 0.1, None)
    plain.finish(1.0)
    assert plain.cumulative.stream is None and "stream" not in plain.cumulative.encode()
    with pytest.raises(ValueError, match="latency, service, lag, not 'ttft'"):
        plain.cumulative.percentiles_ms("ttft")


def test_summary_table_and_hlog_carry_the_stream_figures(tmp_path: Path) -> None:
    rec = Recorder(start_t=0.0, window_end_t=2.0, streams=True)
    for k in range(10):
        t = k * 0.1
        rec.record_stream(t, t, t + 0.06, None, [t + 0.02 + 0.01 * j for j in range(4)], 4)
    rec.close_interval(1.0)
    rec.finish(2.0)
    summary = build_summary(rec, offered_rps=10.0, duration_s=2.0, generator={})
    assert summary["ttft_ms"]["p50"] == pytest.approx(20.0, rel=1e-3)
    assert summary["itl_ms"]["mean"] == pytest.approx(10.0, rel=1e-2)
    assert summary["tpot_ms"]["max"] == pytest.approx(10.0, rel=1e-2)
    assert set(summary["ttft_service_ms"]) == set(summary["latency_ms"])
    assert summary["output_tokens"] == 40 and summary["output_tokens_per_s"] == 20.0
    table = render_table(summary)
    for row in ("ttft", "itl", "tpot"):
        assert any(line.startswith(row) for line in table.splitlines()), table
    assert "output 20.0/s" in table
    write_hlog(tmp_path / "run.hlog", rec, 1_700_000_000.0)
    by_tag = read_hlog(tmp_path / "run.hlog")
    assert {"ttft", "ttft_service", "itl", "tpot"} <= set(by_tag)
    assert sum(h.get_total_count() for h in by_tag["itl"]) == 30
    plain = build_summary(Recorder(start_t=0.0), offered_rps=1.0, duration_s=1.0, generator={})
    assert "ttft_ms" not in plain and "tokens" not in render_table(plain)


# -- token counts, prompts -----------------------------------------------------------------------------


def test_token_counts_from_specs() -> None:
    rng = np.random.default_rng(3)
    assert sample_counts(TokenCount(value=16), 3, rng).tolist() == [16, 16, 16]
    uniform = sample_counts(TokenCount(dist="uniform", low=8, high=12), 2000, rng)
    assert uniform.min() == 8 and uniform.max() == 12
    normal = sample_counts(TokenCount(dist="normal", mean=100, stddev=10), 4000, rng)
    assert normal.mean() == pytest.approx(100, abs=1) and normal.std() == pytest.approx(10, rel=0.1)
    assert sample_counts(TokenCount(dist="normal", mean=1, stddev=50), 500, rng).min() >= 1
    assert len(synthetic_prompt(37, rng).split()) == 37


def test_prompt_file_lines_and_problems(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    line = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'
    good.write_text('{"prompt": "hello"}\n\n' + line)
    assert read_prompt_file(good, "chat") == [("hello", None), ([{"role": "user", "content": "hi"}], 5)]
    with pytest.raises(ScenarioError, match="line 3: .*needs the chat endpoint"):
        read_prompt_file(good, "completions")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\nnot json\n{"prompt": "x", "max_tokens": 0}\n')
    with pytest.raises(ScenarioError) as info:
        read_prompt_file(bad, "chat")
    assert [p.split(": ", 2)[1] for p in info.value.problems] == [f"{bad} line {n}" for n in (1, 2, 3)]


def test_openai_target_keys_are_validated(tmp_path: Path) -> None:
    base = {"target.url": "http://127.0.0.1:1", "target.model": "m", "closed_loop.users": 1,
            "closed_loop.duration": "1s"}
    scenario = load_scenario(None, {**base, "target.protocol": "openai", "target.max_tokens": "normal:64,8",
                                    "target.input_tokens": 32, "target.endpoint": "completions"})
    assert str(scenario.target.max_tokens) == "normal:64,8" and scenario.target.input_tokens.value == 32
    cases = {
        "target.max_tokens": {"target.max_tokens": 16},  # kserve-http takes no max_tokens
        "target.endpoint": {"target.protocol": "openai", "target.endpoint": "rerank"},
        "target.input_tokens": {"target.protocol": "openai", "target.input_tokens": "gauss:3,1"},
        "target.prompt_file": {"target.protocol": "openai", "target.prompt_file": str(tmp_path / "no.jsonl")},
    }
    for key, overrides in cases.items():
        with pytest.raises(ScenarioError) as info:
            load_scenario(None, {**base, **overrides})
        assert key.split(".")[1] in str(info.value), (key, str(info.value))


# -- the mock's bodies -----------------------------------------------------------------------------------


def test_mock_stream_parts_parse_back_to_its_tokens_and_usage() -> None:
    app = MockApp(MockConfig(), t0=0.0, pid=0)
    body = {"model": "mock-llm", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    completion = app.handle("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert isinstance(completion, Completion) and completion.tokens == 4 and completion.prompt_tokens == 3
    renderer = Renderer(completion)
    sse = SseStream()
    for k in range(4):
        sse.feed(renderer.part(k), float(k))
    assert sse.token_times == [0.0, 1.0, 2.0, 3.0] and sse.done and sse.usage_tokens == 4
    whole = json.loads(Renderer(completion).whole())
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    bad = app.handle("POST", "/v1/chat/completions", b'{"model": "mock-llm", "messages": "hi"}')
    assert isinstance(bad, Reply) and bad.status == 400
    assert json.loads(bad.body)["error"]["param"] == "messages"


@pytest.mark.parametrize("module", [openai_client])
def test_docstring_examples(module: object) -> None:
    assert doctest.testmod(module).failed == 0


# -- datasets, tokenizer, cancelled streams, absent figures ---------------------------------------------


def test_sharegpt_dataset_prompts_lengths_and_bad_entries_by_line(tmp_path: Path) -> None:
    from loadgen.protocols.common.llm_data import TokenCounter, read_dataset

    good = tmp_path / "sg.json"
    good.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "x y"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
    ], indent=2))
    dataset = read_dataset(good, None, "chat", TokenCounter())
    assert (dataset.format, dataset.prompts, dataset.output_tokens, dataset.skipped) == (
        "sharegpt", ["a b c", "only a question"], [2, None], 1)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"conversations": []},\n  {"conv": 1},\n  {"conversations": [{"from": "human"}]}\n]\n')
    with pytest.raises(ScenarioError) as info:
        read_dataset(bad, "sharegpt", "chat", TokenCounter())
    assert [p.split(": ", 2)[1] for p in info.value.problems] == [f"{bad} line 3", f"{bad} line 4"]
    for text, needle in (("", "holds no prompts"), ("[]", "holds no prompts"), ('[{"conversations": []},',
                                                                                  "line 1: not JSON")):
        empty = tmp_path / "e.json"
        empty.write_text(text)
        with pytest.raises(ScenarioError, match=needle):
            read_dataset(empty, None, "chat", TokenCounter())


def test_jsonl_dataset_takes_output_tokens_and_refuses_messages_for_completions(tmp_path: Path) -> None:
    from loadgen.protocols.common.llm_data import TokenCounter, read_dataset

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "output_tokens": 7}\n{"messages": [{"role": "user", "content": "m"}]}\n')
    dataset = read_dataset(path, None, "chat", TokenCounter())
    assert dataset.format == "jsonl" and dataset.output_tokens == [7, None]
    with pytest.raises(ScenarioError, match="line 2: .*needs the chat endpoint"):
        read_dataset(path, "jsonl", "embeddings", TokenCounter())


def test_a_tokenizer_built_in_code_counts_exactly_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from loadgen.protocols.common.llm_data import WORDS, TokenCounter, exact_prompt

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(("[UNK]", *WORDS))},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    counter = TokenCounter.load(str(tmp_path / "tokenizer.json"))
    assert counter.exact and counter.count("the water, and oil") == 5  # the comma is a token of its own
    rng = np.random.default_rng(0)
    for tokens in (1, 2, 17, 300):
        assert counter.count(exact_prompt(counter, tokens, rng)) == tokens
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ScenarioError, match="bad.json is not a Hugging Face tokenizer.json"):
        TokenCounter.load(str(tmp_path / "bad.json"))


def test_a_cancelled_stream_counts_its_ttft_and_lag_only() -> None:
    rec = Recorder(start_t=0.0, window_end_t=10.0, streams=True)
    rec.record_stream(1.0, 1.001, 1.2, None, [1.02, 1.03], 2)
    rec.record_stream(2.0, 2.002, 2.05, "cancelled", [2.04], 1)
    rec.finish(11.0)
    figures = rec.cumulative
    assert (figures.ok, figures.cancelled, figures.errors, figures.requests, figures.sent) == (1, 1, {}, 2, 2)
    assert figures.latency.get_total_count() == 1 and figures.lag.get_total_count() == 2
    assert sorted(_values(figures.stream.ttft)) == pytest.approx([20_000, 40_000], rel=1e-3)
    assert figures.stream.itl.get_total_count() == 1 and figures.stream.output_tokens == 2
    assert figures.completed_in_window == 1
    decoded = HistogramSet.decode(json.loads(json.dumps(figures.encode())))
    assert decoded.cancelled == 1
    summary = build_summary(rec, offered_rps=1.0, duration_s=10.0, generator={})
    assert summary["cancelled"] == 1 and "1 cancelled" in render_table(summary)


def test_stream_figures_never_measured_are_absent_from_the_summary() -> None:
    rec = Recorder(start_t=0.0, window_end_t=10.0, streams=True)
    rec.record_stream(1.0, 1.0, 1.2, None, [], 5)  # a non-streamed answer: tokens, no timings
    rec.finish(11.0)
    summary = build_summary(rec, offered_rps=1.0, duration_s=10.0, generator={})
    assert not {"ttft_ms", "ttft_service_ms", "itl_ms", "tpot_ms"} & set(summary)
    assert summary["output_tokens"] == 5 and summary["latency_ms"]["max"] > 0
    assert not any(line.startswith(("ttft", "itl")) for line in render_table(summary).splitlines())


def test_mock_accepts_ignore_eos_and_keeps_the_requests_asked_for() -> None:
    app = MockApp(MockConfig(record_requests=1), t0=0.0, pid=0)
    body = {"model": "mock-llm", "prompt": "a b", "max_tokens": 3, "ignore_eos": True}
    assert isinstance(app.handle("POST", "/v1/completions", json.dumps(body).encode()), Completion)
    bad = app.handle("POST", "/v1/completions", json.dumps({**body, "ignore_eos": "yes"}).encode())
    assert isinstance(bad, Reply) and json.loads(bad.body)["error"]["param"] == "ignore_eos"
    app.handle("POST", "/v1/completions", json.dumps(body).encode())
    kept = json.loads(app.handle("GET", "/mock/requests", b"").body)["requests"]
    assert kept == [{"path": "/v1/completions", "body": body}]  # only the first: record_requests=1
    assert MockConfig(embedding_dims=0).problems() == ["embedding_dims must be >= 1, got 0"]
