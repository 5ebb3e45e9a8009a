"""Unit tests of servers/core/http1.py: request framing and response formatting."""

from __future__ import annotations

import pytest

from servers.core.http1 import MAX_BODY_BYTES, HttpError, RequestParser, format_response

INFER = b'POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd'


def test_pipelined_requests_come_out_in_order() -> None:
    parser = RequestParser()
    parser.feed(INFER + b"GET /v2?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
    first, second = parser.next_request(), parser.next_request()
    assert (first.method, first.path, first.body, first.keep_alive) == ("POST", "/v2/models/m/infer", b"abcd", True)
    assert (second.method, second.path, second.keep_alive) == ("GET", "/v2", False)
    assert parser.next_request() is None


def test_request_split_across_reads() -> None:
    parser = RequestParser()
    parser.feed(INFER[:10])
    assert parser.next_request() is None
    parser.feed(INFER[10:-2])
    assert parser.next_request() is None
    parser.feed(INFER[-2:])
    assert parser.next_request().body == b"abcd"


def test_http10_closes_unless_asked() -> None:
    parser = RequestParser()
    parser.feed(b"GET /v2 HTTP/1.0\r\n\r\nGET /v2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert [parser.next_request().keep_alive, parser.next_request().keep_alive] == [False, True]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (b"POST /x HTTP/1.1\r\nContent-Length: 12a\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1), 413),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v2 HTTP/2.0\r\n\r\n", 505),
        (b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    ],
)
def test_framing_errors(raw: bytes, status: int) -> None:
    parser = RequestParser()
    parser.feed(raw)
    with pytest.raises(HttpError) as caught:
        parser.next_request()
    assert caught.value.status == status


def test_expect_continue_is_due_once_before_the_body() -> None:
    parser = RequestParser()
    parser.feed(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert parser.next_request() is None
    assert parser.continue_due()
    parser.feed(b"a")
    assert parser.next_request() is None
    assert not parser.continue_due()  # once per request


def test_format_response() -> None:
    assert format_response(200, b"") == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert format_response(404, b"{}", keep_alive=False) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )
