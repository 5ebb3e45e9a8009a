"""The LLM engine simulator (servers/llm_sim): its engine's rules without a clock, then the server against
what loadgen measures of it.

The engine's instants follow from its parameters (the formulas in servers/llm_sim/__init__.py), so the
unit tests compute them by hand; the server logs the instants it kept (GET /sim/log), so what loadgen
measures of the same requests is checked against them, and a sweep's saturation against the formula.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from servers.llm_sim import Engine, EngineConfig, Sequence, SimConfig, saturation_rps, simulate
from tests.support.processes import ROOT, Server, run_loadgen, start_server, stop_process
from tests.support.timing import HostNoise

MODEL = "sim-llm"
SMALL = EngineConfig(max_batch=4, prefill_ms_per_token=0.1, decode_ms=10.0, decode_ms_per_seq=0.5, kv_tokens=1000)


def step_ms(config: EngineConfig, sequences: int, prefill: int) -> float:
    return config.decode_ms + config.decode_ms_per_seq * sequences + config.prefill_ms_per_token * prefill


# -- the engine, clock-free ----------------------------------------------------------------------------


def test_a_lone_request_gets_one_prefill_step_then_one_decode_step_a_token() -> None:
    [seq] = simulate(SMALL, [(1.0, 20, 5)])
    assert seq.admitted == 1.0
    assert (seq.first_token - 1.0) * 1000 == pytest.approx(step_ms(SMALL, 1, 20))  # 12.5 ms
    assert (seq.last_token - seq.first_token) * 1000 == pytest.approx(4 * step_ms(SMALL, 1, 0))  # 4 x 10.5 ms
    assert seq.emitted == 5 and seq.done


def test_arrivals_during_a_step_join_at_the_next_one_and_slow_it() -> None:
    """B arrives during A's prefill step: admitted at its end, it shares every later step with A."""
    a, b = simulate(SMALL, [(0.0, 10, 3), (0.005, 30, 2)])
    step1 = step_ms(SMALL, 1, 10) / 1000  # A alone, prefilling 10 tokens
    step2 = step_ms(SMALL, 2, 30) / 1000  # A decodes, B prefills 30
    step3 = step_ms(SMALL, 2, 0) / 1000
    assert b.admitted == pytest.approx(step1)
    assert a.first_token == pytest.approx(step1)
    assert b.first_token == pytest.approx(step1 + step2)  # TTFT = wait for A's step + its own
    assert a.last_token == pytest.approx(step1 + step2 + step3)
    assert b.last_token == pytest.approx(step1 + step2 + step3)


def test_the_batch_cap_keeps_the_rest_waiting_in_order() -> None:
    config = EngineConfig(max_batch=2, prefill_ms_per_token=0.0, decode_ms=10.0, decode_ms_per_seq=0.0)
    # the first starts a step alone; the others arrive during it
    seqs = simulate(config, [(0.0, 1, 3), (0.001, 1, 3), (0.002, 1, 3), (0.003, 1, 3)])
    assert [s.admitted for s in seqs] == pytest.approx([0.0, 0.010, 0.030, 0.040])
    # the third waits for the first to finish (3 tokens: steps ending at 10, 20, 30 ms)
    assert seqs[0].last_token == pytest.approx(0.030) and seqs[1].last_token == pytest.approx(0.040)
    engine = Engine(config)
    for seq in [Sequence(i, i * 0.001, 1, 3) for i in range(4)]:
        engine.arrive(seq)
    assert len(engine.running) == 1 and len(engine.waiting) == 3
    engine.end_step()
    assert len(engine.running) == 2 and len(engine.waiting) == 2  # the cap, not the queue, holds them


def test_the_kv_budget_queues_until_a_sequence_frees_it_and_blocks_those_behind() -> None:
    """kv 100: A (60) runs; B (50) does not fit beside it; C (10) would, but waits behind B (FIFO)."""
    config = EngineConfig(max_batch=8, prefill_ms_per_token=0.0, decode_ms=10.0, decode_ms_per_seq=0.0,
                          kv_tokens=100)
    a, b, c = simulate(config, [(0.0, 40, 20), (0.001, 40, 10), (0.002, 5, 5)])
    assert b.admitted == pytest.approx(a.last_token) == pytest.approx(0.200)
    assert c.admitted == pytest.approx(b.admitted)  # both fit once A's 60 are free: 50 + 10
    engine = Engine(config)
    assert not engine.fits(60, 41)
    with pytest.raises(ValueError, match="exceed the budget"):
        engine.arrive(Sequence(0, 0.0, 60, 41))


