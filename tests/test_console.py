"""The live console (`loadgen run --web-port`, `loadgen sweep --web-port`): Locust's web UI with loadgen's page,
live figures and controls, up across runs, and a sweep's curve growing step by step.

Checked against the calibration server (a latency it keeps to the microsecond) and against the run's own
/metrics: the console's figures are the gauges' numbers for the same closed intervals, its achieved rate
is the offered one, a rate change is followed and every arrival of the re-planned schedule is counted
once; the console outlives its run until --web-autoquit ends it; with --web-wait it sends nothing until
a start from the page, whose bad fields are refused by name. In headless Chromium (Debian's chromium and
chromium-driver, driven with selenium): the page shows the achieved rate and the p99 the gauge gives,
changes the rate and stops the run, starts a second run from its form, offers each finished run's
summary.json, latency.hlog and report.html, and its quit ends the process with the last run's exit code.
Over a sweep against a FIFO server of known capacity, the page shows one point per finished step as the
steps end, and once the sweep has ended its points, table and verdict are sweep.json's to the digits shown
(and /loadgen/sweep is sweep.json's numbers exactly); a stop ends the sweep with what was measured written.
With --web-auth, every route of the console (Locust's and loadgen's) answers 401 without the user and
password and 200 with them, and the password is in none of the outputs; with --web-tls-cert/--web-tls-key
they answer over TLS only. Locust's own start (POST /swarm) is refused and its page leads to loadgen's form;
its stop is loadgen's. The start form's think time, seed and in-flight cap are the run's. A distributed
run's console shows the master's merged figures (its gauges) and each worker's health.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadgen.patterns.schedule import profile_of, replan, schedule_offsets
from loadgen.scenario import OpenLoop
from loadgen.sinks.hlog import read_hlog
from tests.support.processes import ROOT, finish, loadgen_cmd, pin, run_loadgen, stop_process
from tests.support.tls import private_ca

pytestmark = pytest.mark.integration

PASSWORD = "pa55-Console-only"
"""The --web-auth password of the tests: looked for in every output, where it must not be."""
DELAY_MS = 5.0
"""The calibration server's latency: every request is answered this long after it arrived."""
SERVICE_MS = 10.0
"""The sweeps' calibration server: one FIFO worker of this service time, so 100 req/s at most."""
SECOND_RUN_S = 2.0
"""The length of the run started from the page in Chromium."""
RUN_S = 7.0
"""The rate-change run's length: the change comes 2-4 s in on a busy host, and the first whole interval
after it must still be inside the run when it is read."""


