"""The live console: Locust's own web UI, extended with loadgen's figures and controls (`--web-port`).

A person who wants to watch and steer runs opens a browser on the generator, as every Locust user does;
Locust's page alone shows its own statistics (rounded percentiles, closed-loop notions) and has no arrival
rate. So `loadgen run --web-port P` starts Locust's WebUI (Environment.create_web_ui), one web server,
Locust's, and adds loadgen's routes to its Flask app. The console outlives its runs: its Environment and
web UI stay up, and each run gets from `environment_for` the same Environment with fresh events, stats
and runner (Locust's routes read them from it), and its own LoadContext (`attach`). The run command
(loadgen/_runcmd.py) sends the first run from the command line (none with --web-wait), then one more run
for each start from the page, until a quit (the page's, Ctrl-C, or --web-autoquit seconds after a run).
What is shown (the runs, their figures, the sweep) is the ConsoleState (loadgen/driver/consolestate.py);
this module serves it.

`loadgen sweep --web-port P` serves the same console over a sweep (loadgen/_sweepcmd.py): each step (and
each probe run of a sweep without a plan) is a run of the console, shown live as it goes, and a SweepBoard
(loadgen/driver/sweepboard.py) holds the curve growing step by step and the verdict. The page draws both;
a stop ends the sweep, as Ctrl-C does; no run is started from the page and no rate is changed (a step
runs at its plan's load).

- GET  /loadgen       the page (console.html beside this module: plain HTML and inline JS, no build step,
                      nothing fetched from elsewhere) that polls the figures, draws them as inline SVG
                      charts, shows a GENERATOR-BOUND banner when the generator's self-check says so, has
                      the start form and, once a run has finished, its download buttons; under a sweep,
                      the throughput-latency curve, a table of the steps and the verdict;
- GET  /loadgen/live  the console's state (waiting: no run yet; starting, running, stopping; finished;
                      failed), the run's number and `finished` flag, `sweep` (whether the runs are a
                      sweep's steps), the start form's defaults (`form`: the latest run's load) and the
                      run's figures as JSON. Rates and percentiles come from a RunCollector
                      (loadgen/sinks/prometheus.py) of the run's LoadContext: the same functions and the
                      same closed intervals as the /metrics gauges (`intervals` says how many), so
                      latency_s["10s"]["p99"] is loadgen_latency_percentile_seconds{quantile="0.99",
                      window="10s"} read at the same moment. `generator` is the SelfCheck of the run so
                      far (summary.json's `generator` once it has finished);
- GET  /loadgen/sweep the sweep's state (probing, running, stopping, finished), plan, the step running,
                      each finished step as sweep.json has it, and the verdict (`final` once it is
                      sweep.json's); 404 when the console shows no sweep;
- POST /loadgen/start rate=R | users=U, arrival=A, duration=D, think_time=T (closed loop), max_in_flight=M
                      (open loop), seed=S (each optional: empty, the command line's value stands): the
                      scenario of the command line with these over it runs next; 202
                      {"run": N}, 400 naming the bad field, 409 while a run is going (and under a sweep);
- POST /loadgen/stop  ends the run as SIGINT does (partial results, interrupted); under a sweep, the sweep;
- POST /loadgen/rate  rate=R [at_s=T]: an open loop's rate is R from T seconds into the run (default:
                      now) to its end; the arrivals before T stay as planned (LoadContext.change_rate);
- POST /loadgen/quit  stops the run going, if any, and ends the process once its outputs are written,
                      with the last run's exit code (an SLO missed is still 1; a sweep's own code);
- GET  /loadgen/download/NAME[?run=N]  summary.json, latency.hlog or report.html of run N (default: the
                      latest finished; 404 before it has finished), see loadgen/driver/runbook.py; a
                      sweep's sweep.json and curve.csv once it has ended.

Locust's own pages stay at / (its statistics of the run's requests), with its controls made loadgen's: its
start form would start Locust's runner on the last run's context, outside loadgen's schedule, so
- POST /swarm         (Locust's start form) answers 409 saying to start runs from loadgen's form at /loadgen,
                      and starts nothing; so does POST /user (its user-class editor: loadgen sets its users);
- POST /stop          (Locust's stop button) is loadgen's stop, as POST /loadgen/stop (in Locust's answer shape);
- GET  /              Locust's page, with a notice leading to /loadgen in place of its start form (a script
                      added to its head hides each of the page's forms as the page renders it).
The console is bound to 127.0.0.1 unless --web-host says otherwise. With --web-auth USER:PASSWORD every page
and route of it (Locust's and loadgen's) asks for that user and password by HTTP basic auth
(loadgen/driver/webauth.py, through Locust's web_login); without it the console asks for no login, and
exposing it is a decision the user makes with --web-host (said on stderr when the address is not a loopback
one). With --web-tls-cert and --web-tls-key the console is served over HTTPS (Locust's own TLS option:
gevent's server wraps each connection), so the password does not travel in clear; a plain HTTP request to it
fails its handshake and the console keeps serving.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import gevent
from flask import Response, jsonify, request, send_file
from locust.env import Environment
from locust.event import Events
from locust.stats import RequestStats

from loadgen.driver.consolestate import ConsoleState
from loadgen.driver.runbook import DOWNLOADS
from loadgen.driver.sweepboard import SWEEP_DOWNLOADS, SweepBoard
from loadgen.driver.webauth import WebAuth, protect
from loadgen.errors import LoadgenError
from loadgen.scenario import Scenario

__all__ = ["DEFAULT_WEB_HOST", "FormError", "LiveConsole", "Planner", "WebOptions"]

DEFAULT_WEB_HOST = "127.0.0.1"
_BIND_WAIT_S = 5.0  # the web server binds in its own greenlet: how long start() waits for it


@dataclass(frozen=True)
class WebOptions:
    """Where the console listens (--web-host, --web-port; port 0: a free one, printed), who may use it
    (--web-auth: None, anyone who reaches the port), over HTTPS with `tls_cert` and `tls_key` (PEM files,
    --web-tls-cert and --web-tls-key; None: plain HTTP), and how long it lives: `autoquit_s` seconds after a
    run (or the sweep) ends with no new start (--web-autoquit; None: until a quit), and whether the first run
    waits for a start from the page (--web-wait)."""

    port: int = 0
    host: str = DEFAULT_WEB_HOST
    autoquit_s: float | None = None
    wait: bool = False
    auth: WebAuth | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


class FormError(ValueError):
    """A start-form field that cannot be taken (400, naming `field`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


Planner = Callable[[Mapping[str, str]], Scenario]
"""A start form's fields -> the scenario to run; raises FormError (or a ScenarioError) on a bad one."""


class LiveConsole(ConsoleState):
    """Locust's web UI with loadgen's routes, up across runs; `plan` makes a start form into a scenario and
    `scenario` (the command line's) gives the form's defaults until a run is booked. With `sweep`, the runs
    are a sweep's steps (and `plan` is not used: no run is started from the page).

    >>> console = LiveConsole(WebOptions(port=0), plan, scenario).start()  # doctest: +SKIP
    >>> console.url  # doctest: +SKIP
    'http://127.0.0.1:40123/loadgen'
    >>> environment = console.environment_for(OpenLoopUser)  # doctest: +SKIP
    """

    def __init__(self, options: WebOptions, plan: Planner | None, scenario: Scenario,
                 sweep: SweepBoard | None = None) -> None:
        super().__init__(options.autoquit_s, scenario, sweep)
        self.options = options
        self.port = options.port
        """The port served on (the one picked once started, when 0 was asked for)."""
        self._plan = plan
        self._environment = Environment(events=Events())
        self._web_ui: Any = None
        self._failed: OSError | None = None

    def start(self) -> LiveConsole:
        """Start Locust's web UI with the routes added and wait until it listens; returns self.

        Raises LoadgenError (exit 2) when the address cannot be bound.
        """
        self._environment.create_local_runner()  # Locust's / answers before the first run too
        auth = self.options.auth
        with _locust_argv():
            web_ui = self._web_ui = self._environment.create_web_ui(self.options.host, self.options.port,
                                                                      web_login=auth is not None,
                                                                      tls_cert=self.options.tls_cert,
                                                                      tls_key=self.options.tls_key,
                                                                      delayed_start=True)
        if auth is not None:
            protect(web_ui, auth)
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
        scheme = "https" if self.options.tls_cert is not None else "http"
        return f"{scheme}://{host}:{self.port}/loadgen"

    def announce(self) -> None:
        """Say where the console is (and whose it is: the user it asks for, never the password)."""
        auth = self.options.auth
        login = f" (basic auth: user {auth.user})" if auth is not None else ""
        print(f"console on {self.url}{login}", file=sys.stderr, flush=True)
        if auth is None and not _loopback(self.options.host):
            print(f"warning: the console on {self.options.host} asks for no login and controls the load: "
                  "anyone who reaches the port can; give --web-auth USER:PASSWORD", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Close the port (a request in progress gets up to a second)."""
        if self._web_ui is not None and self._web_ui.server is not None:
            self._web_ui.server.stop(timeout=1.0)
        if self._environment.runner is not None:
            self._environment.runner.quit()
        self._web_ui = None

    # -- the runs ----------------------------------------------------------------------------------
    def environment_for(self, user_class: type) -> Environment:
        """The console's Environment made ready for the next run: `user_class`, fresh events and stats, no
        runner (the run creates its own). Locust's web UI keeps reading it: its / shows this run."""
        environment = self._environment
        if environment.runner is not None:
            environment.runner.quit()  # the previous run's (already stopped) or the placeholder
        environment.runner = None
        environment.events = Events()
        environment.stats = RequestStats()
        environment.user_classes = [user_class]
        return environment

    def next_start(self) -> tuple[int, Scenario] | None:
        """Wait for the next run started from the page: (its number, its scenario); None to quit (the page's
        quit, SIGINT or SIGTERM while waiting, or --web-autoquit seconds after a run ended). Under a sweep,
        which starts nothing from the page, it waits for the quit."""
        autoquit = self.runs.autoquit_s
        if self.runs.quitting:
            return None
        if self.sweep is not None:
            ends = f"it quits in {autoquit:g} s" if autoquit is not None else "quit it there or with Ctrl-C"
            print(f"console: the sweep's curve and files stay at {self.url}; {ends}", file=sys.stderr, flush=True)
        elif self.runs.number == 0:
            print(f"console: waiting for a start from {self.url}", file=sys.stderr, flush=True)
        else:
            ends = f"it quits in {autoquit:g} s unless a run is started" if autoquit is not None else \
                "quit it there or with Ctrl-C"
            print(f"console: start another run at {self.url}; {ends}", file=sys.stderr, flush=True)
        handlers = [gevent.signal_handler(sig, self.quit) for sig in (signal.SIGINT, signal.SIGTERM)]
        try:
            return self.runs.next_start(ended=self.sweep is not None)
        finally:
            for handler in handlers:
                handler.cancel()

    # -- routes ------------------------------------------------------------------------------------
    def _add_routes(self, web_ui: Any) -> None:
        app, guard = web_ui.app, web_ui.auth_required_if_enabled
        app.add_url_rule("/loadgen", "loadgen_page", guard(self._page))
        app.add_url_rule("/loadgen/live", "loadgen_live", guard(self._live))
        app.add_url_rule("/loadgen/sweep", "loadgen_sweep", guard(self._sweep))
        app.add_url_rule("/loadgen/start", "loadgen_start", guard(self._start_run), methods=["POST"])
        app.add_url_rule("/loadgen/stop", "loadgen_stop", guard(self._stop_run), methods=["POST"])
        app.add_url_rule("/loadgen/rate", "loadgen_rate", guard(self._change_rate), methods=["POST"])
        app.add_url_rule("/loadgen/quit", "loadgen_quit", guard(self._quit), methods=["POST"])
        app.add_url_rule("/loadgen/download/<name>", "loadgen_download", guard(self._download))
        # Locust's own controls (its blueprint's endpoints, routes kept): loadgen's stop, no start of its own.
        views = app.view_functions
        missing = [name for name in _LOCUST_CONTROLS if name not in views]
        if missing:
            raise RuntimeError(f"Locust's web UI has no {', '.join(missing)}: the console knows its routes as of "
                               "Locust 2.47")
        views["locust.swarm"] = guard(self._locust_swarm)
        views["locust.update_user"] = guard(self._locust_user)
        views["locust.stop"] = guard(self._locust_stop)
        views["locust.index"] = _with_notice(views["locust.index"])

    def _page(self) -> Response:
        page = resources.files("loadgen.driver").joinpath("console.html").read_text(encoding="utf-8")
        return Response(page, mimetype="text/html")

    def _live(self) -> Response:
        return jsonify(self.live())

    def _sweep(self) -> Response | tuple[Response, int]:
        if self.sweep is None:
            return jsonify({"error": "this console shows runs, not a sweep (loadgen sweep --web-port)"}), 404
        return jsonify(self.sweep.as_json())

    def _start_run(self) -> tuple[Response, int]:
        if self.sweep is not None or self._plan is None:
            return jsonify({"error": "this console shows a sweep: its steps come from the sweep's plan; start "
                                     "another sweep from the command line"}), 409
        if self.runs.busy or self.runs.quitting:
            why = "the console is quitting" if self.runs.quitting else f"run {self.runs.number} is going"
            return jsonify({"error": f"{why}: stop it first, or wait for its end"}), 409
        try:
            scenario = self._plan(request.get_json(silent=True) or request.form)
        except FormError as exc:
            return jsonify({"error": str(exc), "field": exc.field}), 400
        except ValueError as exc:  # the scenario with the form's values over it does not validate
            return jsonify({"error": str(exc), "field": None}), 400
        return jsonify({"run": self.runs.request(scenario)}), 202

    def _stop_run(self) -> tuple[Response, int]:
        number = self.halt()
        if number is None:
            return jsonify({"error": "no run is going" if self.sweep is None else "the sweep has ended"}), 409
        return jsonify({"stopping": True, "run": number, "sweep": self.sweep is not None}), 200

    def _change_rate(self) -> tuple[Response, int]:
        run = self.going()
        if run is None or self.sweep is not None:
            why = "a sweep's step runs at its plan's load" if self.sweep is not None else "no run is going"
            return jsonify({"error": why}), 409
        values = request.get_json(silent=True) or request.form
        try:
            rate = _number(values, "rate")
            at_s = run.ctx.change_rate(rate, _number(values, "at_s") if values.get("at_s") not in (None, "")
                                       else None)
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 409 if not isinstance(exc, _BadField) else 400
        return jsonify({"rate": rate, "at_s": at_s}), 200

    def _locust_swarm(self) -> tuple[Response, int]:
        why = ("this console shows a sweep: its steps come from the sweep's plan" if self.sweep is not None else
               "start runs from loadgen's form at /loadgen (POST /loadgen/start)")
        message = (f"Locust's start form is not used by loadgen's console (it would send load outside loadgen's "
                   f"schedule): {why}")
        return jsonify({"success": False, "message": message, "error": message}), 409

    def _locust_user(self) -> tuple[Response, int]:
        message = ("Locust's user settings are not used by loadgen's console: loadgen sets its users from the "
                   "scenario; start runs from loadgen's form at /loadgen")
        return jsonify({"success": False, "message": message, "error": message}), 409

    def _locust_stop(self) -> tuple[Response, int]:
        """Locust's stop button: loadgen's stop (/loadgen/stop), answered in Locust's shape."""
        answer, status = self._stop_run()
        found = answer.get_json()
        message = found.get("error") or (f"stopping {'the sweep at ' if found['sweep'] else ''}run {found['run']} "
                                         "(loadgen's stop: as Ctrl-C, what was measured is written)")
        return jsonify({**found, "success": status == 200, "message": message}), status

    def _quit(self) -> tuple[Response, int]:
        self.quit()
        return jsonify({"quitting": True, "run": self.runs.number}), 202

    def _download(self, name: str) -> Response | tuple[Response, int]:
        if name in SWEEP_DOWNLOADS and self.sweep is not None:
            path = self.sweep.file(name)
            if path is None:
                return jsonify({"error": "the sweep has not ended"}), 404
            return send_file(path.resolve(), mimetype=SWEEP_DOWNLOADS[name], as_attachment=True,
                             download_name=name, max_age=0)
        if name not in DOWNLOADS:
            names = [*DOWNLOADS, *(SWEEP_DOWNLOADS if self.sweep is not None else ())]
            return jsonify({"error": f"no download {name!r}: one of {', '.join(names)}"}), 404
        asked = request.args.get("run")
        if asked is not None and not asked.isdigit():
            return jsonify({"error": f"run: expected a run number, got {asked!r}"}), 400
        run = self.runs.finished.get(int(asked)) if asked is not None else self.runs.latest_finished()
        if run is None:
            why = f"run {asked} has not finished" if asked is not None else "no run has finished yet"
            return jsonify({"error": why}), 404
        try:
            path = run.file(name)
        except (RuntimeError, OSError, TimeoutError) as exc:
            return jsonify({"error": str(exc)}), 500
        return send_file(path.resolve(), mimetype=DOWNLOADS[name], as_attachment=True,
                         download_name=f"run-{run.number}-{name}", max_age=0)


_LOCUST_CONTROLS = ("locust.index", "locust.swarm", "locust.stop", "locust.update_user")

_NOTICE = """<style>
  #loadgen-notice { background: #1565c0; color: #fff; padding: .6em 1em; font: 15px/1.4 system-ui, sans-serif; }
  #loadgen-notice a { color: #fff; font-weight: bold; }
</style>
<script>
"use strict";
// Added by loadgen: its console starts, steers and stops the runs; Locust's start form is not used.
document.addEventListener("DOMContentLoaded", () => {
  const notice = document.createElement("div");
  notice.id = "loadgen-notice";
  notice.innerHTML = `Runs here are loadgen's: start them, change their rate and download their results on
    <a id="loadgen-console-link" href="/loadgen">loadgen's console</a>. Locust's start form is not used (it
    would send load outside loadgen's schedule); its stop button is loadgen's stop.`;
  document.body.prepend(notice);
  const hide = () => {
    for (const form of document.querySelectorAll("form")) {
      const box = form.parentElement || form;
      if (box.style.display !== "none") box.style.display = "none";
    }
  };
  hide();
  new MutationObserver(hide).observe(document.body, {childList: true, subtree: true});
});
</script>
"""


def _with_notice(index: Callable[..., Any]) -> Callable[..., Any]:
    """Locust's page (its view, `index`) with loadgen's notice in place of its forms."""

    @functools.wraps(index)
    def page(*args: Any, **kwargs: Any) -> Any:
        answer = index(*args, **kwargs)
        if isinstance(answer, str) and "</head>" in answer:
            return answer.replace("</head>", _NOTICE + "</head>", 1)
        return answer  # a 401, or Locust's own error page

    return page


def _loopback(host: str) -> bool:
    """Whether `host` is a loopback address or name (only this machine reaches it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
