"""Mixes end to end: `loadgen run --mix` against real servers on 127.0.0.1 (integration).

The OpenAI mock serves two models and keeps the body of every request it accepted, so the requests each
model received are counted on the server's side; the calibration server answers KServe v2 for any model
name, for a two-worker run whose per-model counts must add up to the totals and match the entries the
seeded schedule picks, arrival by arrival.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadgen.patterns.mix import EntryChooser
from loadgen.sinks import read_hlog
from tests.support.processes import (
    ROOT,
    Server,
    finish,
    loadgen_cmd,
    pin,
    run_loadgen,
    start_server,
    stop_process,
)

RATE, DURATION_S = 150, 2


@pytest.fixture
def openai_mock() -> Iterator[Server]:
    server = start_server(["--model", "a", "--model", "b", "--ttft-ms", "2", "--itl-ms", "0", "--max-tokens", "4",
                           "--record-requests", "2000", "--no-keep-awake"], module="servers.openai_mock")
    try:
        yield server
    finally:
        stop_process(server.proc)


def model_samples(url: str) -> dict[tuple[str, str], float]:
    """The model-labelled samples of one /metrics scrape: (name, model) -> value (ok requests, latency p50)."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=2).text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "loadgen_model_requests_total" and labels["outcome"] == "ok":
                found[sample.name, labels["model"]] = sample.value
            if (sample.name == "loadgen_model_latency_percentile_seconds" and labels["quantile"] == "0.5"
                    and labels["window"] == "run"):
                found[sample.name, labels["model"]] = sample.value
            if sample.name == "loadgen_requests_total" and labels["outcome"] == "ok":
                found[sample.name, ""] = sample.value
    return found


def test_a_3_to_1_mix_sends_each_model_its_share(openai_mock: Server, tmp_path) -> None:
    proc = subprocess.Popen(
        loadgen_cmd("run", "--target", openai_mock.url, "--protocol", "openai", "--mix", "a=3,b=1",
                    "--max-tokens", "4", "--rate", str(RATE), "--duration", f"{DURATION_S}s", "--no-keep-awake",
                    "--metrics-port", "0", "--quiet", "--out", str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    pin(proc.pid, 0)
    scrapes = []
    try:
        line = proc.stderr.readline()
        while line and not line.startswith("metrics on "):
            line = proc.stderr.readline()
        assert line, proc.stderr.read()
        while proc.poll() is None:
            try:
                scrapes.append(model_samples(line.split()[-1]))
            except httpx.TransportError:  # the run ended between poll() and the request
                break
            time.sleep(0.3)
        _, stderr = finish(proc, timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_model = summary["by_model"]
    assert list(by_model) == ["a", "b"] and by_model["a"]["weight"] == 3.0

    # the server's counts: each model's requests, less the same warm-up each entry's client sent
    served = Counter(r["body"]["model"] for r in httpx.get(openai_mock.url + "/mock/requests").json()["requests"])
    warmups = {name: served[name] - by_model[name]["requests"] for name in ("a", "b")}
    assert warmups["a"] == warmups["b"] > 0 and sum(warmups.values()) == summary["warmup_requests"]

    # every figure of the entries adds up to the totals; the shares are the weights' (binomial, 4 sd)
    for key in ("requests", "ok", "sent", "completed_in_window", "output_tokens"):
        assert by_model["a"][key] + by_model["b"][key] == summary[key], key
    assert summary["requests"] == RATE * DURATION_S and summary["errors"] == {}
    share = by_model["a"]["requests"] / summary["requests"]
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / summary["requests"])
    achieved = by_model["a"]["achieved_rps"] + by_model["b"]["achieved_rps"]
    assert achieved == pytest.approx(summary["achieved_rps"], abs=0.002)
    for name in ("a", "b"):
        assert 0 < by_model[name]["latency_ms"]["p50"] <= summary["latency_ms"]["max"]
        assert by_model[name]["ttft_ms"]["p50"] >= 2.0  # the mock's declared TTFT

    # the hlog: total latency untagged, each entry's tagged
    tags = read_hlog(tmp_path / "latency.hlog")
    for name in ("a", "b"):
        assert sum(h.get_total_count() for h in tags[f"latency:{name}"]) == by_model[name]["ok"]
    assert sum(h.get_total_count() for h in tags[None]) == summary["ok"]

    # /metrics during the run: the model-labelled families beside the totals, summing to them
    labelled = [s for s in scrapes if ("loadgen_model_requests_total", "b") in s]
    assert labelled, scrapes
    last = labelled[-1]
    assert last["loadgen_model_requests_total", "a"] + last["loadgen_model_requests_total", "b"] == \
        last["loadgen_requests_total", ""]
    assert last["loadgen_model_latency_percentile_seconds", "a"] > 0


def test_two_workers_merge_the_per_model_counts_exactly(calibration_server, tmp_path) -> None:
    server = calibration_server("--delay-ms", "1")
    run = run_loadgen("--target", server.url, "--mix", "a=3,b=1", "--rate", "100", "--duration", "2s",
                      "--seed", "5", "--processes", "2", "--no-keep-awake", "--quiet", out=tmp_path, timeout=90)
    assert run.returncode == 0, run.stderr
    summary = run.summary
    by_model = summary["by_model"]
    assert summary["dropped"] == summary["unsent"] == summary["in_flight_at_end"] == 0
    assert summary["requests"] == 200 and summary["ok"] == 200
    for key in ("requests", "ok", "sent", "completed_in_window"):
        assert sum(entry[key] for entry in by_model.values()) == summary[key], key
    # the entries each arrival drew, computed here from its index and the seed: the workers agreed on them
    picks = EntryChooser([3, 1], seed=5).entries_of(np.arange(200))
    assert [by_model["a"]["requests"], by_model["b"]["requests"]] == [int(np.count_nonzero(picks == i))
                                                                       for i in (0, 1)]


def test_a_closed_loop_draws_each_request_s_entry(calibration_server, tmp_path) -> None:
    server = calibration_server("--delay-ms", "1")
    run = run_loadgen("--target", server.url, "--mix", "a=1,b=1", "--users", "2", "--duration", "1s",
                      "--no-keep-awake", "--quiet", out=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    by_model, total = run.summary["by_model"], run.summary["requests"]
    assert total > 100 and by_model["a"]["requests"] + by_model["b"]["requests"] == total
    assert abs(by_model["a"]["requests"] / total - 0.5) < 4 * np.sqrt(0.25 / total)
