"""The comparison of model variants (`loadgen compare`): one Variant record per model, the Pareto fronts,
the table, compare.json and compare.csv. The runs themselves are loadgen/_comparecmd.py's.

A variant is on a Pareto front when no other variant is at least as good on both of the front's two
figures and better on one: accuracy vs p99 latency, and accuracy vs throughput (saturation when swept,
else achieved).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadgen.files import atomic_writer, write_text_atomic

__all__ = ["CSV_COLUMNS", "Variant", "mark_pareto", "pareto", "render_compare", "write_compare"]

CSV_COLUMNS = ("model", "status", "accuracy", "p50_ms", "p99_ms", "achieved_rps", "saturation_rps", "goodput_rps",
               "goodput_share", "model_bytes", "memory_mb", "energy_j_per_inference", "cost_per_million", "slo_met",
               "generator_bound", "pareto_latency", "pareto_throughput", "error")


@dataclass
class Variant:
    """One variant's row of the comparison (compare.json's `models`)."""

    model: str
    status: str = "ok"
    """ok, or failed (see `error`)."""
    error: str | None = None
    dir: str = ""
    accuracy: float | None = None
    """Top-1 accuracy of the scored answers: against --labels, or agreement with the --reference model's
    argmax (None when nothing was scored)."""
    mean_cosine: float | None = None
    """Against --reference: the answers' mean cosine similarity with the reference's (embeddings)."""
    scored: int = 0
    latency_ms: dict[str, float] | None = None
    achieved_rps: float | None = None
    achieved_inferences_per_s: float | None = None
    saturation_rps: float | None = None
    """With --sweep: the sweep's saturation throughput (req/s)."""
    max_rps_meeting_slo: float | None = None
    """With --sweep and --slo: the highest throughput of a step that met the SLO (req/s)."""
    goodput_rps: float | None = None
    """With --goodput: requests a second that met every goodput term (of the same run or knee step)."""
    goodput_share: float | None = None
    """With --goodput: the share of responses that met every term."""
    model_bytes: int | None = None
    memory_mb: float | None = None
    """What loading the model took on the server (CPU and GPU), from its statistics' memory_usage
    (Triton's statistics extension; the reference server measures it at load), in MiB."""
    memory: dict[str, int] | None = None
    """memory_usage by type (CPU, CPU_PINNED, GPU), in bytes."""
    energy_j_per_inference: float | None = None
    cost_per_million: float | None = None
    """$ per million inferences at the variant's throughput (saturation with --sweep) and --cost-per-hour."""
    slo_met: bool | None = None
    generator_bound: bool = False
    pareto_latency: bool = False
    pareto_throughput: bool = False
    server: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def throughput(self) -> float | None:
        return self.saturation_rps if self.saturation_rps is not None else self.achieved_rps


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which points (both coordinates: higher is better) no other point dominates.

    >>> pareto([(0.98, -10.0), (0.97, -5.0), (0.96, -6.0)])
    [True, True, False]
    """
    marks = []
    for i, (a, b) in enumerate(points):
        dominated = any(c >= a and d >= b and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i)
        marks.append(not dominated)
    return marks


def mark_pareto(variants: list[Variant]) -> None:
    """Set each measured variant's pareto_latency and pareto_throughput."""
    measured = [v for v in variants if v.status == "ok" and v.accuracy is not None]
    if measured and all(v.latency_ms for v in measured):
        for variant, mark in zip(measured, pareto([(v.accuracy, -v.latency_ms["p99"]) for v in measured])):
            variant.pareto_latency = mark
    with_rate = [v for v in measured if v.throughput is not None]
    for variant, mark in zip(with_rate, pareto([(v.accuracy, v.throughput) for v in with_rate])):
        variant.pareto_throughput = mark


def write_compare(out: Path, variants: list[Variant], *, slo: str | None, interrupted: bool, swept: bool,
                  server_metrics: str | None, cost_per_hour: float | None, model_repository: str | None) -> None:
    """DIR/compare.json (`models`: one object per variant) and DIR/compare.csv (a row per variant)."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "models": [_as_json(v) for v in variants],
        "slo": slo,
        "swept": swept,
        "interrupted": interrupted,
        "server_metrics": server_metrics,
        "cost_per_hour": cost_per_hour,
        "model_repository": model_repository,
        "notes": _notes(variants, server_metrics, model_repository),
    }
    write_text_atomic(out / "compare.json", json.dumps(document, indent=2) + "\n")
    with atomic_writer(out / "compare.csv", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for variant in variants:
            row = _as_json(variant)
            latency = row.pop("latency_ms") or {}
            writer.writerow({column: "" if row.get(column) is None else row.get(column) for column in CSV_COLUMNS}
                            | {"p50_ms": latency.get("p50", ""), "p99_ms": latency.get("p99", "")})


def _as_json(variant: Variant) -> dict[str, Any]:
    data = asdict(variant)
    data.pop("server")
    return data


def _notes(variants: list[Variant], server_metrics: str | None, model_repository: str | None) -> list[str]:
    notes = []
    if all(v.accuracy is None for v in variants if v.status == "ok"):
        notes.append("no answer was scored: give --input-data and --labels for accuracy")
    if model_repository is None:
        notes.append("model size on disk not read: give --model-repository (a local copy of the repository)")
    if all(v.memory_mb is None for v in variants if v.status == "ok"):
        notes.append("the server reports no memory_usage in its model statistics: memory per model absent")
    if server_metrics is None:
        notes.append("no server-side energy figures: give --server-metrics")
    elif all(v.energy_j_per_inference is None for v in variants if v.status == "ok"):
        notes.append("the server reports no energy counter (no GPU with NVML): energy per inference absent")
    if any(v.generator_bound for v in variants):
        notes.append("some variant's run was generator-bound: its figures describe the generator")
    return notes


def render_compare(variants: list[Variant]) -> str:
    """The comparison table; `*` marks the variants on the accuracy-vs-p99 Pareto front, `+` those on
    the accuracy-vs-throughput front."""
    header = (f"{'model':<24}{'acc':>8}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}{'sat req/s':>11}"
              f"{'MB disk':>9}{'MiB mem':>9}{'J/inf':>9}{'$/M':>9}  front")
    lines = [header]
    for v in variants:
        if v.status != "ok":
            lines.append(f"{v.model:<24}FAILED: {v.error}")
            continue
        lat = v.latency_ms or {}
        marks = ("*" if v.pareto_latency else " ") + ("+" if v.pareto_throughput else " ")
        lines.append(
            f"{v.model:<24}{_num(v.accuracy, '.4f'):>8}{_num(lat.get('p50'), '.3f'):>10}{_num(lat.get('p99'), '.3f'):>10}"
            f"{_num(v.achieved_rps, '.1f'):>10}{_num(v.saturation_rps, '.1f'):>11}"
            f"{_num(v.model_bytes / 1e6 if v.model_bytes else None, '.3f'):>9}{_num(v.memory_mb, '.2f'):>9}"
            f"{_num(v.energy_j_per_inference, '.4f'):>9}{_num(v.cost_per_million, '.3f'):>9}  {marks}"
            + ("  GENERATOR-BOUND" if v.generator_bound else "") + ("  SLO MISSED" if v.slo_met is False else ""))
    lines.append("front: * accuracy vs p99 latency, + accuracy vs throughput (no other variant is better on both)")
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
