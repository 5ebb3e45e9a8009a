"""The live console (`loadgen run --web-port`): Locust's web UI with loadgen's page, live figures and controls,
up across runs.

Checked against the calibration server (a latency it keeps to the microsecond) and against the run's own
/metrics: the console's figures are the gauges' numbers for the same closed intervals, its achieved rate
is the offered one, a rate change is followed and every arrival of the re-planned schedule is counted
once; the console outlives its run until --web-autoquit ends it; with --web-wait it sends nothing until
a start from the page, whose bad fields are refused by name. In headless Chromium (Debian's chromium and
chromium-driver, driven with selenium): the page shows the achieved rate and the p99 the gauge gives,
changes the rate and stops the run, starts a second run from its form, offers each finished run's
summary.json, latency.hlog and report.html, and its quit ends the process with the last run's exit code.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadgen.patterns.schedule import profile_of, replan, schedule_offsets
from loadgen.scenario import OpenLoop
from loadgen.sinks.hlog import read_hlog
from tests.support.processes import ROOT, finish, loadgen_cmd, pin, run_loadgen, stop_process

pytestmark = pytest.mark.integration

DELAY_MS = 5.0
"""The calibration server's latency: every request is answered this long after it arrived."""
SECOND_RUN_S = 2.0
"""The length of the run started from the page in Chromium."""
RUN_S = 7.0
"""The rate-change run's length: the change comes 2-4 s in on a busy host, and the first whole interval
after it must still be inside the run when it is read."""


class ConsoleRun:
    """`loadgen run --web-port 0 --metrics-port 0` in a child process, with its console and /metrics URLs
    (`metrics`: wait for the first run's /metrics line too; no run starts at once with --web-wait)."""

    def __init__(self, target: str, out: Path, *args: str, metrics: bool = True) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            loadgen_cmd("run", "--target", target, "--model", "m", "--web-port", "0", "--metrics-port", "0",
                        "--quiet", "--out", str(out), *args),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        pin(self.proc.pid, 0)
        self.console = self.metrics = ""
        said = []
        deadline = time.monotonic() + 30
        while not (self.console and (self.metrics or not metrics)) and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            said.append(line)
            if line.startswith("console on "):
                self.console = line.split()[-1]
            elif line.startswith("metrics on "):
                self.metrics = line.split()[-1]
            elif not line and self.proc.poll() is not None:
                break
        self.said = "".join(said)
        """What it printed on stderr before the console's URL was known (its lines come in either order)."""
        if not (self.console and (self.metrics or not metrics)):
            stop_process(self.proc)
            raise AssertionError(f"no console or metrics line: {self.said}{self.proc.stderr.read()}")

    def live(self) -> dict[str, Any]:
        return httpx.get(self.console + "/live", timeout=2).json()

    def start(self, **fields: str) -> httpx.Response:
        return httpx.post(self.console + "/start", data=fields, timeout=5)

    def gauge(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(httpx.get(self.metrics, timeout=2).text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        raise AssertionError(f"no {name}{labels} in /metrics")

    def wait_live(self, until: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self.live()
            if until(live):
                return live
            time.sleep(0.05)
        raise AssertionError(f"the console never showed what was waited for; last: {live}")

    def finish(self, timeout: float = 30.0) -> tuple[int, str, dict[str, Any]]:
        try:
            _, stderr = finish(self.proc, timeout=timeout)
        finally:
            stop_process(self.proc)
        return self.proc.returncode, self.said + stderr, json.loads((self.out / "summary.json").read_text())


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
                                   "duration": "1s"}
        assert httpx.get(run.console + "/download/latency.hlog", timeout=2).status_code == 404
        for fields, field, says in (({"rate": "fast"}, "rate", "expected a rate"),
                                    ({"users": "0"}, "users", "> 0"),
                                    ({"rate": "50", "users": "2"}, "users", "exclude each other"),
                                    ({"arrival": "bursty"}, "arrival", "constant, poisson, gamma"),
                                    ({"duration": "soon"}, "duration", "expected a duration"),
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


def test_web_flags_are_checked(tmp_path) -> None:
    bad_port = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                           "--web-port", "70000", "--web-autoquit", "-1", out=tmp_path)
    assert bad_port.returncode == 2 and "--web-port: expected a port from 0 to 65535" in bad_port.stderr
    assert "--web-autoquit: expected seconds >= 0, got -1" in bad_port.stderr
    alone = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                        "--web-wait", out=tmp_path)
    assert alone.returncode == 2 and "--web-wait is for the live console: give --web-port too" in alone.stderr
    distributed = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration",
                              "1s", "--web-port", "0", "--processes", "2", out=tmp_path)
    assert distributed.returncode == 2 and "single-process runs" in distributed.stderr


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_the_page_shows_the_gauges_changes_the_rate_and_stops_in_chromium(calibration_server, host_noise,
                                                                         tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    browser, chromedriver = _chromium()
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
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
