"""Serve the run's Prometheus metrics over HTTP from the generator process while the run lasts.

Place in the flow: Recorder -> RunCollector (loadgen/sinks/prometheus.py) -> **/metrics** here.
The generator is monkey-patched by gevent, so the endpoint is a gevent.pywsgi server: its accept
loop and each scrape are greenlets of the generator's own loop, which `stop()` ends cleanly. Each
exporter has its own CollectorRegistry (never prometheus_client's process-wide REGISTRY).

A sweep holds its port for all its steps: it opens a `MetricsListener` (with the sweep's own
collector), and each step's run, asking for the same port, joins that listener for the step's length
instead of binding the port itself (`MetricsExporter.start`). So the port never closes between steps,
and Prometheus sees one target for the whole sweep.

The listen address is `output.metrics_host` (127.0.0.1 unless the scenario or --metrics-host says
otherwise; 0.0.0.0 lets a Prometheus on another host scrape).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.registry import Collector

from loadgen.errors import LoadgenError
from loadgen.sinks.prometheus import RunCollector, RunView

__all__ = ["DEFAULT_HOST", "MetricsExporter", "MetricsListener"]

DEFAULT_HOST = "127.0.0.1"

_LISTENERS: dict[int, MetricsListener] = {}
"""The listeners open in this process, by port: a run exporter asking for one of these ports joins it."""


class MetricsListener:
    """/metrics on `host:port` for as long as its owner keeps it open, serving what its collectors give.

    >>> listener = MetricsListener("127.0.0.1", 0, [sweep_collector]).start()  # doctest: +SKIP
    >>> listener.stop(linger_s=5.0)  # doctest: +SKIP  (waits for one more scrape when one came)
    """

    def __init__(self, host: str, port: int, collectors: Iterable[Collector] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            self.registry.register(collector)
        self.host = host
        self.port = port
        """The port served on (the one picked once started, when 0 was asked for)."""
        self.scrapes = 0
        """Scrapes answered so far."""
        self._server = WSGIServer((host, port), self._counting(make_wsgi_app(self.registry)), log=None)

    def _counting(self, app: Callable[..., Any]) -> Callable[..., Any]:
        def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            try:
                return app(environ, start_response)
            finally:
                self.scrapes += 1
        return counted

    def start(self) -> MetricsListener:
        """Bind and serve in the background (a greenlet); returns self.

        Raises LoadgenError (exit 2) when the address cannot be bound.
        """
        try:
            self._server.start()
        except OSError as exc:
            raise LoadgenError(
                f"cannot serve metrics on {self.host}:{self.port} ({exc.strerror or exc}); "
                "choose another --metrics-port (0 for a free one) or --metrics-host"
            ) from None
        self.port = self._server.server_port
        if self.port:
            _LISTENERS[self.port] = self
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, linger_s: float = 0.0) -> None:
        """Close the port; a scrape in progress gets up to a second to finish.

        With `linger_s`, and when something has scraped already, first wait (at most that long) for one
        more scrape, so that the last figures reach the Prometheus that was watching.
        """
        if linger_s > 0 and self.scrapes:
            seen, deadline = self.scrapes, time.monotonic() + linger_s
            while self.scrapes == seen and time.monotonic() < deadline:
                gevent.sleep(0.05)
        if _LISTENERS.get(self.port) is self:
            del _LISTENERS[self.port]
        self._server.stop(timeout=1.0)


class MetricsExporter:
    """/metrics for one run on `host:port` (port 0: a free one, see `port` once started).

    `host` None: the run's scenario's output.metrics_host. When a MetricsListener of this process
    already holds `port` (a sweep's), the run's figures join it until `stop()`.

    >>> exporter = MetricsExporter(ctx, port=0).start()  # doctest: +SKIP
    >>> exporter.url  # doctest: +SKIP
    'http://127.0.0.1:40123/metrics'
    """

    def __init__(self, view: RunView, port: int = 0, host: str | None = None) -> None:
        # gevent.idle between metric families: the loop polls for I/O while a scrape is formatted.
        self.collector = RunCollector(view, pause=gevent.idle)
        self.host = host if host is not None else _scenario_host(view)
        self.port = port
        """The port served on (the one picked once started, when 0 was asked for)."""
        self._listener: MetricsListener | None = None
        self._joined: MetricsListener | None = None

    def start(self) -> MetricsExporter:
        """Serve in the background (a greenlet), on a port of its own or the listener's; returns self.

        Raises LoadgenError (exit 2) when the port cannot be bound.
        """
        shared = _LISTENERS.get(self.port) if self.port else None
        if shared is not None:
            shared.registry.register(self.collector)
            self._joined, self.host = shared, shared.host
            return self
        self._listener = MetricsListener(self.host, self.port, [self.collector]).start()
        self.port = self._listener.port
        return self

    def announce(self) -> None:
        """Say on stderr where /metrics is served, when this run opened the port (a sweep's listener
        said it once for all its steps)."""
        if self._joined is None:
            print(f"metrics on {self.url}", file=sys.stderr, flush=True)

    @property
    def registry(self) -> CollectorRegistry:
        listener = self._listener or self._joined
        if listener is None:
            raise RuntimeError("the exporter has not started")
        return listener.registry

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Close the port (or leave the listener joined); a scrape in progress gets up to a second."""
        if self._joined is not None:
            self._joined.registry.unregister(self.collector)
            self._joined = None
        if self._listener is not None:
            self._listener.stop()
            self._listener = None


def _scenario_host(view: RunView) -> str:
    """output.metrics_host of the view's scenario (a LoadContext's or a distributed master's run's)."""
    return view.metrics_host or DEFAULT_HOST