class ConsoleRun:
    """`loadgen run --web-port 0 --metrics-port 0` (or `loadgen sweep --web-port 0`: `verb`) in a child process,
    with its console and /metrics URLs (`metrics`: wait for the first run's /metrics line too; no run starts at
    once with --web-wait); `auth`: the (user, password) its routes are asked with; `env`: added to the child's
    environment."""

    def __init__(self, target: str, out: Path, *args: str, metrics: bool = True, verb: str = "run",
                 auth: tuple[str, str] | None = None, env: dict[str, str] | None = None) -> None:
        self.out = out
        self.auth = auth
        own = ("--metrics-port", "0", "--quiet") if verb == "run" else ()
        self.proc = subprocess.Popen(
            loadgen_cmd(verb, "--target", target, "--model", "m", "--web-port", "0", *own, "--out", str(out), *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        pin(self.proc.pid, 0)
        self.console = self.metrics = ""
        self.said: list[str] = []
        """What the child wrote on stderr before its console was up."""
        self.stdout = ""
        deadline = time.monotonic() + 30
        while not (self.console and (self.metrics or not metrics)) and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.said.append(line)
            if line.startswith("console on "):
                self.console = line.split()[2]
            elif line.startswith("metrics on "):
                self.metrics = line.split()[-1]
            elif not line and self.proc.poll() is not None:
                break
        if not (self.console and (self.metrics or not metrics)):
            stop_process(self.proc)
            raise AssertionError(f"no console or metrics line: {''.join(self.said)}{self.proc.stderr.read()}")

    def get(self, route: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.console + route, auth=self.auth, timeout=kwargs.pop("timeout", 2), **kwargs)

    def live(self) -> dict[str, Any]:
        return self.get("/live").json()

    def sweep(self) -> dict[str, Any]:
        return self.get("/sweep").json()

    def start(self, **fields: str) -> httpx.Response:
        return httpx.post(self.console + "/start", data=fields, auth=self.auth, timeout=5)

    def gauge(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(httpx.get(self.metrics, timeout=2).text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        raise AssertionError(f"no {name}{labels} in /metrics")

    def wait_live(self, until: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                  read: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The first answer of `read` (default: /loadgen/live) that `until` accepts."""
        read = read or self.live
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = read()
            if until(live):
                return live
            time.sleep(0.05)
        raise AssertionError(f"the console never showed what was waited for; last: {live}")

    def finish(self, timeout: float = 30.0, document: str = "summary.json") -> tuple[int, str, dict[str, Any]]:
        """Wait for the child's end: its exit code, stderr (all of it) and `document` from its --out folder."""
        try:
            self.stdout, stderr = finish(self.proc, timeout=timeout)
        finally:
            stop_process(self.proc)
        return self.proc.returncode, "".join(self.said) + stderr, json.loads((self.out / document).read_text())


def same_moment(run: ConsoleRun, name: str, **labels: str) -> tuple[dict[str, Any], float]:
    """The console's figures and a gauge of /metrics read between them, when no interval closed meanwhile."""
    for _ in range(5):
        before = run.live()
        value = run.gauge(name, **labels)
        after = run.live()
        if before["intervals"] == after["intervals"]:
            return after, value
    raise AssertionError("an interval closed during each of 5 reads")


def sig3(value: float) -> float:
    return float(f"{value:.3g}")


def shown(value: float, *, decimals: int | None = None, digits: int | None = None) -> float:
    """`value` as the page shows it, JS's toFixed(decimals) or toPrecision(digits): the double's exact value
    rounded half up (JS picks the larger of two equally near), read back as a number."""
    exact = Decimal(value)
    exponent = -decimals if decimals is not None else (exact.adjusted() if exact else 0) - digits + 1
    return float(exact.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_UP))


def health(step: dict[str, Any]) -> str:
    """A sweep.json step's health, as the page's table says it."""
    flags = (["GENERATOR-BOUND"] if step["generator_bound"] else []) + ([] if step["stable"] else ["unstable"]) \
        + (["SLO missed"] if step["slo_met"] is False else [])
    return ", ".join(flags) or "ok"


def replanned(rate: float, duration_s: float, changes: list[dict[str, float]]) -> OpenLoop:
    """The run's pattern, re-planned at each change as the run did."""
    pattern = OpenLoop(rate=rate, duration=duration_s)
    for change in changes:
        pattern = replan(pattern, change["at_s"], change["rate"])
    return pattern


def test_live_figures_are_the_gauges_and_a_rate_change_is_followed(calibration_server, host_noise,
                                                                    tmp_path) -> None:
    """... and the console outlives the run, showing it finished, until --web-autoquit's seconds are past."""
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    run = ConsoleRun(server.url, tmp_path, "--rate", "200", "--duration", f"{RUN_S:g}s", "--web-autoquit", "1")
    try:
        page = httpx.get(run.console, timeout=2)
        assert page.status_code == 200 and 'id="achieved-rps"' in page.text
        assert httpx.get(run.console.removesuffix("/loadgen") + "/", timeout=2).status_code == 200  # Locust's
        run.wait_live(lambda live: live.get("intervals", 0) >= 2)
        for window in ("10s", "run"):
            for quantile, key in (("0.5", "p50"), ("0.99", "p99"), ("0.999", "p99_9")):
                live, gauge = same_moment(run, "loadgen_latency_percentile_seconds", quantile=quantile,
                                          window=window)
                # The same function over the same intervals: equal, not only to 3 significant digits.
                assert live["latency_s"][window][key] == gauge, (window, key)
        live, lag = same_moment(run, "loadgen_lag_percentile_seconds", quantile="0.99", window="10s")
        assert live["lag_s"]["10s"]["p99"] == lag
        live, achieved = same_moment(run, "loadgen_achieved_rps")
        assert live["achieved_rps"] == achieved
        assert live["offered_rps"] == 200.0 and live["state"] == "running"
        assert live["loop"] == "open" and live["rate_changeable"]
        generator = live["generator"]  # the self-check so far, judged as summary.json's
        assert generator["bound"] == bool(generator["findings"])
        lagging = live["lag_s"]["run"]["p99"] * 1000 > generator["max_lag_ms"]
        assert lagging == any(finding["kind"] == "lag" for finding in generator["findings"])
        host_noise.assert_near(live["latency_s"]["10s"]["p50"] * 1000, DELAY_MS, 1.0, what="latency p50 (ms)",
                               quantile="p95")
        achieved = live["achieved_rps"]
        host_noise.assert_holds(abs(achieved - 200) <= 10, what=f"achieved {achieved} req/s at 200",
                                margin_ms=50)

        early = httpx.get(run.console + "/download/summary.json", timeout=2)
        assert early.status_code == 404 and "no run has finished" in early.json()["error"]
        going = run.start(rate="100")
        assert going.status_code == 409 and "run 1 is going" in going.json()["error"]

        bad = httpx.post(run.console + "/rate", data={"rate": "fast"}, timeout=2)
        assert bad.status_code == 400 and "rate: expected a number" in bad.json()["error"]
        refused = httpx.post(run.console + "/rate", data={"rate": "-5"}, timeout=2)
        assert refused.status_code == 409 and "rate must be > 0" in refused.json()["error"]
        past = httpx.post(run.console + "/rate", data={"rate": "300", "at_s": "0.5"}, timeout=2)
        assert past.status_code == 409 and "is past" in past.json()["error"]

        changed = httpx.post(run.console + "/rate", data={"rate": "400"}, timeout=2)
        assert changed.status_code == 200, changed.text
        at_s = changed.json()["at_s"]
        # The first interval wholly after the change (and its answers): the achieved rate there is the new one.
        first_full = math.ceil(at_s + DELAY_MS / 1000 + 0.01) + 1
        after = run.wait_live(lambda live: live["intervals"] >= first_full, timeout=4)
        assert after["t_s"] - at_s <= 3.0
        assert after["offered_rps"] == 400.0, after  # read while the run goes on (RUN_S leaves seconds after)
        assert after["rate_changes"] == [{"at_s": at_s, "rate": 400.0}]
        host_noise.assert_holds(abs(after["achieved_rps"] - 400) <= 20,
                                what=f"achieved {after['achieved_rps']} req/s after the change to 400",
                                margin_ms=50)
        ended = run.wait_live(lambda live: live["finished"], timeout=RUN_S + 10)
        seen_finished = time.monotonic()
        assert ended["state"] == "finished" and ended["run"] == 1 and ended["exit_code"] == 0
        assert ended["out"] == str(tmp_path) and not ended["rate_changeable"]
        code, stderr, summary = run.finish()
        assert time.monotonic() - seen_finished >= 0.9  # --web-autoquit 1: a second after the run's end
    finally:
        stop_process(run.proc)
    assert code == 0, stderr
    assert summary["rate_changes"] == [{"at_s": at_s, "rate": 400.0}]
    pattern = replanned(200, RUN_S, summary["rate_changes"])
    # Each arrival of the re-planned schedule once: before the change by the first dispatcher, after it by
    # the second.
    assert summary["sent"] + summary["dropped"] + summary["unsent"] == len(schedule_offsets(pattern))
    assert summary["offered_rps"] == pytest.approx(profile_of(pattern).count_by(RUN_S) / RUN_S)
    assert summary["offered_rps"] == pytest.approx((200 * at_s + 400 * (RUN_S - at_s)) / RUN_S)
    assert summary["errors"] == {}


def test_with_web_wait_nothing_is_sent_until_a_start_from_the_page(calibration_server, tmp_path) -> None:
    """--web-wait: the command line's load fills the form; the start's fields are checked one by one (400
    naming the field); the form's users switch the run to a closed loop; --web-autoquit 0 then ends it."""
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    run = ConsoleRun(server.url, tmp_path, "--rate", "100", "--duration", "1s", "--web-wait", "--web-autoquit", "0",
                     metrics=False)
    try:
        waiting = run.live()
        assert (waiting["state"], waiting["run"], waiting["finished"]) == ("waiting", 0, False)
        assert waiting["form"] == {"loop": "open", "rate": 100.0, "arrival": "constant", "users": None,
                                   "duration": "1s", "think_time": None, "seed": 1, "max_in_flight": 2000}
        assert httpx.get(run.console + "/download/latency.hlog", timeout=2).status_code == 404
        for fields, field, says in (({"rate": "fast"}, "rate", "expected a rate"),
                                    ({"users": "0"}, "users", "> 0"),
                                    ({"rate": "50", "users": "2"}, "users", "exclude each other"),
                                    ({"arrival": "bursty"}, "arrival", "constant, poisson, gamma"),
                                    ({"duration": "soon"}, "duration", "expected a duration"),
                                    ({"users": "2", "think_time": "soon"}, "think_time", "expected a duration"),
                                    ({"think_time": "10ms"}, "think_time", "an open loop's (rate)"),
                                    ({"max_in_flight": "0"}, "max_in_flight", "> 0"),
                                    ({"users": "2", "max_in_flight": "5"}, "max_in_flight", "a closed loop's"),
                                    ({"seed": "-1"}, "seed", ">= 0"),
                                    ({"seed": "1.5"}, "seed", "whole number"),
                                    ({"speed": "9"}, "speed", "not a field")):
            refused = run.start(**fields)
            assert refused.status_code == 400 and refused.json()["field"] == field, refused.text
            assert refused.json()["error"].startswith(f"{field}: ") and says in refused.json()["error"]
        assert not (tmp_path / "summary.json").exists() and run.live()["state"] == "waiting"
        started = run.start(users="2", duration="1s")
        assert started.status_code == 202 and started.json() == {"run": 1}
        code, stderr, summary = run.finish()
    finally:
        stop_process(run.proc)
    assert code == 0, stderr
    assert "console: waiting for a start" in stderr
    assert summary["pattern"] == "ClosedLoop" and summary["duration_s"] == 1.0
    assert summary["ok"] > 0 and summary["errors"] == {}


def test_the_start_forms_think_time_seed_and_in_flight_cap_reach_the_run(calibration_server, tmp_path) -> None:
    """The start form's think time (closed loop), seed and in-flight cap (open loop) are the run's: one user
    thinking 100 ms sends at most one request per 100 ms; a Poisson schedule of seed 7 has seed 7's arrivals,
    each sent, dropped or unsent once; the cap is summary.json's; the next form's defaults are the run's."""
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    run = ConsoleRun(server.url, tmp_path, "--rate", "100", "--duration", "1s", "--web-wait", metrics=False)
    poisson = {seed: len(schedule_offsets(OpenLoop(rate=100, duration=1, arrival="poisson", seed=seed)))
               for seed in (1, 7)}
    assert poisson[1] != poisson[7]  # the seed shows in the count
    try:
        assert run.start(users="1", think_time="100ms", duration="1s").status_code == 202
        closed = run.wait_live(lambda live: live["finished"], timeout=15)
        assert closed["form"]["think_time"] == "0.1s" and closed["form"]["loop"] == "closed"
        started = run.start(rate="100", arrival="poisson", seed="7", max_in_flight="1", duration="1s")
        assert started.status_code == 202 and started.json() == {"run": 2}, started.text
        opened = run.wait_live(lambda live: live["run"] == 2 and live["finished"], timeout=15)
        assert opened["form"] == {"loop": "open", "rate": 100.0, "arrival": "poisson", "users": None,
                                  "duration": "1s", "think_time": None, "seed": 7, "max_in_flight": 1}
        assert httpx.post(run.console + "/quit", timeout=2).status_code == 202
        code, stderr, thought = run.finish()
    finally:
        stop_process(run.proc)
    assert code == 0, stderr
    assert thought["pattern"] == "ClosedLoop" and thought["errors"] == {}
    assert 0 < thought["sent"] <= 1 / 0.1 + 1  # without the think time: about 1 s / 5 ms
    capped = json.loads((tmp_path / "run-2" / "summary.json").read_text())
    assert capped["pattern"] == "OpenLoop" and capped["generator"]["max_in_flight"] == 1
    assert capped["sent"] + capped["dropped"] + capped["unsent"] == poisson[7]
    assert capped["dropped"] > 0  # arrivals closer than the server's 5 ms find the one slot taken


def test_locusts_own_start_is_refused_and_its_stop_is_loadgens(calibration_server, tmp_path) -> None:
    """Locust's own controls cannot run its runner outside loadgen's schedule: its start form's POST /swarm (and
    its user editor's POST /user) is refused, 409 saying to use loadgen's form at /loadgen, before a run and
    during one, and starts nothing; its POST /stop is loadgen's stop: the run ends as by Ctrl-C, written."""
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    run = ConsoleRun(server.url, tmp_path, "--rate", "50", "--duration", "30s", "--web-wait", "--web-autoquit", "0",
                     metrics=False)
    base = run.console.removesuffix("/loadgen")
    swarm = {"user_count": "5", "spawn_rate": "5", "host": server.url}
    try:
        for _ in ("before a run", "during one"):
            refused = httpx.post(base + "/swarm", data=swarm, timeout=2)
            assert refused.status_code == 409 and refused.json()["success"] is False, refused.text
            assert "loadgen's form at /loadgen" in refused.json()["message"]
            user = httpx.post(base + "/user", json={"userClassName": "OpenLoopUser", "fixed_count": 9}, timeout=2)
            assert user.status_code == 409 and "/loadgen" in user.json()["message"], user.text
            if run.live()["state"] == "waiting":
                idle = httpx.post(base + "/stop", timeout=2)
                assert idle.status_code == 409 and idle.json()["message"] == "no run is going", idle.text
                assert run.start(rate="50", duration="30s").status_code == 202
                run.wait_live(lambda live: live["state"] == "running" and live.get("intervals", 0) >= 1)
        assert run.live()["run"] == 1
        stopped = httpx.post(base + "/stop", timeout=2)
        assert stopped.status_code == 200 and stopped.json()["success"] is True, stopped.text
        assert stopped.json()["run"] == 1 and "loadgen's stop" in stopped.json()["message"]
        code, stderr, summary = run.finish()
    finally:
        stop_process(run.proc)
    assert code == 130, stderr  # stopped: as by Ctrl-C
    assert summary["interrupted"] is True and summary["duration_s"] < 30
    assert summary["pattern"] == "OpenLoop" and summary["errors"] == {}
    assert "run-2" not in {path.name for path in tmp_path.iterdir()}


def test_a_distributed_runs_console_shows_the_merged_figures_and_each_workers_health(calibration_server,
                                                                                   tmp_path) -> None:
    """`--processes 2 --web-port`: the master's console shows the run the two workers send, its figures the
    master's /metrics gauges of the merged intervals, and a worker list that is the loadgen_worker_* gauges;
    its rate is not changed (409); its stop ends the run on both workers, written as by Ctrl-C."""
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    run = ConsoleRun(server.url, tmp_path, "--rate", "100", "--duration", "30s", "--processes", "2",
                     "--web-autoquit", "0")
    try:
        run.wait_live(lambda live: live.get("intervals", 0) >= 2, timeout=20)
        live, achieved = same_moment(run, "loadgen_achieved_rps")
        assert live["achieved_rps"] == achieved and live["offered_rps"] == 100.0
        live, p99 = same_moment(run, "loadgen_latency_percentile_seconds", quantile="0.99", window="10s")
        assert live["latency_s"]["10s"]["p99"] == p99 and live["state"] == "running"
        assert not live["rate_changeable"]
        workers = live["workers"]
        assert [worker["worker"] for worker in workers] == ["0", "1"] and all(w["up"] for w in workers)
        for worker in workers:
            labels = {"worker": worker["worker"], "host": worker["host"]}
            assert run.gauge("loadgen_worker_up", **labels) == 1.0
        assert live["generator"]["master_cpu_fraction"] >= 0  # the distributed check, as summary.json's
        refused = httpx.post(run.console + "/rate", data={"rate": "200"}, timeout=2)
        assert refused.status_code == 409 and "distributed" in refused.json()["error"]
        stopped = httpx.post(run.console + "/stop", timeout=2)
        assert stopped.status_code == 200 and stopped.json()["run"] == 1
        code, stderr, summary = run.finish()
    finally:
        stop_process(run.proc)
    assert code == 130, stderr
    assert summary["interrupted"] is True and summary["duration_s"] < 30
    assert [worker["worker"] for worker in summary["distributed"]["workers"]] == ["0", "1"]
    assert all(worker["requests"] > 0 for worker in summary["distributed"]["workers"])
    assert summary["errors"] == {}


def test_web_flags_are_checked(tmp_path) -> None:
    bad_port = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                           "--web-port", "70000", "--web-autoquit", "-1", out=tmp_path)
    assert bad_port.returncode == 2 and "--web-port: expected a port from 0 to 65535" in bad_port.stderr
    assert "--web-autoquit: expected seconds >= 0, got -1" in bad_port.stderr
    alone = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                        "--web-wait", out=tmp_path)
    assert alone.returncode == 2 and "--web-wait is for the live console: give --web-port too" in alone.stderr
    swept = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rates", "10", "--web-port", "0",
                        "--processes", "2", out=tmp_path, verb="sweep")
    assert swept.returncode == 2 and "single-process sweeps" in swept.stderr
    waiting = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rates", "10", "--web-port", "0",
                          "--web-wait", out=tmp_path, verb="sweep")
    assert waiting.returncode == 2 and "--web-wait" in waiting.stderr  # a sweep's plan is on the command line
    no_password = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                              "--web-port", "0", "--web-auth", PASSWORD, out=tmp_path)
    assert no_password.returncode == 2 and "--web-auth: expected USER:PASSWORD" in no_password.stderr
    assert PASSWORD not in no_password.stderr + no_password.stdout  # the bad value is not repeated
    no_console = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                             "--web-auth", f"ops:{PASSWORD}", out=tmp_path)
    assert no_console.returncode == 2 and "--web-auth is for the live console" in no_console.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for verb, flags, says in (
            ("run", ("--web-tls-cert", str(garbage)), "--web-tls-key: give it with --web-tls-cert"),
            ("sweep", ("--web-tls-key", str(garbage)), "--web-tls-cert: give it with --web-tls-key"),
            ("sweep", ("--web-tls-cert", str(tmp_path / "nowhere.pem"), "--web-tls-key", str(garbage)),
             f"--web-tls-cert: no such file: {tmp_path / 'nowhere.pem'}"),
            ("run", ("--web-tls-cert", str(garbage), "--web-tls-key", str(garbage)),
             f"--web-tls-cert/--web-tls-key: {garbage} and {garbage} are not a PEM certificate and its private key")):
        load = ("--rates", "10") if verb == "sweep" else ("--rate", "10", "--duration", "1s")
        refused = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", *load, "--web-port", "0", *flags,
                              out=tmp_path, verb=verb)
        assert refused.returncode == 2 and says in refused.stderr, (verb, flags, refused.stderr)
    no_port = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                          "--web-tls-key", str(garbage), out=tmp_path)
    assert no_port.returncode == 2 and "--web-tls-key is for the live console: give --web-port" in no_port.stderr


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


