"""A backend worker process of the TorchServe-compatible server (TorchServe's model_service_worker.py).

    python -m servers.torchserve._backend FD

The front end (_workers.ProcessBackend) starts one per worker, in the model's folder, with FD its end
of a Unix socket pair. The process loads the archive's handler (_handler.load_handler: the archive's
module, TorchServe's ts.service.Service) and then answers one batch per message until the front end
closes the socket. Batching stays in the front end: a worker only ever sees whole batches.

Messages, both ways: a 4-byte big-endian length, then a pickled tuple.
- front end -> worker: ("load", spec) once (spec: archive, worker_id, gpu_id, batch_size, decode,
  hostname); then ("predict", [(request_id, parameters, headers), ...]) per batch, the parameters'
  values the bytes the client sent (the worker decodes them, as TorchServe's backend does);
- worker -> front end: ("loaded", ok, error message, metrics) once; ("part", request_id, answer) for
  each intermediate answer of a streaming handler, at once; ("done", outcomes, metrics) per batch, one
  Answer or Failure per request in order. `metrics` lists what the handler recorded through
  context.metrics since the last message, as (method, name, labels, value, kind, unit) for the front
  end's MetricsStore.add / set.

The worker ignores SIGINT (a terminal's Ctrl-C reaches the server, which stops its workers) and exits
when its socket closes, so it never outlives the front end by more than the batch it is running.
"""

from __future__ import annotations

import pickle
import signal
import socket
import struct
import sys
from typing import Any, BinaryIO

__all__ = ["HEADER", "MetricsRecorder", "frame", "main"]

HEADER = struct.Struct("!I")


def frame(message: tuple) -> bytes:
    """One message on the socket: its length, then the pickled tuple."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _receive(stream: BinaryIO) -> tuple | None:
    """The next message, or None once the front end has closed its end."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (length,) = HEADER.unpack(head)
    data = stream.read(length)
    if len(data) < length:
        return None
    return pickle.loads(data)


class MetricsRecorder:
    """What a handler's context.metrics (a _metrics.HandlerMetrics) writes to in a worker process: the
    calls are kept and sent to the front end with the next message."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._records: list[tuple] = []

    def add(self, name: str, labels: tuple, value: float, kind: str = "counter", unit: str = "Count") -> None:
        self._records.append(("add", name, labels, value, kind, unit))

    def set(self, name: str, labels: tuple, value: float, kind: str = "gauge", unit: str = "ms") -> None:
        self._records.append(("set", name, labels, value, kind, unit))

    def take(self) -> list[tuple]:
        records, self._records = self._records, []
        return records


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m servers.torchserve._backend FD (started by the server, not by hand)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection = socket.socket(fileno=int(args[0]))
    stream = connection.makefile("rb", buffering=1 << 16)
    try:
        return _serve(connection, stream)
    except (BrokenPipeError, ConnectionResetError):  # the front end went away
        return 0
    finally:
        stream.close()
        connection.close()


def _serve(connection: socket.socket, stream: BinaryIO) -> int:
    first = _receive(stream)
    if first is None or first[0] != "load":
        return 0
    spec: dict[str, Any] = first[1]
    # imported here: the usage message above needs neither torch nor ts
    from servers.torchserve._handler import Failure, HandlerLoadError, Request, load_handler
    from servers.torchserve._metrics import HandlerMetrics

    recorder = MetricsRecorder(spec["hostname"])
    archive = spec["archive"]
    try:
        handler = load_handler(archive, spec["worker_id"], spec["gpu_id"], spec["batch_size"],
                               HandlerMetrics(recorder, archive.name), spec["decode"])
    except HandlerLoadError as exc:
        connection.sendall(frame(("loaded", False, str(exc), recorder.take())))
        return 1
    connection.sendall(frame(("loaded", True, "", recorder.take())))

    def part_sender(request_id: str) -> Any:
        return lambda answer: connection.sendall(frame(("part", request_id, answer)))

    while (message := _receive(stream)) is not None:
        batch = [Request(request_id, parameters, headers, part_sender(request_id))
                 for request_id, parameters, headers in message[1]]
        try:
            outcomes = handler.predict(batch)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as exc:  # noqa: BLE001 - a failure outside the handler's own call: the worker goes on
            outcomes = [Failure(500, f"Worker error: {type(exc).__name__}: {exc}")] * len(batch)
        connection.sendall(frame(("done", outcomes, recorder.take())))
    handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