def test_an_arrival_at_a_step_end_is_admitted_there_and_an_idle_engine_starts_at_the_arrival() -> None:
    config = EngineConfig(max_batch=4, prefill_ms_per_token=0.0, decode_ms=10.0, decode_ms_per_seq=0.0)
    _, b, c = simulate(config, [(0.0, 1, 2), (0.010, 1, 1), (0.5, 1, 1)])
    assert b.admitted == pytest.approx(0.010) and b.first_token == pytest.approx(0.020)
    assert c.admitted == 0.5 and c.first_token == pytest.approx(0.510)  # idle from 20 ms until it came
    engine = Engine(config)
    engine.arrive(Sequence(0, 1.0, 1, 1))
    with pytest.raises(ValueError, match="time order"):
        engine.arrive(Sequence(1, 0.5, 1, 1))


def test_a_step_end_called_late_admits_only_what_had_arrived_by_it() -> None:
    """The server calls end_step when its timer fires, possibly after a later arrival was read: that
    arrival still waits for the step after, and the instants equal simulate()'s."""
    config = EngineConfig(max_batch=4, prefill_ms_per_token=0.0, decode_ms=10.0, decode_ms_per_seq=0.0)
    engine = Engine(config)
    first, late = Sequence(0, 0.0, 1, 1), Sequence(1, 0.0105, 1, 1)
    engine.arrive(first)
    engine.arrive(late)  # read at 10.5 ms, before the call for the step ending at 10 ms
    engine.end_step()  # first finishes at 10 ms; the engine idles until the late arrival
    assert late.admitted == 0.0105 and engine.step_end == pytest.approx(0.0205)
    expected = simulate(config, [(0.0, 1, 1), (0.0105, 1, 1)])
    engine.end_step()
    assert [(s.admitted, s.last_token) for s in (first, late)] == [(e.admitted, e.last_token) for e in expected]


@pytest.mark.parametrize(("config", "prompt", "output", "batch"), [
    (EngineConfig(max_batch=4, prefill_ms_per_token=0.1, decode_ms=10.0, decode_ms_per_seq=0.5), 20, 8, 4),
    (EngineConfig(max_batch=32, prefill_ms_per_token=0.1, decode_ms=12.0, decode_ms_per_seq=0.2,
                  kv_tokens=7 * 300 + 299), 200, 100, 7),  # KV-bound: 7 sequences of 300 fit
], ids=["batch-bound", "kv-bound"])
def test_saturation_formula_matches_the_simulated_engine(config: EngineConfig, prompt: int, output: int,
                                                         batch: int) -> None:
    """Poisson arrivals at twice the capacity: the queue never empties, and the engine's completions per
    second (first to last completion of 2,000 requests) are the formula's within 1 %."""
    truth = saturation_rps(config, prompt, output)
    gaps = np.random.default_rng(3).exponential(1 / (2 * truth), 2000)
    seqs = simulate(config, [(float(t), prompt, output) for t in np.cumsum(gaps)])
    done = sorted(seq.last_token for seq in seqs)
    measured = (len(done) - 1) / (done[-1] - done[0])
    assert measured == pytest.approx(truth, rel=0.01)
    engine = Engine(config)  # the batch the formula assumes is the one that forms
    for seq in seqs[:50]:
        engine.arrive(Sequence(seq.id, 0.0, prompt, output))
    engine.end_step()  # the first arrival started a step alone; the rest join at its end
    assert len(engine.running) == batch


def test_bad_configs_are_named() -> None:
    problems = SimConfig(EngineConfig(max_batch=0, decode_ms=-1.0, kv_tokens=10), max_tokens=11).problems()
    assert any(p.startswith("max_batch must be >= 1") for p in problems), problems
    assert any(p.startswith("decode_ms must be a finite number") for p in problems), problems
    assert any(p.startswith("max_tokens (11) must not exceed kv_tokens (10)") for p in problems), problems
    with pytest.raises(ValueError, match="max_batch"):
        Engine(EngineConfig(max_batch=0))