NO_CHROMIUM = ("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
               ".ci/run installs them)")


def _browser() -> Any:
    """Headless Chromium driven by selenium (quit it when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _chromium()
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)
def test_the_page_shows_the_gauges_changes_the_rate_and_stops_in_chromium(calibration_server, host_noise,
                                                                         tmp_path) -> None:
    from selenium.webdriver.common.by import By

    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    driver = _browser()
    # An SLO the 5 ms server misses: the exit code the quit ends with is the last run's verdict.
    run = ConsoleRun(server.url, tmp_path, "--rate", "200", "--duration", "8s", "--slo", "p99<1ms")
    try:
        driver.get(run.console)

        def shown() -> dict[str, str]:
            return driver.execute_script(
                "return {intervals: document.getElementById('intervals').textContent,"
                " p99: document.getElementById('latency-10s-p99').textContent,"
                " achieved: document.getElementById('achieved-rps').textContent,"
                " state: document.getElementById('state').textContent,"
                " run: document.getElementById('run').textContent,"
                " downloads: getComputedStyle(document.getElementById('downloads')).display,"
                " banner: getComputedStyle(document.getElementById('banner')).display}")

        def wait_shown(until: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
            deadline = time.monotonic() + timeout
            while not until(page := shown()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert until(page), f"the page never showed what was waited for: {page}"
            return page

        def download_links() -> dict[str, str]:
            return {element.text: element.get_attribute("href")
                    for element in driver.find_elements(By.CSS_SELECTOR, "#downloads a")}

        run.wait_live(lambda live: live.get("intervals", 0) >= 2)
        for _ in range(8):  # the page polls every 250 ms: catch it showing the intervals the gauge was read at
            live, p99 = same_moment(run, "loadgen_latency_percentile_seconds", quantile="0.99", window="10s")
            deadline = time.monotonic() + 0.6
            while (page := shown())["intervals"] != str(live["intervals"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            if page["intervals"] == str(live["intervals"]):
                break
        else:
            raise AssertionError(f"the page never showed the intervals of the gauge's read: {page}")
        assert page["state"] == "running"
        assert float(page["p99"]) == sig3(p99 * 1000)  # ms, 3 significant digits
        assert page["banner"] == ("block" if live["generator"]["bound"] else "none")
        host_noise.assert_holds(abs(float(page["achieved"]) - 200) <= 10,
                                what=f"the page's achieved rate {page['achieved']} at 200", margin_ms=50)

        driver.find_element(By.ID, "rate-input").send_keys("400")
        clicked = time.monotonic()
        driver.find_element(By.ID, "rate-button").click()
        deadline = clicked + 3.0
        while float(shown()["achieved"] or 0) < 380 and time.monotonic() < deadline:
            time.sleep(0.05)
        followed = float(shown()["achieved"])
        host_noise.assert_holds(abs(followed - 400) <= 20,
                                what=f"the page's achieved rate {followed} 3 s after the change to 400",
                                margin_ms=50)

        driver.find_element(By.ID, "stop-button").click()
        first = wait_shown(lambda page: page["run"] == "1" and page["downloads"] == "block", timeout=10)
        assert first["state"].startswith("finished (exit 130")  # stopped from the page: as by Ctrl-C
        summary = httpx.get(download_links()["summary.json"], timeout=5).json()

        for field, value in (("start-rate", "100"), ("start-duration", f"{SECOND_RUN_S:g}s")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "start-button").click()
        wait_shown(lambda page: page["run"] == "2" and page["state"] == "running", timeout=10)
        second = wait_shown(lambda page: page["run"] == "2" and page["downloads"] == "block",
                            timeout=SECOND_RUN_S + 10)
        assert second["state"].startswith("finished (exit 1,")  # p99 < 1 ms missed
        links = download_links()
        assert sorted(links) == ["latency.hlog", "report.html", "summary.json"]
        assert all(href.endswith("?run=2") for href in links.values()), links
        summary2 = httpx.get(links["summary.json"], timeout=5).json()
        (tmp_path / "downloaded.hlog").write_bytes(httpx.get(links["latency.hlog"], timeout=5).content)
        report = httpx.get(links["report.html"], timeout=120)
        driver.find_element(By.ID, "quit-button").click()
        code, stderr, _ = run.finish()
    finally:
        driver.quit()
        stop_process(run.proc)
    assert code == 1, stderr  # the quit's exit code is the last run's: its SLO was missed
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["duration_s"] < 8.0
    assert [change["rate"] for change in summary["rate_changes"]] == [400.0]

    assert summary2 == json.loads((tmp_path / "run-2" / "summary.json").read_text())
    assert summary2["slo"]["met"] is False and summary2["interrupted"] is False and "rate_changes" not in summary2
    assert summary2["offered_rps"] == 100.0 and summary2["duration_s"] == SECOND_RUN_S
    arrivals = len(schedule_offsets(OpenLoop(rate=100, duration=SECOND_RUN_S)))
    assert arrivals == 100 * SECOND_RUN_S
    assert summary2["sent"] + summary2["dropped"] + summary2["unsent"] == arrivals
    host_noise.assert_holds(summary2["ok"] == arrivals and summary2["errors"] == {},
                            what=f"{summary2['ok']} answered of the {arrivals} arrivals of 100 req/s for "
                                 f"{SECOND_RUN_S:g} s", margin_ms=50)
    hlog = read_hlog(tmp_path / "downloaded.hlog")
    assert sum(histogram.get_total_count() for histogram in hlog[None]) == summary2["ok"]
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert report.text.lstrip().lower().startswith("<!doctype html") and "Run on m" in report.text


@pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)
def test_locusts_page_leads_to_loadgens_form_in_place_of_its_own_in_chromium(calibration_server, tmp_path) -> None:
    """Locust's page at / renders (its React app, its start form included) with that form hidden and loadgen's
    notice leading to /loadgen, where loadgen's start form is."""
    from selenium.webdriver.common.by import By

    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    driver = _browser()
    run = ConsoleRun(server.url, tmp_path, "--rate", "50", "--duration", "1s", "--web-wait", metrics=False)
    try:
        driver.get(run.console.removesuffix("/loadgen") + "/")
        page: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            page = driver.execute_script("""
              const visible = (el) => el.getClientRects().length > 0;
              const notice = document.getElementById("loadgen-notice");
              return {notice: notice ? notice.textContent : null, rendered: document.getElementById("root")
                        .childElementCount, forms: document.querySelectorAll("form").length,
                      shownForms: [...document.querySelectorAll("form")].filter(visible).length,
                      shownStart: [...document.querySelectorAll("h2, button")].filter(
                        (el) => visible(el) && /start/i.test(el.textContent)).length};""")
            if page["rendered"] and page["forms"]:
                break
            time.sleep(0.1)
        assert page["rendered"] and page["forms"] >= 1, f"Locust's page never rendered its start form: {page}"
        assert page["shownForms"] == 0 and page["shownStart"] == 0, page
        assert "loadgen's console" in page["notice"] and "its stop button is loadgen's stop" in page["notice"]
        driver.find_element(By.ID, "loadgen-console-link").click()
        deadline = time.monotonic() + 10
        while not driver.current_url.endswith("/loadgen") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.current_url == run.console
        assert driver.find_element(By.ID, "start-form").is_displayed()
        assert httpx.post(run.console + "/quit", timeout=2).status_code == 202
        code, stderr = run.proc.wait(timeout=30), run.proc.stderr.read()
    finally:
        driver.quit()
        stop_process(run.proc)
    assert code == 0, stderr  # no run: nothing to report
    assert not (tmp_path / "summary.json").exists()


