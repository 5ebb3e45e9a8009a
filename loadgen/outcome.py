"""Outcome: the plain record of one request, handed from a protocol client to the recorder.

Timestamps are time.monotonic() seconds, each named for the instant it marks:
  intended_t  when the schedule said to send (closed loop: when the user was ready to send)
  sent_t      when the request was handed to the socket
  done_t      when the whole response had been read (or the request failed)
A failed request is data, not an exception: `error` holds its kind (see errors.py) and
`message` the detail; the run goes on.

A streamed response (protocol openai) comes as a StreamOutcome: the same six fields first, then
the arrival instant of each chunk that carried output tokens and the output token count. It is a
separate type so that protocols that do not stream build nothing more per request. A stream the
client closed on purpose after its first token has error CANCELLED (counted apart, not an error).

A client that scores its answers (a classifier compared with labels) says how many rows of the answer
it scored and how many were right (`scored`, `correct`); the recorder sums them into an accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["CANCELLED", "Outcome", "StreamOutcome"]

CANCELLED = "cancelled"
"""The `error` of a stream the client itself closed after its first token (openai's cancel_rate): not a
failure. The recorder counts it apart (`cancelled`): its TTFT counts, it has no latency, ITL or TPOT."""


class Outcome(NamedTuple):
    intended_t: float
    sent_t: float
    done_t: float
    error: str | None = None
    message: str = ""
    response_bytes: int = 0
    scored: int = 0
    """Answers (rows) scored against a label (--labels, --reference); 0 when the run scores nothing."""
    correct: int = 0
    """Of those, the answers whose predicted class was the label (or the reference's)."""
    similarity_ppm: int = 0
    """Scored against reference outputs by cosine: the sum of each row's cosine similarity with its
    reference, in millionths (an integer, so it sums and merges exactly)."""


class StreamOutcome(NamedTuple):
    intended_t: float
    sent_t: float
    done_t: float
    error: str | None = None
    message: str = ""
    response_bytes: int = 0
    token_times: Sequence[float] = ()
    """time.monotonic() arrival of each chunk that carried output tokens, in stream order."""
    output_tokens: int = 0
    """The stream's usage.completion_tokens when it offered one, else the count of token chunks."""
