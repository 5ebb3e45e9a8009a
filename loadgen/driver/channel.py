"""Locust's master/worker channel, hardened: a bogus message is logged and ignored, never a crash.

Locust decodes each ZeroMQ frame with msgpack and dispatches on its type. A frame that is not msgpack
(other than a truncated one), a message that is not (type, data, node_id), or a built-in message with
data of the wrong shape ("heartbeat" with a list) raises inside Locust's receiving greenlet, and the
master or worker stops listening: one stray packet on the port ends the run. `guard_master` and
`guard_worker` (with `guard_worker_channel`) put checks around the receive and dispatch calls:

- the frame is decoded here; what does not decode, or is not a (str type, data, str id) message, is
  logged and skipped (the master also skips a message whose node id is not the id of the connection it
  came on: a worker cannot speak for another);
- a worker takes from its master only the messages a loadgen run uses: Locust's own connection
  messages and loadgen's (not Locust's "spawn", "stop" or user-class updates, which loadgen never sends);
- any exception a handler raises on a message's content is logged with the message's type and sender,
  and the channel goes on.

Each side's log lines say what was ignored; after the first `_SHOWN` the rest are counted, one line per
`_EVERY`, so a flood cannot fill the log.
"""

from __future__ import annotations

import sys
from typing import Any

import zmq.error as zmqerr
from locust.exception import RPCError
from locust.rpc import zmqrpc
from locust.rpc.protocol import Message

__all__ = ["guard_master", "guard_worker", "guard_worker_channel"]

_SHOWN = 20
_EVERY = 1000
_WORKER_BUILTINS = frozenset({"ack", "heartbeat", "quit", "reconnect"})


class _IgnoredLog:
    """Prints why a message was ignored: the first _SHOWN, then a count every _EVERY."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.count = 0

    def __call__(self, why: str) -> None:
        self.count += 1
        if self.count <= _SHOWN:
            print(f"{self.who}: ignored {why}", file=sys.stderr, flush=True)
        elif self.count % _EVERY == 0:
            print(f"{self.who}: ignored {self.count} bogus messages so far (latest: {why})", file=sys.stderr,
                  flush=True)


def _decode(frame: bytes, source: str, log: _IgnoredLog) -> Message | None:
    try:
        msg = Message.unserialize(frame)
    except Exception as exc:  # noqa: BLE001 - any undecodable frame, whatever msgpack raises
        log(f"an undecodable message ({len(frame)} bytes) from {source}: {type(exc).__name__}: {exc}")
        return None
    if not isinstance(msg.type, str) or not isinstance(msg.node_id, str):
        log(f"a message from {source} that is not (type, data, id): {msg.type!r}")
        return None
    return msg


def _receive_from_clients(server: Any, log: _IgnoredLog) -> tuple[str, Message]:
    while True:
        try:
            frames = server.socket.recv_multipart()
        except zmqerr.ZMQError as exc:
            raise RPCError("ZMQ network broken") from exc
        if len(frames) != 2:
            log(f"a message of {len(frames)} frames")
            continue
        try:
            addr = frames[0].decode()
        except UnicodeDecodeError:
            log("a message from a connection whose id is not text")
            continue
        msg = _decode(frames[1], f"connection {addr!r}", log)
        if msg is None:
            continue
        if msg.node_id != addr:
            log(f"a {msg.type!r} message from connection {addr!r} speaking for {msg.node_id!r}")
            continue
        return addr, msg


def _receive_from_master(client: Any, log: _IgnoredLog) -> Message:
    while True:
        try:
            frame = client.socket.recv()
        except zmqerr.ZMQError as exc:
            raise RPCError("ZMQ network broken") from exc
        msg = _decode(frame, "the master", log)
        if msg is not None:
            return msg


def guard_master(runner: Any) -> None:
    """Harden a Locust MasterRunner's receiving loop (see the module docstring); before it first receives."""
    log = _IgnoredLog("master")
    # On the class: Locust makes a new server socket when it resets the connection.
    zmqrpc.Server.recv_from_client = lambda server: _receive_from_clients(server, log)
    handle = runner.handle_message

    def guarded(client_id: str, msg: Message) -> None:
        try:
            handle(client_id, msg)
        except Exception as exc:  # noqa: BLE001 - a message's content must never stop the listener
            log(f"a bogus {msg.type!r} message from {client_id!r}: {type(exc).__name__}: {exc}")

    runner.handle_message = guarded


def guard_worker_channel() -> None:
    """Decode what the master sends with the checks here; called before the worker connects (its
    receiving greenlet starts at once), on the class: Locust makes a new socket when it reconnects."""
    log = _IgnoredLog("worker")
    zmqrpc.Client.recv = lambda client: _receive_from_master(client, log)


def guard_worker(runner: Any) -> None:
    """Ignore the messages a loadgen run does not use, and any a handler fails on (see the module
    docstring); the worker's receiving loop itself is guard_worker_channel's."""
    log = _IgnoredLog("worker")
    handle = runner.handle_message

    def guarded(msg: Message) -> None:
        if msg.type not in _WORKER_BUILTINS and msg.type not in runner.custom_messages:
            log(f"a {msg.type!r} message from the master: not one a loadgen run uses")
            return
        try:
            handle(msg)
        except Exception as exc:  # noqa: BLE001 - a message's content must never stop the listener
            log(f"a bogus {msg.type!r} message from the master: {type(exc).__name__}: {exc}")

    runner.handle_message = guarded
