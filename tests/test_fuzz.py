"""Property-based tests of the parsers that read untrusted bytes: any input gives a result or the
protocol's own error, never another exception escaping, never a hang.

- the servers' HTTP/1.1 request parser (servers/core/http1.py), fed in arbitrary pieces;
- the KServe v2 infer request decoder (JSON and binary tensor extension, servers/triton/_tensors.py);
- the generator's SSE parser (loadgen/protocols/openai.py SseStream), fed in arbitrary pieces;
- the scenario loader (any TOML-like table) and the trace reader (any text).

Inputs are drawn by hypothesis around valid ones (a valid request with bytes flipped, cut, repeated) as
well as at random, so the checks reach past the first byte. Each property has a bounded number of
examples and a deadline, so the module stays a few seconds (LOADGEN_FUZZ_EXAMPLES=5000 for a longer hunt).
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadgen.errors import ScenarioError
from loadgen.patterns.trace import TraceError, read_trace
from loadgen.protocols.openai import SseStream
from loadgen.scenario import validate_scenario
from servers.core.http1 import HttpError, RequestParser
from servers.models.builtin import builtin_models
from servers.triton._infer import InferError
from servers.triton._tensors import parse_infer

EXAMPLES = int(os.environ.get("LOADGEN_FUZZ_EXAMPLES", "150"))
"""Examples per property (a longer hunt: LOADGEN_FUZZ_EXAMPLES=5000)."""
SETTINGS = settings(max_examples=EXAMPLES, deadline=500, suppress_health_check=[HealthCheck.too_slow], database=None)
MODELS = builtin_models()


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """`valid` with a few bytes replaced, cut short, or with junk inserted."""
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(0, 4))):
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            choice = draw(st.integers(0, 2))
            if choice == 0:
                data[at] = draw(st.integers(0, 255))
            elif choice == 1:
                del data[at:]
            else:
                data[at:at] = draw(st.binary(max_size=12))
        return bytes(data)
    return build()


_REQUEST = (b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 17\r\n\r\n{\"inputs\": [1,2]}"
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


@SETTINGS
@given(st.one_of(_mutated(_REQUEST), st.binary(max_size=300)), st.lists(st.integers(1, 64), max_size=20))
def test_http_request_parser_answers_requests_or_http_errors(data: bytes, cuts: list[int]) -> None:
    parser = RequestParser()
    parser.accepts_chunked = True
    began = time.monotonic()
    position = 0
    pieces = []
    for size in [*cuts, len(data)]:
        pieces.append(data[position:position + size])
        position += size
    try:
        for piece in pieces:
            parser.feed(piece)
            while parser.next_request() is not None:
                assert time.monotonic() - began < 1.0
    except HttpError as exc:
        assert 400 <= exc.status < 600
    assert time.monotonic() - began < 1.0


def _infer_body() -> tuple[bytes, str]:
    blob = struct.pack("<16f", *range(16))
    head = json.dumps({"id": "1", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                              "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    return head + blob, str(len(head))


@SETTINGS
@given(st.one_of(_mutated(_infer_body()[0]), st.binary(max_size=200)),
       st.one_of(st.none(), st.just(_infer_body()[1]), st.text(max_size=6)),
       st.sampled_from(["identity", "identity_bytes", "mlp"]))
def test_infer_decoder_answers_a_request_or_an_infer_error(body: bytes, header: str | None, model: str) -> None:
    try:
        request = parse_infer(body, header, MODELS[model])
    except InferError:
        return
    assert request.inputs and request.batch_size >= 1


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


@SETTINGS
@given(st.lists(_JSON, max_size=3))
def test_infer_decoder_on_json_shaped_inputs(inputs: list) -> None:
    body = json.dumps({"inputs": inputs}, allow_nan=True).encode()
    try:
        parse_infer(body, None, MODELS["identity"])
    except InferError:
        pass


_SSE = (b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n: ping\n\n'
        b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n')


@SETTINGS
@given(st.one_of(_mutated(_SSE), st.binary(max_size=300)), st.lists(st.integers(1, 40), max_size=20))
def test_sse_parser_takes_any_bytes(data: bytes, cuts: list[int]) -> None:
    sse = SseStream(keep_text=True)
    position = 0
    for k, size in enumerate([*cuts, len(data)]):
        sse.feed(data[position:position + size], float(k))
        position += size
    assert sse.body_bytes == len(data)
    assert sse.output_tokens >= 0 and sse.token_times == sorted(sse.token_times)


_TABLE_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10_000), st.floats(allow_nan=True),
                          st.text(max_size=12), st.lists(st.integers(), max_size=3))
_KEYS = st.sampled_from(["url", "model", "protocol", "timeout", "rate", "duration", "users", "arrival",
                         "max_in_flight", "headers", "stages", "think", "burstiness", "trace", "seed", "interval",
                         "max_tokens", "endpoint", "bogus"])


@SETTINGS
@given(st.dictionaries(st.sampled_from(["target", "open_loop", "closed_loop", "output", "mix", "slo", "x"]),
                       st.one_of(st.dictionaries(_KEYS, _TABLE_VALUES, max_size=6), _TABLE_VALUES), max_size=4))
def test_scenario_loader_gives_a_scenario_or_named_problems(data: dict) -> None:
    try:
        validate_scenario(data)
    except ScenarioError as exc:
        assert exc.problems and all(isinstance(problem, str) and problem for problem in exc.problems)


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=1000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          database=None)
@given(st.one_of(st.text(max_size=300),
                 st.lists(st.one_of(st.just('{"timestamp": 1, "input_tokens": 3}'), st.text(max_size=40)),
                          max_size=8).map("\n".join)),
       st.sampled_from(["auto", "jsonl", "csv", "azure", "mooncake", "burstgpt"]))
def test_trace_reader_gives_rows_or_named_problems(tmp_path: Path, text: str, fmt: str) -> None:
    path = tmp_path / f"t{abs(hash((text, fmt)))}.txt"
    path.write_bytes(text.encode("utf-8", "replace"))
    try:
        trace = read_trace(path, fmt)
    except TraceError as exc:
        assert exc.problems
        return
    assert len(trace) > 0 and (trace.times_s[1:] >= trace.times_s[:-1]).all()