def test_web_auth_guards_every_route_and_stays_out_of_the_outputs(calibration_server, tmp_path) -> None:
    """--web-auth USER:PASSWORD: Locust's pages and loadgen's routes answer 401 (asking for basic auth) without
    the user and password, or with a wrong one, and do nothing; with them, 200; the password is in neither
    the printed output nor the run's files."""
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    run = ConsoleRun(server.url, tmp_path, "--rate", "50", "--duration", "1s", "--web-wait", "--web-autoquit", "0",
                     "--web-auth", f"ops:{PASSWORD}", metrics=False, auth=("ops", PASSWORD))
    base = run.console.removesuffix("/loadgen")
    try:
        for path in ("/", "/stats/requests", "/loadgen", "/loadgen/live", "/loadgen/sweep",
                     "/loadgen/download/summary.json"):
            for auth in (None, ("ops", "wrong"), ("intruder", PASSWORD)):
                refused = httpx.get(base + path, auth=auth, timeout=2)
                assert refused.status_code == 401, (path, auth, refused.text)
                assert refused.headers["www-authenticate"].startswith("Basic realm=")
        for path in ("/loadgen/start", "/loadgen/stop", "/loadgen/rate", "/loadgen/quit", "/swarm", "/stop"):
            refused = httpx.post(base + path, data={"rate": "100", "user_count": "1"}, timeout=2)
            assert refused.status_code == 401, (path, refused.text)
        for path in ("/", "/stats/requests", "/loadgen", "/loadgen/live"):
            assert httpx.get(base + path, auth=run.auth, timeout=2).status_code == 200, path
        assert run.get("/sweep").status_code == 404  # a run's console shows no sweep
        assert run.live()["state"] == "waiting"  # none of the refused requests started or quit anything
        assert run.start(rate="50", duration="1s").status_code == 202
        code, stderr, summary = run.finish()
    finally:
        stop_process(run.proc)
    assert code == 0, stderr
    assert "(basic auth: user ops)" in stderr
    assert summary["sent"] == 50 and summary["errors"] == {}
    outputs = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.name for path in outputs} >= {"summary.json", "latency.hlog"}
    for text in (stderr, run.stdout, *(path.read_text(errors="replace") for path in outputs)):
        assert PASSWORD not in text


