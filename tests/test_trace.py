"""Integration: a trace replayed against the LLM engine simulator, whose log has the arrival and sizes of
every request it served (GET /sim/log, on the same monotonic clock as loadgen's run start).

Each row of the trace has its own prompt length (all different, so a logged request names its row) and
its own output length: the server must see each row exactly once, with that row's sizes, arriving when
the trace says (its instant from the run start), bursts included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.processes import Server, run_loadgen, start_server, stop_process
from tests.support.timing import HostNoise

pytestmark = pytest.mark.integration

MODEL = "sim-llm"


@pytest.fixture
def llm_sim() -> Iterator[Server]:
    """A fast engine: up to 128 sequences, 2 ms a step, so a burst is served at once and never queues."""
    server = start_server(["--max-batch", "128", "--decode-ms", "2", "--prefill-ms-per-token", "0",
                           "--kv-tokens", "1000000", "--model", MODEL], module="servers.llm_sim")
    yield server
    stop_process(server.proc)


def _write_trace(path: Path, span_s: float, background: int, bursts: list[float], burst_size: int,
                 seed: int) -> list[dict]:
    """Background rows spread over the span and bursts of `burst_size` rows within 50 ms; every row a
    different prompt length (its name in the server's log) and 1 to 4 output tokens."""
    rng = np.random.default_rng(seed)
    times = list(rng.uniform(0, span_s, background))
    for at in bursts:
        times += list(at + rng.uniform(0, 0.05, burst_size))
    times = sorted(float(t) for t in times)
    prompts = rng.permutation(len(times)) + 3
    rows = [{"timestamp": round(t, 6), "input_tokens": int(p), "output_tokens": int(rng.integers(1, 5))}
            for t, p in zip(times, prompts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _logged_after(server: Server, start_s: float) -> list[dict]:
    log = httpx.get(server.url + "/sim/log", timeout=10).json()
    return [entry for entry in log["requests"] if entry["arrival"] >= start_s]


def test_a_bursty_trace_is_replayed_row_by_row_on_time(llm_sim: Server, host_noise: HostNoise,
                                                       tmp_path: Path) -> None:
    """5 s, 200 background rows and four bursts of 30 rows in 50 ms: every row arrives exactly once, with
    its prompt and output lengths, within 2 ms of its instant at the 99th percentile (of 320 rows; the
    bursts, 600 rows/s for 50 ms, are what can be late, and they are over 1 s apart: 40 background rows/s
    are no load)."""
    rows = _write_trace(tmp_path / "trace.jsonl", 5.0, 200, [0.75, 2.1, 3.5, 4.55], 30, seed=11)
    run = run_loadgen("--protocol", "openai", "--target", llm_sim.url, "--model", MODEL,
                      "--trace", str(tmp_path / "trace.jsonl"), "-q", out=tmp_path / "run", timeout=90)
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["requests"] == summary["ok"] == len(rows), summary
    assert summary["dropped"] == summary["unsent"] == 0 and summary["errors"] == {}
    assert summary["trace"]["rows"] == len(rows) and summary["trace"]["sizes_sent"] is True

    start = summary["clock"]["start_monotonic_s"]
    logged = _logged_after(llm_sim, start)
    by_prompt = {row["input_tokens"]: row for row in rows}
    assert sorted(entry["prompt_tokens"] for entry in logged) == sorted(by_prompt)  # each row once
    assert all(entry["output_tokens"] == by_prompt[entry["prompt_tokens"]]["output_tokens"] for entry in logged)
    first = rows[0]["timestamp"]  # the instants count from the trace's first row
    late_ms = np.array([(entry["arrival"] - start - (by_prompt[entry["prompt_tokens"]]["timestamp"] - first)) * 1000
                        for entry in logged])
    assert late_ms.min() > 0  # sent at the instant, never before; received after
    host_noise.assert_below(float(np.percentile(late_ms, 99)), 2.0, what="arrival lateness p99 (ms)",
                            quantile="p99.9")


def test_two_workers_replay_a_looped_trace_each_row_once_a_pass(llm_sim: Server, tmp_path: Path) -> None:
    """--processes 2 --trace-loop: the workers split every pass between them; the server sees each row
    once per pass, and the passes one period (span + one mean gap) apart."""
    rows = _write_trace(tmp_path / "short.jsonl", 1.0, 40, [0.5], 10, seed=3)
    span = rows[-1]["timestamp"] - rows[0]["timestamp"]
    period = span * len(rows) / (len(rows) - 1)
    duration = 2 * period - (period - span) / 2  # two whole passes: past the second's last row, before a third
    run = run_loadgen("--protocol", "openai", "--target", llm_sim.url, "--model", MODEL, "--trace",
                      str(tmp_path / "short.jsonl"), "--trace-loop", "--duration", f"{duration:.6f}s",
                      "--processes", "2", "-q", out=tmp_path / "run", timeout=120)
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["requests"] == summary["ok"] == 2 * len(rows), summary
    logged = _logged_after(llm_sim, summary["clock"]["start_monotonic_s"])
    counts: dict[int, int] = {}
    for entry in logged:
        counts[entry["prompt_tokens"]] = counts.get(entry["prompt_tokens"], 0) + 1
    assert counts == {row["input_tokens"]: 2 for row in rows}


def test_a_row_longer_than_the_models_context_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """The server lists max_model_len (vLLM's key) in GET /v1/models: a trace row of more prompt + output
    tokens is named by file and line, exit 2, and the server served nothing."""
    server = start_server(["--kv-tokens", "500", "--decode-ms", "1", "--model", MODEL], module="servers.llm_sim")
    try:
        path = tmp_path / "long.csv"
        path.write_text("timestamp,input_tokens,output_tokens\n0,100,10\n0.1,480,30\n0.2,20,5\n")
        run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, "--trace", str(path),
                          "-q", out=tmp_path / "run", timeout=60)
        assert run.returncode == 2, run.stderr
        assert f"{path}:3: 510 tokens (prompt + output) is over the model's context of 500 tokens" in run.stderr
        assert _logged_after(server, 0.0) == []
    finally:
        stop_process(server.proc)


def test_mooncake_rows_that_share_blocks_share_their_prompt_prefix(tmp_path: Path) -> None:
    """A Mooncake trace's hash_ids name 512-token prefix blocks: rows that share leading ids are sent
    prompts that share those blocks word for word (a prefix cache sees the trace's reuse), each prompt as
    long as the row's input_length, and each request asks for the row's output_length."""
    rows = [{"timestamp": 0, "input_length": 1100, "output_length": 3, "hash_ids": [7, 8, 9]},
            {"timestamp": 20, "input_length": 1500, "output_length": 2, "hash_ids": [7, 8, 10]},
            {"timestamp": 40, "input_length": 600, "output_length": 4, "hash_ids": [11, 12]}]
    path = tmp_path / "mooncake.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    server = start_server(["--record-requests", "10", "--model", MODEL], module="servers.openai_mock")
    try:
        run = run_loadgen("--protocol", "openai", "--endpoint", "completions", "--target", server.url,
                          "--model", MODEL, "--trace", str(path), "-q", out=tmp_path / "run", timeout=60)
        assert run.returncode == 0, run.stderr
        bodies = httpx.get(server.url + "/mock/requests", timeout=5).json()["requests"]
    finally:
        stop_process(server.proc)
    sent = [entry["body"] for entry in bodies][-3:]  # after the warm-ups (ms: the rows are 20 ms apart)
    words = [body["prompt"].split() for body in sent]
    assert [len(w) for w in words] == [1100, 1500, 600]
    assert [body["max_tokens"] for body in sent] == [3, 2, 4]
    assert words[0][:1024] == words[1][:1024]  # blocks 7 and 8
    assert words[0][1024:1100] != words[1][1024:1100]  # block 9 against block 10
    assert words[2][:512] != words[0][:512]
