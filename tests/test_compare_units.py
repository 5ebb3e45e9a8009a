"""Units of `loadgen compare` and of scoring answers against labels (no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadgen.compare import Variant, mark_pareto, pareto, render_compare
from loadgen.errors import ProtocolMismatch
from loadgen.protocols.common.request_data import AnswerJudge, RequestData, agree, read_references, score
from loadgen.scenario import ScenarioError, make_target


def test_pareto_front_keeps_what_nothing_beats_on_both() -> None:
    assert pareto([(0.98, -10.0), (0.97, -5.0), (0.96, -6.0), (0.98, -10.0)]) == [True, True, False, True]
    assert pareto([(0.5, 1.0)]) == [True]


def test_variants_are_marked_on_both_fronts_and_failed_ones_are_listed() -> None:
    fp32 = Variant("fp32", accuracy=0.98, latency_ms={"p50": 1.0, "p99": 4.0}, achieved_rps=100.0)
    int8 = Variant("int8", accuracy=0.97, latency_ms={"p50": 0.5, "p99": 2.0}, achieved_rps=100.0)
    slow = Variant("slow", accuracy=0.96, latency_ms={"p50": 2.0, "p99": 8.0}, achieved_rps=100.0)
    broken = Variant("broken", status="failed", error="model 'broken' is not ready")
    mark_pareto([fp32, int8, slow, broken])
    assert (fp32.pareto_latency, int8.pareto_latency, slow.pareto_latency) == (True, True, False)
    assert (fp32.pareto_throughput, int8.pareto_throughput, slow.pareto_throughput) == (True, False, False)
    table = render_compare([fp32, int8, slow, broken])
    assert "broken" in table and "FAILED: model 'broken' is not ready" in table


def test_score_takes_the_argmax_of_each_row() -> None:
    assert score(np.array([0.1, 0.7, 0.2]), 1) == (1, 1)
    assert score(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), 1) == (3, 2)


def test_judge_scores_the_first_output_and_names_a_missing_one() -> None:
    judge = AnswerJudge(labels=[2, 0], output="OUTPUT0")
    logits = np.array([[0.0, 0.1, 0.9]])
    assert judge.judge({"OUTPUT0": ("FP32", [1, 3], logits)}, 0) == (None, 1, 1, 0)
    assert judge.judge({"OUTPUT0": ("FP32", [1, 3], logits)}, 1) == (None, 1, 0, 0)
    problem, scored, _, _ = judge.judge({"OTHER": ("FP32", [1, 3], logits)}, 0)
    assert "OUTPUT0 missing" in problem and scored == 0


def test_labels_must_match_the_entries(tmp_path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"INPUT0": [1.0, 2.0]}, {"INPUT0": [3.0, 4.0]}]}))
    labels = tmp_path / "labels.json"
    labels.write_text("[1, 0, 1]")
    with pytest.raises(ScenarioError, match=r"labels .*labels.json has 3 entries for the 2 entries of input_data"):
        make_target(url="http://127.0.0.1:1", model="m", input_data=str(data), labels=str(labels))
    labels.write_text('["cat", "dog"]')
    with pytest.raises(ScenarioError, match="integer class labels"):
        make_target(url="http://127.0.0.1:1", model="m", input_data=str(data), labels=str(labels))
    with pytest.raises(ScenarioError, match="labels needs input_data"):
        make_target(url="http://127.0.0.1:1", model="m", labels=str(labels))
    labels.write_text("[1, 0]")
    assert make_target(url="http://127.0.0.1:1", model="m", input_data=str(data), labels=str(labels)).labels


def test_a_model_without_outputs_cannot_be_scored(tmp_path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text("[1]")
    data = RequestData(tensors=[[{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [0.0]}]])
    with pytest.raises(ProtocolMismatch, match="no output to score"):
        data.judge({"outputs": []}, str(labels))


def test_agreement_with_reference_outputs_counts_argmax_and_cosine(tmp_path) -> None:
    reference = np.array([0.6, 0.8])
    rows, same, ppm = agree(np.array([[0.6, 0.8], [0.8, 0.6], [-0.6, -0.8]]), reference)
    assert (rows, same) == (3, 1)  # the reference's argmax is 1; the other two rows' is 0
    assert ppm == 1_000_000 + 960_000 - 1_000_000
    judge = AnswerJudge(output="EMBEDDING", references=[reference])
    assert judge.judge({"EMBEDDING": ("FP32", [1, 2], np.array([[0.6, 0.8]]))}, 0) == (None, 1, 1, 1_000_000)
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"model": "m", "data": [[0.6, 0.8], [1.0, 0.0]]}))
    assert [list(row) for row in read_references(str(path))] == [[0.6, 0.8], [1.0, 0.0]]
    path.write_text(json.dumps({"validation_data": [{"OUT": [1, 2]}, {"OUT": {"content": [3, 4]}}]}))
    assert [list(row) for row in read_references(str(path))] == [[1.0, 2.0], [3.0, 4.0]]
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"INPUT0": [1.0]}]}))
    with pytest.raises(ScenarioError, match="give labels or reference_outputs"):
        make_target(url="http://127.0.0.1:1", model="m", input_data=str(data), labels=str(path),
                    reference_outputs=str(path))