def test_the_console_over_https_takes_its_password_inside_tls(calibration_server, tmp_path) -> None:
    """--web-tls-cert/--web-tls-key (a certificate for 127.0.0.1 from a CA made here): the console says https,
    and Locust's page and loadgen's routes answer over TLS that the CA verifies, with --web-auth's 401 and 200;
    a plain-HTTP request to the port gets no answer and the console keeps serving; a run started over HTTPS
    is sent and written."""
    (tmp_path / "ca").mkdir()
    ca = private_ca(tmp_path / "ca")
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    out = tmp_path / "out"
    run = ConsoleRun(server.url, out, "--rate", "50", "--duration", "1s", "--web-wait", "--web-autoquit", "0",
                     "--web-auth", f"ops:{PASSWORD}", "--web-tls-cert", str(ca.server_cert), "--web-tls-key",
                     str(ca.server_key), metrics=False)
    base = run.console.removesuffix("/loadgen")
    auth = ("ops", PASSWORD)
    try:
        assert base.startswith("https://127.0.0.1:"), run.console
        with httpx.Client(verify=ssl.create_default_context(cafile=ca.ca), timeout=5) as client:
            assert client.get(base + "/loadgen/live").status_code == 401
            assert client.get(base + "/", auth=auth).status_code == 200
            with pytest.raises(httpx.HTTPError):  # no TLS: the handshake fails, nothing is answered
                httpx.get(base.replace("https://", "http://") + "/loadgen/live", auth=auth, timeout=5)
            with pytest.raises(httpx.ConnectError):  # the system's CAs do not know this certificate
                httpx.get(base + "/loadgen/live", timeout=5)
            assert client.get(base + "/loadgen/live", auth=auth).json()["state"] == "waiting"
            started = client.post(base + "/loadgen/start", data={"rate": "50", "duration": "1s"}, auth=auth)
            assert started.status_code == 202, started.text
        code, stderr, summary = run.finish()
    finally:
        stop_process(run.proc)
    assert code == 0, stderr
    assert f"console on {run.console} (basic auth: user ops)" in stderr
    assert summary["sent"] == 50 and summary["errors"] == {}
    assert PASSWORD not in stderr + run.stdout


