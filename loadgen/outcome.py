"""Outcome: the plain record of one request, handed from a protocol client to the recorder.

Timestamps are time.monotonic() seconds, each named for the instant it marks:
  intended_t  when the schedule said to send (closed loop: when the user was ready to send)
  sent_t      when the request was handed to the socket
  done_t      when the whole response had been read (or the request failed)
A failed request is data, not an exception: `error` holds its kind (see errors.py) and
`message` the detail; the run goes on.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Outcome"]


class Outcome(NamedTuple):
    intended_t: float
    sent_t: float
    done_t: float
    error: str | None = None
    message: str = ""
    response_bytes: int = 0