def test_bad_flags_exit_2_naming_each() -> None:
    done = subprocess.run([sys.executable, "-m", "servers.llm_sim", "--port", "0", "--max-batch", "0",
                           "--decode-ms-per-seq", "nan"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 2
    assert "--max-batch must be >= 1" in done.stderr and "--decode-ms-per-seq must be" in done.stderr


# -- the server ---------------------------------------------------------------------------------------


@pytest.fixture
def llm_sim() -> Iterator:
    """Factory: llm_sim("--max-batch", "4", ...) -> Server (pinned to the server core), stopped after."""
    started: list[Server] = []

    def factory(*args: str) -> Server:
        server = start_server(list(args), module="servers.llm_sim")
        started.append(server)
        return server

    yield factory
    for server in started:
        stop_process(server.proc)


def sim_log(server: Server) -> dict:
    return httpx.get(server.url + "/sim/log", timeout=10).json()


@pytest.mark.integration
def test_bad_requests_get_openai_errors_and_the_log_and_metrics_answer(llm_sim) -> None:
    server = llm_sim("--kv-tokens", "100", "--decode-ms", "1", "--model", MODEL)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        too_big = client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c d", "max_tokens": 97})
        assert too_big.status_code == 400
        assert too_big.json()["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 100 tokens" in too_big.json()["error"]["message"]
        broken = client.post("/v1/chat/completions", content=b'{"model": "sim-llm", "messages": [')
        assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c d", "max_tokens": 96})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 96  # same connection
        metrics = client.get("/metrics").text
        assert 'vllm:num_requests_running{model_name="sim-llm"} 0' in metrics
        assert 'vllm:gpu_cache_usage_perc{model_name="sim-llm"} 0.0' in metrics
        log = client.get("/sim/log", params={"clear": "1"}).json()
        [entry] = log["requests"]
        assert (entry["prompt_tokens"], entry["output_tokens"]) == (4, 96)
        assert log["params"]["kv_tokens"] == 100 and log["clock"] == "CLOCK_MONOTONIC"
        assert client.get("/sim/log").json()["requests"] == []
        assert client.put("/sim/log").status_code == 405


@pytest.mark.integration
def test_loadgen_measures_the_ttft_and_itl_the_server_logged(llm_sim, host_noise: HostNoise, tmp_path) -> None:
    """Poisson arrivals at 20 req/s on an engine of 4 sequences (capacity 38 req/s): requests queue and
    share steps, so TTFT and ITL vary; loadgen's means over the measured requests are the logged ones'
    within 2 ms (the loopback and the parse are well under that)."""
    server = llm_sim("--max-batch", "4", "--decode-ms", "10", "--decode-ms-per-seq", "0.5",
                     "--prefill-ms-per-token", "0.1", "--model", MODEL)
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, "--rate", "20",
                      "--arrival", "poisson", "--duration", "2s", "--max-tokens", "8", "--input-tokens", "20",
                      "--seed", "5", "-q", out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["errors"] == {} and summary["ok"] == summary["requests"] > 25
    log = sim_log(server)
    start = summary["clock"]["start_monotonic_s"]
    measured = [r for r in log["requests"] if r["arrival"] >= start]
    assert len(log["requests"]) == summary["requests"] + summary["warmup_requests"]
    assert len(measured) == summary["requests"]
    assert all(r["output_tokens"] == 8 and r["prompt_tokens"] == 20 for r in measured)
    ttft_ms = [(r["first_token"] - r["arrival"]) * 1000 for r in measured]
    itl_ms = statistics.fmean((r["last_token"] - r["first_token"]) / 7 * 1000 for r in measured)
    assert max(ttft_ms) > min(ttft_ms) + 1.0  # queueing and shared steps: not one fixed figure
    host_noise.assert_near(summary["ttft_service_ms"]["mean"], statistics.fmean(ttft_ms), 2.0,
                           what="ttft mean (ms)", quantile="p95", cap_ms=0.5)
    host_noise.assert_near(summary["itl_ms"]["mean"], itl_ms, 2.0, what="itl mean (ms)", quantile="p95",
                           cap_ms=0.5)
    host_noise.assert_near(summary["tpot_ms"]["mean"], itl_ms, 2.0, what="tpot mean (ms)", quantile="p95",
                           cap_ms=0.5)


@pytest.mark.integration
def test_sweep_finds_the_saturation_the_formula_gives(llm_sim, host_noise: HostNoise, tmp_path) -> None:
    """4 sequences, steps of 10 + 0.5 a sequence + 0.1 a prompt token ms, 20-word prompts, 8 tokens:
    4 / (8 x 13 ms) = 38.5 req/s. A step under it keeps up; one at 50 req/s saturates the engine.
    Each batch slot completes every 104 ms, so a 2 s window counts up to one completion a slot more or
    less than the mean: up to 4 of 77 (5 %), about 1 in a typical run."""
    config = EngineConfig(max_batch=4, prefill_ms_per_token=0.1, decode_ms=10.0, decode_ms_per_seq=0.5)
    truth = saturation_rps(config, 20, 8)
    server = llm_sim("--max-batch", "4", "--decode-ms", "10", "--decode-ms-per-seq", "0.5",
                     "--prefill-ms-per-token", "0.1", "--model", MODEL)
    out = tmp_path / "sweep"
    run = run_loadgen("--protocol", "openai", "--target", server.url, "--model", MODEL, "--max-tokens", "8",
                      "--input-tokens", "20", "--rates", "25,50", "--step-duration", "2s", "--warmup", "1s",
                      out=out, verb="sweep", timeout=90)
    assert run.returncode == 0, run.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    # generator-bound: its schedule lag p99 over 1 ms, which the host's own p99 lateness can cause
    host_noise.assert_holds(not sweep["generator_bound_steps"], what=run.stdout, margin_ms=1.0, quantile="p99.9")
    assert sweep["saturated"] is True, run.stdout
    host_noise.assert_holds(sweep["saturation_rps"] == pytest.approx(truth, rel=0.05),
                            what=f"saturation {sweep['saturation_rps']} req/s, formula {truth:.2f}\n{run.stdout}",
                            margin_ms=100.0)
