"""Trace replay without a server: every format read to the same rows, bad rows named by file and line,
the schedule of a trace (speed-up, loop, shares that send each row exactly once), and gamma arrivals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loadgen.errors import ScenarioError
from loadgen.patterns.schedule import arrivals, profile_of, schedule_offsets
from loadgen.patterns.trace import TraceError, read_trace
from loadgen.scenario import validate_scenario
from tests.support.processes import ROOT, loadgen_cmd

TIMES = [0.0, 0.25, 0.25, 1.0, 2.5]
INPUTS = [100, 7, 300, 12, 64]
OUTPUTS = [16, 1, 8, 200, 3]


def _open_loop(trace: Path, **keys) -> dict:
    return validate_scenario({"target": {"url": "http://127.0.0.1:1", "model": "m"},
                              "open_loop": {"trace": str(trace), **keys}}).open_loop


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def traces(tmp_path: Path) -> dict[str, Path]:
    """The same five rows in each format."""
    rows = list(zip(TIMES, INPUTS, OUTPUTS))
    return {
        "jsonl": _write(tmp_path / "t.jsonl", [json.dumps({"timestamp": t, "input_tokens": i, "output_tokens": o})
                                               for t, i, o in rows]),
        "csv": _write(tmp_path / "t.csv", ["timestamp,input_tokens,output_tokens",
                                           *(f"{t},{i},{o}" for t, i, o in rows)]),
        "mooncake": _write(tmp_path / "m.jsonl", [json.dumps({"timestamp": int(t * 1000), "input_length": i,
                                                              "output_length": o, "hash_ids": [k, k + 1]})
                                                  for k, (t, i, o) in enumerate(rows)]),
        "azure": _write(tmp_path / "azure.csv", ["TIMESTAMP,ContextTokens,GeneratedTokens",
                                                 *(f"2023-11-16 18:15:{46 + t:010.7f},{i},{o}" for t, i, o in rows)]),
        "burstgpt": _write(tmp_path / "b.csv", ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type",
                                                *(f"{5 + t},ChatGPT,{i},{o},{i + o},Conversation log"
                                                  for t, i, o in rows)]),
    }


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "mooncake", "azure", "burstgpt"])
def test_every_format_reads_to_the_same_rows(traces: dict[str, Path], fmt: str) -> None:
    trace = read_trace(traces[fmt])
    assert trace.format == fmt  # told apart by its first row
    np.testing.assert_allclose(trace.times_s, TIMES, atol=1e-6)
    assert trace.input_tokens.tolist() == INPUTS and trace.output_tokens.tolist() == OUTPUTS
    assert trace.sorted_rows == 0
    assert read_trace(traces[fmt], fmt).describe() == trace.describe()
    if fmt == "mooncake":
        assert trace.hash_ids[1] == (1, 2)
    if fmt == "burstgpt":
        assert set(trace.models) == {"ChatGPT"}


def test_milliseconds_and_rows_without_sizes(tmp_path: Path) -> None:
    trace = read_trace(_write(tmp_path / "ms.csv", ["timestamp", "1000", "1500", "4000"]), time_unit="ms")
    np.testing.assert_allclose(trace.times_s, [0.0, 0.5, 3.0])
    assert not trace.sized and trace.input_tokens.tolist() == [-1, -1, -1]
    trace = read_trace(_write(tmp_path / "ms.jsonl", ['{"timestamp_ms": 20}', '{"timestamp_ms": 70}']))
    np.testing.assert_allclose(trace.times_s, [0.0, 0.05])


def test_rows_out_of_order_are_sorted_and_counted_or_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "back.jsonl", [json.dumps({"timestamp": t, "input_tokens": n})
                                            for t, n in ((0.0, 1), (2.0, 2), (1.0, 3), (3.0, 4))])
    trace = read_trace(path)
    assert trace.times_s.tolist() == [0.0, 1.0, 2.0, 3.0] and trace.input_tokens.tolist() == [1, 3, 2, 4]
    assert trace.sorted_rows == 2
    with pytest.raises(TraceError, match=r"back.jsonl:3: timestamp 1 s is before the previous row's 2 s"):
        read_trace(path, strict=True)


@pytest.mark.parametrize(("lines", "problem"), [
    (['{"timestamp": 0}', '{"input_tokens": 5}'], r"bad.jsonl:2: no timestamp"),
    (['{"timestamp": 0}', 'not json'], r"bad.jsonl:2: not JSON"),
    (['{"timestamp": "soon"}'], r"bad.jsonl:1: timestamp 'soon' is not a number"),
    (['{"timestamp": 1, "output_tokens": -4}'], r"bad.jsonl:1: output_tokens -4 is not a whole number >= 0"),
    (['{"timestamp": 1, "input_tokens": 2.5}'], r"bad.jsonl:1: input_tokens 2.5 is not a whole number"),
    (['{"timestamp": 1, "output_tokens": 44333333333333333333333}'],
     r"bad.jsonl:1: output_tokens 44333333333333333333333 is over 2,147,483,647"),
    ([""], r"bad.jsonl: the trace has no rows"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path: Path, lines: list[str], problem: str) -> None:
    with pytest.raises(TraceError, match=problem):
        read_trace(_write(tmp_path / "bad.jsonl", lines))


def test_a_token_count_beyond_any_context_is_named_in_every_format(tmp_path: Path) -> None:
    # found by bench/fuzz_atheris.py: an Azure row's GeneratedTokens of 24 digits overflowed int64
    azure = _write(tmp_path / "azure.csv", ["TIMESTAMP,ContextTokens,GeneratedTokens",
                                            "2023-11-16 18:15:46.6805900,374,443333333333333333333333",
                                            "2023-11-16 18:15:50.9951690,396,109"])
    with pytest.raises(TraceError, match=r"azure.csv:2: GeneratedTokens '443333333333333333333333' is over"):
        read_trace(azure, "azure")
    burst = _write(tmp_path / "burst.csv", ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type",
                                            "5,ChatGPT,99999999999999999999,18,490,Conversation log"])
    with pytest.raises(TraceError, match=r"burst.csv:2: Request tokens '99999999999999999999' is over"):
        read_trace(burst, "burstgpt")


def test_a_scenario_with_a_bad_trace_names_the_key_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", ["timestamp,input_tokens", "0,3", ",4"])
    with pytest.raises(ScenarioError) as caught:
        _open_loop(path)
    assert caught.value.problems == [f"open_loop: {path}:3: no timestamp"]
    with pytest.raises(ScenarioError, match="trace_loop repeats the trace until duration"):
        _open_loop(_write(tmp_path / "ok.csv", ["timestamp", "0", "1"]), trace_loop=True)
    with pytest.raises(ScenarioError, match="no rate, stages or arrival with it"):
        _open_loop(tmp_path / "ok.csv", rate=5)


def test_the_command_line_refuses_a_bad_trace_with_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", ['{"timestamp": 0}', '{"timestamp": 1}', '{"model": "x"}'])
    done = subprocess.run(loadgen_cmd("run", "--target", "http://127.0.0.1:9", "--model", "m", "--trace", str(path),
                                      "--out", str(tmp_path / "out")),
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert f"{path}:3: no timestamp" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing was sent, nothing written


def test_the_schedule_is_the_trace_divided_by_the_speedup(traces: dict[str, Path]) -> None:
    pattern = _open_loop(traces["jsonl"], trace_speedup=2)
    np.testing.assert_allclose(schedule_offsets(pattern), np.array(TIMES) / 2)
    assert pattern.total_duration == pytest.approx(1.25 + 0.001)
    profile = profile_of(pattern)
    assert profile.count_by(pattern.total_duration) == 5 and profile.count_by(0.125) == 1
    assert profile.count_by(0.126) == 3  # the two rows at 0.25 s of the trace


def test_a_looped_trace_repeats_one_period_later_until_the_duration(traces: dict[str, Path]) -> None:
    pattern = _open_loop(traces["jsonl"], trace_loop=True, duration=7.0)
    period = 2.5 * 5 / 4  # the span plus one mean gap
    offsets = schedule_offsets(pattern)
    expected = np.concatenate([np.array(TIMES) + k * period for k in range(3)])
    np.testing.assert_allclose(offsets, expected[expected < 7.0])
    rows = np.concatenate([chunk_rows for _, chunk_rows in arrivals(pattern)])
    assert rows.tolist() == [k % 5 for k in range(len(offsets))]
    assert profile_of(pattern).count_by(7.0) == len(offsets)


def test_shares_send_every_row_exactly_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    times = np.sort(rng.uniform(0, 20, 3000))
    path = _write(tmp_path / "big.jsonl", [json.dumps({"timestamp": float(t), "input_tokens": k})
                                           for k, t in enumerate(times)])
    pattern = _open_loop(path)
    sent_rows, sent_offsets = [], []
    for k in range(3):
        for offsets, rows in arrivals(pattern, share=(k, 3)):
            sent_rows.append(rows)
            sent_offsets.append(offsets)
    rows = np.concatenate(sent_rows)
    assert sorted(rows.tolist()) == list(range(3000))
    order = np.argsort(rows)
    np.testing.assert_allclose(np.concatenate(sent_offsets)[order], times - times[0])


def test_gamma_arrivals_keep_the_rate_and_set_the_burstiness() -> None:
    def gaps(burstiness: float) -> np.ndarray:
        pattern = validate_scenario({"target": {"url": "http://127.0.0.1:1", "model": "m"},
                                     "open_loop": {"arrival": "gamma", "burstiness": burstiness, "rate": 1000,
                                                   "duration": 50, "seed": 4}}).open_loop
        return np.diff(schedule_offsets(pattern))

    for burstiness in (0.25, 1.0, 4.0):
        found = gaps(burstiness)
        assert found.mean() == pytest.approx(1e-3, rel=0.03)
        # coefficient of variation of Gamma(k, 1/k) gaps: 1/sqrt(k)
        assert found.std() / found.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    with pytest.raises(ScenarioError, match="burstiness is for arrival"):
        validate_scenario({"target": {"url": "http://127.0.0.1:1", "model": "m"},
                           "open_loop": {"burstiness": 2, "rate": 10, "duration": 1}})
