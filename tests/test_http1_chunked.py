"""Chunked request bodies in servers/core's HTTP/1.1 parser (taken by Triton's parser, as Triton takes
them; refused with 411 by the others), and a chunked infer request to the Triton-compatible server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from servers.core.http1 import HttpError, RequestParser
from servers.triton._app import TritonParser
from tests.support.processes import start_server, stop_process

_HEAD = b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
_CHUNKS = b"5;name=value\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"


def test_chunks_fed_a_byte_at_a_time_make_the_body() -> None:
    parser = TritonParser()
    stream = _HEAD + _CHUNKS + b"GET /v2 HTTP/1.1\r\n\r\n"
    requests = []
    for i in range(len(stream)):
        parser.feed(stream[i:i + 1])
        while (request := parser.next_request()) is not None:
            requests.append(request)
        if not requests:
            assert parser.partial()
    assert [r.method for r in requests] == ["POST", "GET"]  # the next request on the connection follows
    assert requests[0].body == b"hello" + b"z" * 26
    assert not parser.partial()


@pytest.mark.parametrize(("chunks", "status", "words"), [
    (b"x\r\nhello\r\n0\r\n\r\n", 400, "chunk size"),
    (b"+5\r\nhello\r\n0\r\n\r\n", 400, "chunk size"),
    (b"5\r\nhelloXX0\r\n\r\n", 400, "CRLF"),
    (b"5000001\r\n", 400, "exceeds the maximum"),  # 80 MiB declared: refused from the size line
])
def test_bad_chunks_are_framing_errors(chunks: bytes, status: int, words: str) -> None:
    parser = TritonParser()
    parser.feed(_HEAD + chunks)
    with pytest.raises(HttpError) as raised:
        parser.next_request()
    assert raised.value.status == status and words in str(raised.value)


@pytest.mark.parametrize(("headers", "status"), [
    (b"Transfer-Encoding: gzip\r\n", 501),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
])
def test_other_codings_and_ambiguous_framing_are_refused(headers: bytes, status: int) -> None:
    parser = TritonParser()
    parser.feed(b"POST / HTTP/1.1\r\n" + headers + b"\r\n")
    with pytest.raises(HttpError) as raised:
        parser.next_request()
    assert raised.value.status == status


def test_a_parser_that_does_not_take_chunks_answers_411() -> None:
    parser = RequestParser()
    parser.feed(_HEAD + _CHUNKS)
    with pytest.raises(HttpError) as raised:
        parser.next_request()
    assert raised.value.status == 411


@pytest.mark.integration
def test_a_chunked_infer_request_is_answered() -> None:
    server = start_server([], module="servers.triton", port_flag="--http-port")
    try:
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                                       "data": [1.0, 2.0, 3.0, 4.0]}]}).encode()
        parts = iter([body[:10], body[10:33], body[33:]])  # a generator: httpx sends it chunked
        response = httpx.post(f"{server.url}/v2/models/identity/infer", content=parts, timeout=10)
        assert response.status_code == 200, response.text
        assert response.request.headers["transfer-encoding"] == "chunked"
        np.testing.assert_array_equal(response.json()["outputs"][0]["data"], [1.0, 2.0, 3.0, 4.0])
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
    finally:
        stop_process(server.proc)
