"""The live console (`loadgen run --web-port`): Locust's web UI with loadgen's page, live figures and controls.

Checked against the calibration server (a latency it keeps to the microsecond) and against the run's own
/metrics: the console's figures are the gauges' numbers for the same closed intervals, its achieved rate
is the offered one, a rate change is followed and every arrival of the re-planned schedule is counted
once; and in headless Chromium (Debian's chromium and chromium-driver, driven with selenium): the page
shows the achieved rate and the p99 the gauge gives, changes the rate and stops the run.
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
from tests.support.processes import ROOT, loadgen_cmd, pin, run_loadgen, stop_process

pytestmark = pytest.mark.integration

DELAY_MS = 5.0
"""The calibration server's latency: every request is answered this long after it arrived."""
RUN_S = 7.0
"""The rate-change run's length: the change comes 2-4 s in on a busy host, and the first whole interval
after it must still be inside the run when it is read."""


class ConsoleRun:
    """`loadgen run --web-port 0 --metrics-port 0` in a child process, with its console and /metrics URLs."""

    def __init__(self, target: str, out: Path, *args: str) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            loadgen_cmd("run", "--target", target, "--model", "m", "--web-port", "0", "--metrics-port", "0",
                        "--quiet", "--out", str(out), *args),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        pin(self.proc.pid, 0)
        self.console = self.metrics = ""
        said = []
        deadline = time.monotonic() + 30
        while not (self.console and self.metrics) and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            said.append(line)
            if line.startswith("console on "):
                self.console = line.split()[-1]
            elif line.startswith("metrics on "):
                self.metrics = line.split()[-1]
            elif not line and self.proc.poll() is not None:
                break
        if not (self.console and self.metrics):
            stop_process(self.proc)
            raise AssertionError(f"no console or metrics line: {''.join(said)}{self.proc.stderr.read()}")

    def live(self) -> dict[str, Any]:
        return httpx.get(self.console + "/live", timeout=2).json()

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
            _, stderr = self.proc.communicate(timeout=timeout)
        finally:
            stop_process(self.proc)
        return self.proc.returncode, stderr, json.loads((self.out / "summary.json").read_text())


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
    server = calibration_server("--delay-ms", f"{DELAY_MS:g}")
    run = ConsoleRun(server.url, tmp_path, "--rate", "200", "--duration", f"{RUN_S:g}s")
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
        code, stderr, summary = run.finish()
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


def test_web_flags_are_checked(tmp_path) -> None:
    bad_port = run_loadgen("--target", "http://127.0.0.1:9", "--model", "m", "--rate", "10", "--duration", "1s",
                           "--web-port", "70000", out=tmp_path)
    assert bad_port.returncode == 2 and "--web-port: expected a port from 0 to 65535" in bad_port.stderr
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
    run = ConsoleRun(server.url, tmp_path, "--rate", "200", "--duration", "8s")
    try:
        driver.get(run.console)

        def shown() -> dict[str, str]:
            return driver.execute_script(
                "return {intervals: document.getElementById('intervals').textContent,"
                " p99: document.getElementById('latency-10s-p99').textContent,"
                " achieved: document.getElementById('achieved-rps').textContent,"
                " state: document.getElementById('state').textContent,"
                " banner: getComputedStyle(document.getElementById('banner')).display}")

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
        code, stderr, summary = run.finish()
    finally:
        driver.quit()
        stop_process(run.proc)
    assert code == 130, stderr  # stopped from the page: interrupted, as by Ctrl-C
    assert summary["interrupted"] is True and summary["duration_s"] < 8.0
    assert [change["rate"] for change in summary["rate_changes"]] == [400.0]
