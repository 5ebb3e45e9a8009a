"""The live console: Locust's own web UI, extended with loadgen's figures and controls (`--web-port`).

A person who wants to watch and steer a run opens a browser on the generator, as every Locust user
does; Locust's page alone shows its own statistics (rounded percentiles, closed-loop notions) and has
no arrival rate. So `loadgen run --web-port P` starts Locust's WebUI (Environment.create_web_ui) on the
run's own Environment, one web server, Locust's, and adds loadgen's routes to its Flask app:

- GET  /loadgen       the page (console.html beside this module: plain HTML and inline JS, no build step,
                      nothing fetched from elsewhere) that polls the figures, draws them as inline SVG
                      charts and shows a GENERATOR-BOUND banner when the generator's self-check says so;
- GET  /loadgen/live  the figures as JSON. Rates and percentiles come from a RunCollector
                      (loadgen/sinks/prometheus.py) of the run's LoadContext: the same functions and
                      the same closed intervals as the /metrics gauges (`intervals` says how many), so
                      latency_s["10s"]["p99"] is loadgen_latency_percentile_seconds{quantile="0.99",
                      window="10s"} read at the same moment. `generator` is the SelfCheck of the run so
                      far (summary.json's `generator` as of now);
- POST /loadgen/stop  ends the run as SIGINT does (partial results, interrupted);
- POST /loadgen/rate  rate=R [at_s=T]: an open loop's rate is R from T seconds into the run (default:
                      now) to its end; the arrivals before T stay as planned (LoadContext.change_rate).

Locust's own pages stay at / (its statistics of the same requests). The console is bound to 127.0.0.1
unless --web-host says otherwise, and it asks for no login: it controls the load, so exposing it is a
decision the user makes with --web-host. It lives as long as the run: the process ends with the run.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import gevent
from flask import Response, jsonify, request
from gevent.event import Event

from loadgen.driver.context import LoadContext
from loadgen.driver.selfcheck import SelfCheck
from loadgen.errors import LoadgenError
from loadgen.scenario import OpenLoop
from loadgen.sinks.prometheus import RunCollector

__all__ = ["DEFAULT_WEB_HOST", "LiveConsole", "WebOptions"]

DEFAULT_WEB_HOST = "127.0.0.1"
_BIND_WAIT_S = 5.0  # the web server binds in its own greenlet: how long start() waits for it


@dataclass(frozen=True)
class WebOptions:
    """Where the console listens (--web-host, --web-port; port 0: a free one, printed)."""

    port: int = 0
    host: str = DEFAULT_WEB_HOST


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LiveConsole:
    """Locust's web UI on `environment` with loadgen's routes, for the run of `ctx`; `stop` is the run's
    stop event (set by the page's stop button as by SIGINT).

    >>> console = LiveConsole(ctx, environment, stop, WebOptions(port=0)).start()  # doctest: +SKIP
    >>> console.url  # doctest: +SKIP
    'http://127.0.0.1:40123/loadgen'
    """

    def __init__(self, ctx: LoadContext, environment: Any, stop: Event, options: WebOptions) -> None:
        self._ctx = ctx
        self._environment = environment
        self._stop = stop
        self.options = options
        self.port = options.port
        """The port served on (the one picked once started, when 0 was asked for)."""
        self._collector = RunCollector(ctx, pause=gevent.idle)
        self._cpu0 = (time.monotonic(), _cpu_seconds())
        self._web_ui: Any = None
        self._failed: OSError | None = None

    def start(self) -> LiveConsole:
        """Start Locust's web UI with the routes added and wait until it listens; returns self.

        Raises LoadgenError (exit 2) when the address cannot be bound.
        """
        with _locust_argv():
            web_ui = self._web_ui = self._environment.create_web_ui(self.options.host, self.options.port,
                                                                      delayed_start=True)
        template_args = web_ui.update_template_args

        def update_template_args() -> None:  # Locust's page calls it on each load
            with _locust_argv():
                template_args()

        web_ui.update_template_args = update_template_args
        self._add_routes(web_ui)
        web_ui.greenlet = gevent.spawn(self._serve)
        deadline = time.monotonic() + _BIND_WAIT_S
        while not (web_ui.server is not None and web_ui.server.started) and self._failed is None:
            if time.monotonic() > deadline:
                raise LoadgenError(f"the console did not start on {self.options.host}:{self.options.port}")
            gevent.sleep(0.001)
        if self._failed is not None:
            raise LoadgenError(f"cannot serve the console on {self.options.host}:{self.options.port} "
                               f"({self._failed.strerror or self._failed}); choose another --web-port "
                               "(0 for a free one) or --web-host")
        self.port = web_ui.server.server_port
        self._cpu0 = (time.monotonic(), _cpu_seconds())
        return self

    def _serve(self) -> None:
        """Locust's own server loop (WebUI.start_server), with a bind failure kept for start() to say."""
        try:
            self._web_ui.start_server()
        except OSError as exc:
            self._failed = exc

    @property
    def url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"http://{host}:{self.port}/loadgen"

    def announce(self) -> None:
        print(f"console on {self.url}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Close the port (a request in progress gets up to a second)."""
        if self._web_ui is not None and self._web_ui.server is not None:
            self._web_ui.server.stop(timeout=1.0)
        self._web_ui = None

    # -- routes ------------------------------------------------------------------------------------
    def _add_routes(self, web_ui: Any) -> None:
        app, guard = web_ui.app, web_ui.auth_required_if_enabled
        app.add_url_rule("/loadgen", "loadgen_page", guard(self._page))
        app.add_url_rule("/loadgen/live", "loadgen_live", guard(self._live))
        app.add_url_rule("/loadgen/stop", "loadgen_stop", guard(self._stop_run), methods=["POST"])
        app.add_url_rule("/loadgen/rate", "loadgen_rate", guard(self._change_rate), methods=["POST"])

    def _page(self) -> Response:
        page = resources.files("loadgen.driver").joinpath("console.html").read_text(encoding="utf-8")
        return Response(page, mimetype="text/html")

    def _live(self) -> Response:
        return jsonify(self.live())

    def _stop_run(self) -> Response:
        self._stop.set()
        return jsonify({"stopping": True})

    def _change_rate(self) -> tuple[Response, int]:
        values = request.get_json(silent=True) or request.form
        try:
            rate = _number(values, "rate")
            at_s = self._ctx.change_rate(rate, _number(values, "at_s") if values.get("at_s") not in (None, "")
                                         else None)
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 409 if not isinstance(exc, _BadField) else 400
        return jsonify({"rate": rate, "at_s": at_s}), 200

    # -- figures -----------------------------------------------------------------------------------
    def run_time_s(self) -> float:
        """Seconds since the run's start (negative before it)."""
        return time.monotonic() - self._ctx.start_t

    def live(self) -> dict[str, Any]:
        """What /loadgen/live answers: the run's state and settings, its figures, its generator health."""
        ctx = self._ctx
        pattern = ctx.pattern
        is_open = isinstance(pattern, OpenLoop)
        figures = self._collector.live()
        state = "starting" if figures is None else "stopping" if ctx.stopping or ctx.done.is_set() else "running"
        found: dict[str, Any] = {
            "state": state,
            "t_s": max(0.0, self.run_time_s()) if figures is not None else 0.0,
            "duration_s": pattern.total_duration,
            "loop": "open" if is_open else "closed",
            "users": None if is_open else pattern.users,
            "model": ctx.scenario.target.model,
            "rate_changes": list(ctx.rate_changes),
            "rate_changeable": is_open and pattern.trace is None and ctx.share == (0, 1),
        }
        if figures is not None:
            found.update(figures)
            found["generator"] = self._health(figures).as_json()
        return found

    def _health(self, figures: dict[str, Any]) -> SelfCheck:
        """The generator's self-check so far, from the snapshot's figures (never from the recorder while it
        closes an interval): lag from the run's lag histogram, CPU since the console started."""
        ctx = self._ctx
        counts = figures["counts"]
        wall0, cpu0 = self._cpu0
        wall = time.monotonic() - wall0
        lag = figures.get("lag_s", {}).get("run", {})
        is_open = isinstance(ctx.pattern, OpenLoop)
        return SelfCheck(
            lag_ms={key: round(value * 1000.0, 3) for key, value in lag.items()},
            dropped=counts["dropped"],
            unsent=counts["unsent"],
            handover_unsent=ctx.handover_unsent,
            cpu_fraction=(_cpu_seconds() - cpu0) / wall if wall > 0 else 0.0,
            peak_in_flight=ctx.peak_dispatched if ctx.dispatcher is not None else ctx.peak_in_flight,
            max_in_flight=ctx.pattern.max_in_flight if is_open else None,
            max_lag_ms=ctx.scenario.output.max_lag_ms,
            fd_note=ctx.fd_note,
        )


@contextmanager
def _locust_argv() -> Iterator[None]:
    """sys.argv without loadgen's arguments while Locust's web UI reads its own (WebUI.update_template_args
    parses the command line as Locust's, and exits on a flag it does not know). Nothing in it yields to
    another greenlet: the arguments are back before any other code runs."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


class _BadField(ValueError):
    """A form field that is missing or not a number (400, where a change the run cannot take is 409)."""


def _number(values: Any, key: str) -> float:
    text = values.get(key)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _BadField(f"{key}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _BadField(f"{key}: expected a finite number, got {text!r}")
    return value
