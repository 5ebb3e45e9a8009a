"""Serve the run's Prometheus metrics over HTTP from the generator process while the run lasts.

Place in the flow: Recorder -> RunCollector (loadgen/sinks/prometheus.py) -> **/metrics** here.
The generator is monkey-patched by gevent, so the endpoint is a gevent.pywsgi server: its accept
loop and each scrape are greenlets of the generator's own loop, which `stop()` ends cleanly. Each
exporter has its own CollectorRegistry (never prometheus_client's process-wide REGISTRY).
"""

from __future__ import annotations

import gevent
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, make_wsgi_app

from loadgen.errors import LoadgenError
from loadgen.sinks.prometheus import RunCollector, RunView

__all__ = ["MetricsExporter"]


class MetricsExporter:
    """/metrics for one run on `host:port` (port 0: a free one, see `port` once started).

    >>> exporter = MetricsExporter(ctx, port=0).start()  # doctest: +SKIP
    >>> exporter.url  # doctest: +SKIP
    'http://127.0.0.1:40123/metrics'
    """

    def __init__(self, view: RunView, port: int = 0, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # gevent.idle between metric families: the loop polls for I/O while a scrape is formatted.
        self.registry.register(RunCollector(view, pause=gevent.idle))
        self.host = host
        self.port = port
        """The port served on (the one picked once started, when 0 was asked for)."""
        self._server = WSGIServer((host, port), make_wsgi_app(self.registry), log=None)

    def start(self) -> MetricsExporter:
        """Bind and serve in the background (a greenlet); returns self.

        Raises LoadgenError (exit 2) when the port cannot be bound.
        """
        try:
            self._server.start()
        except OSError as exc:
            raise LoadgenError(
                f"cannot serve metrics on {self.host}:{self.port} ({exc.strerror or exc}); "
                "choose another --metrics-port, or 0 for a free one"
            ) from None
        self.port = self._server.server_port
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Close the port; a scrape in progress gets up to a second to finish."""
        self._server.stop(timeout=1.0)