def test_the_pages_stop_ends_a_sweep_with_what_was_measured_written(calibration_server, tmp_path) -> None:
    """Stopped from the console during its second step, as Ctrl-C would: the sweep writes both steps (the
    second interrupted), starts no third, and exits 130 (--web-autoquit 0: once written). Its console, behind
    LOADGEN_WEB_AUTH, answers 401 without it and keeps the password out of every output; it starts no run and
    changes no step's rate (409)."""
    server = calibration_server("--service-ms", f"{SERVICE_MS:g}", "--workers", "1")
    out = tmp_path / "sweep"
    run = ConsoleRun(server.url, out, "--rates", "50,50,50", "--step-duration", "2s", "--warmup", "0s",
                     "--web-autoquit", "0", verb="sweep", metrics=False, auth=("ops", PASSWORD),
                     env={"LOADGEN_WEB_AUTH": f"ops:{PASSWORD}"})
    try:
        assert httpx.get(run.console + "/sweep", timeout=2).status_code == 401
        assert httpx.post(run.console + "/stop", timeout=2).status_code == 401
        going = run.wait_live(lambda live: live["run"] == 2 and live.get("intervals", 0) >= 1, timeout=15)
        assert going["sweep"] is True and going["rate_changeable"] is False
        assert run.sweep()["running"] == {"phase": "step", "step": 2, "load": 50.0}
        refused = run.start(rate="100")
        assert refused.status_code == 409 and "sweep's plan" in refused.json()["error"]
        refused = httpx.post(run.console + "/rate", data={"rate": "100"}, auth=run.auth, timeout=2)
        assert refused.status_code == 409 and "plan's load" in refused.json()["error"]
        stopped = httpx.post(run.console + "/stop", auth=run.auth, timeout=2)
        assert stopped.status_code == 200 and stopped.json() == {"stopping": True, "run": 2, "sweep": True}
        code, stderr, sweep = run.finish(document="sweep.json")
    finally:
        stop_process(run.proc)
    assert code == 130, stderr
    assert sweep["interrupted"] is True and [step["step"] for step in sweep["steps"]] == [1, 2]
    first, second = (json.loads((out / step["dir"] / "summary.json").read_text()) for step in sweep["steps"])
    assert first["interrupted"] is False and first["duration_s"] == 2.0
    assert second["interrupted"] is True and 0 < second["duration_s"] < 2.0
    assert sorted(path.name for path in (out / "steps").iterdir()) == ["01-50rps", "02-50rps"]
    outputs = [path for path in out.rglob("*") if path.is_file()]
    for text in (stderr, run.stdout, *(path.read_text(errors="replace") for path in outputs)):
        assert PASSWORD not in text


@pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)
def test_a_sweeps_curve_grows_a_point_per_step_and_ends_as_sweep_json_in_chromium(calibration_server, host_noise,
                                                                                 tmp_path) -> None:
    """Three steps, 60, 90 and 130 req/s against one FIFO worker of 10 ms (100 req/s), 1 s warm-up + 2 s each:
    while the sweep goes on the page shows a point (and a table row) per finished step; once it has ended,
    each step's rates and latencies as shown are sweep.json's to the digits shown, and so is the verdict;
    /loadgen/sweep and the sweep.json download are sweep.json's numbers exactly; the quit ends the process
    with the sweep's exit code."""
    from selenium.webdriver.common.by import By

    server = calibration_server("--service-ms", f"{SERVICE_MS:g}", "--workers", "1")
    driver = _browser()
    out = tmp_path / "sweep"
    run = ConsoleRun(server.url, out, "--rates", "60,90,130", "--step-duration", "2s", "--warmup", "1s",
                     verb="sweep", metrics=False)
    try:
        driver.get(run.console)

        def page() -> dict[str, Any]:
            return driver.execute_script("""
              const text = (id) => document.getElementById(id).textContent;
              const row = (tr) => Object.fromEntries([...tr.cells].map((td) => [td.className.split(" ")[0],
                                                                                   td.textContent]));
              return {points: [...document.querySelectorAll("#sweep-chart circle.point")].map(
                        (circle) => Number(circle.dataset.step)),
                      rows: [...document.querySelectorAll("#sweep-steps tbody tr")].map(row),
                      running: text("sweep-running"), final: text("sweep-final"),
                      saturation: text("sweep-saturation"), knee: text("sweep-knee"),
                      notes: [...document.querySelectorAll("#sweep-notes li")].map((li) => li.textContent),
                      downloads: getComputedStyle(document.getElementById("sweep-downloads")).display,
                      stop: text("stop-button"),
                      form: getComputedStyle(document.getElementById("start-form")).display};""")

        matched: set[int] = set()  # step counts the page showed while /loadgen/sweep had as many finished
        running: set[str] = set()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            before = run.sweep()
            now = page()
            after = run.sweep()
            finished = len(before["steps"])
            if len(after["steps"]) == finished and now["points"] == list(range(1, finished + 1)) \
                    and [row["step"] for row in now["rows"]] == [str(n) for n in range(1, finished + 1)]:
                matched.add(finished)
            running.add(now["running"])
            if after["final"] and now["downloads"] == "block":
                break
            time.sleep(0.1)
        final = page()
        answered = run.sweep()
        downloaded = run.get("/download/sweep.json")
        driver.find_element(By.ID, "quit-button").click()
        code, stderr, sweep = run.finish(document="sweep.json")
    finally:
        driver.quit()
        stop_process(run.proc)
    assert code == 0, stderr  # no SLO: the sweep exits 0
    assert matched >= {1, 2, 3}, f"the page's points never matched the finished steps: {matched}"
    assert {"step 2 of up to 3 at 90 req/s", "step 3 of up to 3 at 130 req/s"} <= running, running
    assert final["stop"] == "stop the sweep" and final["form"] == "none"  # a sweep's steps come from its plan

    steps = sweep["steps"]
    assert [step["load"] for step in steps] == [60.0, 90.0, 130.0]
    assert answered["steps"] == steps and answered["final"] is True and answered["exit_code"] == 0
    assert answered["verdict"] == {key: sweep[key] for key in answered["verdict"]}
    assert {"saturation_rps", "saturated", "knee", "notes"} <= set(answered["verdict"])
    assert downloaded.status_code == 200 and downloaded.json() == sweep

    assert final["points"] == [1, 2, 3]
    rows = {int(row["step"]): row for row in final["rows"]}
    for step in steps:
        row = rows[step["step"]]
        assert float(row["offered"]) == shown(step["offered_rps"], decimals=1), (row, step)
        assert float(row["achieved"]) == shown(step["achieved_rps"], decimals=1), (row, step)
        assert float(row["p50"]) == shown(step["latency_ms"]["p50"], digits=3), (row, step)
        assert float(row["p99"]) == shown(step["latency_ms"]["p99"], digits=3), (row, step)
        assert row["health"] == health(step)
    assert final["final"] == "(final: sweep.json's)"
    saturation = sweep["saturation_rps"]
    if saturation is None:
        assert final["saturation"] == "unknown"
    else:
        assert float(final["saturation"].split()[0]) == shown(saturation, decimals=1)
        assert ("lower bound" in final["saturation"]) == (not sweep["saturated"])
    knee = sweep["knee"]
    if knee is None:
        assert final["knee"] == "none"
    else:
        said = re.fullmatch(r"step (\d+) \((\S+) req/s\): (\S+) req/s achieved, p99 (\S+) ms", final["knee"])
        assert said is not None, final["knee"]
        assert (int(said[1]), float(said[2])) == (knee["step"], knee["load"])
        assert float(said[3]) == shown(knee["achieved_rps"], decimals=1)
        assert float(said[4]) == shown(knee["p99_ms"], digits=3)
    assert final["notes"] == sweep["notes"]
    # The figures are the server's: below its 100 req/s every arrival is answered at its rate, above it the
    # one worker's capacity (5 % of a 2 s step: only a host stall of 100 ms moves it so far).
    achieved = [step["achieved_rps"] for step in steps]
    host_noise.assert_holds(achieved[:2] == pytest.approx([60.0, 90.0], rel=0.05)
                            and achieved[2] == pytest.approx(1000.0 / SERVICE_MS, rel=0.05),
                            what=f"achieved {achieved} req/s at 60, 90 and 130 offered", margin_ms=100.0)
