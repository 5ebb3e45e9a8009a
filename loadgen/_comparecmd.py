"""What `loadgen compare` does: the same load against each model variant, one after another, every
answer scored, then one table and DIR/compare.json, DIR/compare.csv.

Place in the flow: for each variant, the scenario with `target.model` set to it -> one run (or, with
--sweep, one sweep: loadgen/_sweepcmd.py) in DIR/<variant>/ -> its figures -> the comparison, with
the Pareto-optimal variants marked (no other variant is at least as accurate and at least as fast,
and better in one): on accuracy vs p99 latency, and on accuracy vs throughput.

Every figure is measured in this command: accuracy from the answers of the run (top-1 against
--labels), latency and throughput from the run's histograms, the server-side figures (energy, GPU
memory, $ per million) from the server's own metrics scraped around each variant's run. A swept
variant shows its saturation throughput beside the latency and throughput of its knee step (the
highest load it kept up with), and its accuracy over every step's answers. A variant
that cannot be run (not ready, an input error, every answer invalid) is reported as failed with the
reason, and the others still run.

Imported only by the compare verb: importing locust monkey-patches the process with gevent.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import locust  # noqa: F401  (gevent monkey-patching must come before the other imports)
import numpy as np

from loadgen._runcmd import write_outputs
from loadgen._sweepcmd import SweepSpec, run_sweep, step_pattern
from loadgen.compare import Variant, mark_pareto, render_compare, write_compare
from loadgen.driver.distributed import DistributedOptions
from loadgen.driver.master import open_cluster
from loadgen.driver.run import execute
from loadgen.errors import LoadgenError, ProtocolMismatch, ScenarioError
from loadgen.protocols import make_client
from loadgen.protocols.base import TargetOptions
from loadgen.protocols.common.kserve import KServeOptions, TensorClient
from loadgen.scenario import Scenario, load_scenario
from loadgen.serverside import ServerMetrics, server_figures, usd_per_million
from loadgen.slo import parse_slo

__all__ = ["CompareSpec", "run_compare"]


@dataclass(frozen=True)
class CompareSpec:
    """The compare verb's own settings."""

    models: tuple[str, ...]
    reference: str | None = None
    """A model whose answers the variants are scored against, entry by entry (no labels needed)."""
    sweep: SweepSpec | None = None
    """Sweep each variant to its saturation instead of one run at the scenario's load."""
    server_metrics: str | None = None
    cost_per_hour: float | None = None
    model_repository: str | None = None
    """A local copy of the server's model repository: each variant's size on disk is read from it."""

    def check(self) -> None:
        problems = []
        if not self.models or any(not model.strip() for model in self.models):
            problems.append("--models: give the variants to compare, e.g. digits_cnn,digits_cnn_int8")
        if len(set(self.models)) != len(self.models):
            problems.append("--models: a variant is named twice")
        if self.server_metrics is not None and not self.server_metrics.startswith(("http://", "https://")):
            problems.append(f"--server-metrics must be an http(s) URL, got {self.server_metrics!r}")
        if self.cost_per_hour is not None and self.cost_per_hour <= 0:
            problems.append("--cost-per-hour must be > 0")
        if self.model_repository is not None and not Path(self.model_repository).is_dir():
            problems.append(f"--model-repository {self.model_repository}: no such folder")
        if problems:
            raise ScenarioError(problems, "compare flags")


def _model_bytes(repository: str | None, model: str) -> int | None:
    folder = Path(repository) / model if repository else None
    if folder is None or not folder.is_dir():
        return None
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _from_summary(variant: Variant, summary: dict[str, Any]) -> None:
    accuracy = summary.get("accuracy")
    if accuracy:
        variant.accuracy, variant.scored = accuracy["top1"], accuracy["scored"]
        variant.mean_cosine = accuracy.get("mean_cosine")
    variant.latency_ms = summary["latency_ms"]
    variant.achieved_rps = summary["achieved_rps"]
    variant.achieved_inferences_per_s = summary.get("achieved_inferences_per_s")
    variant.generator_bound = bool(summary.get("generator_bound"))
    goodput = summary.get("goodput")
    if goodput:
        variant.goodput_rps, variant.goodput_share = goodput.get("goodput_rps"), goodput.get("share")
    variant.slo_met = summary["slo"]["met"] if "slo" in summary else None
    if summary.get("ok", 0) == 0:
        errors = ", ".join(f"{kind} {count}" for kind, count in sorted(summary.get("errors", {}).items()))
        variant.status, variant.error = "failed", f"no successful answer ({errors or 'no answer'})"


def _run_variant(base_overrides: dict[Any, Any], path: Path | None, variant: Variant, out: Path,
                 spec: CompareSpec, cluster: Any) -> None:
    overrides = {**base_overrides, ("target", "model"): variant.model, ("output", "dir"): str(out)}
    scenario = load_scenario(path, overrides)
    variant.memory = _memory_usage(scenario.target)
    objectives = parse_slo(scenario.slo) if scenario.slo else None
    metrics = ServerMetrics(spec.server_metrics, variant.model) if spec.server_metrics else None
    before = metrics.sample() if metrics else None
    result = execute(scenario, cluster)
    server = server_figures(before, metrics.sample(), spec.cost_per_hour) if metrics else None
    summary = write_outputs(result, out, objectives, server=server)
    _from_summary(variant, summary)
    variant.server = server
    if result.interrupted:
        raise KeyboardInterrupt


def _sweep_variant(base_overrides: dict[Any, Any], path: Path | None, variant: Variant, out: Path,
                   spec: CompareSpec, distributed: DistributedOptions | None) -> None:
    assert spec.sweep is not None
    overrides = {**base_overrides, ("target", "model"): variant.model, ("output", "dir"): str(out)}
    variant.memory = _memory_usage(load_scenario(path, {**overrides, **step_pattern(path, spec.sweep)}).target)
    code = run_sweep(path, overrides, spec.sweep, distributed=distributed)
    document = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    if code == 130 or document.get("interrupted"):
        raise KeyboardInterrupt
    steps = [json.loads((out / step["dir"] / "summary.json").read_text(encoding="utf-8"))
             for step in document["steps"]]
    if not steps:
        variant.status, variant.error = "failed", f"the sweep ran no step ({document.get('plan')})"
        return
    best = _at_knee(document, steps)
    _from_summary(variant, best)
    scored = sum(s.get("accuracy", {}).get("scored", 0) for s in steps)
    correct = sum(s.get("accuracy", {}).get("correct", 0) for s in steps)
    variant.accuracy, variant.scored = (round(correct / scored, 6), scored) if scored else (None, 0)
    variant.saturation_rps = document.get("saturation_rps")
    variant.max_rps_meeting_slo = document.get("max_rps_meeting_slo")
    variant.slo_met = document.get("slo_met") if document.get("slo") else None
    variant.server = best.get("server")


def _at_knee(document: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The step whose latency and throughput a swept variant shows: its knee (the highest load it still
    kept up with: the figures a user would serve at), else its highest-throughput step. Past the knee
    the latency is queueing that grows with the step's length, not the variant's."""
    knee = (document.get("knee") or {}).get("step")
    numbered = dict(zip((step["step"] for step in document["steps"]), steps))
    return numbered.get(knee) or max(steps, key=lambda summary: summary["achieved_rps"])


def run_compare(path: Path | None, overrides: dict[Any, Any], spec: CompareSpec, *,
                distributed: DistributedOptions | None = None, quiet: bool = False) -> int:
    """Run every variant, write compare.json and compare.csv, print the table. Returns the exit code:
    0, 1 when --slo was met by no variant, 2 when no variant could be run, 130 when interrupted."""
    spec.check()
    pattern = step_pattern(path, spec.sweep) if spec.sweep is not None else {}
    first = load_scenario(path, {**overrides, **pattern, ("target", "model"): spec.models[0]})
    out = Path(first.output.dir) if first.output.dir else \
        Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-compare"
    overrides = {key: value for key, value in overrides.items() if key != ("output", "dir")}
    if spec.reference is not None:
        if ("target", "labels") in overrides:
            raise ScenarioError(["--reference and --labels: give one (what answers are scored against)"], "flags")
        reference = _reference_outputs(load_scenario(path, {**overrides, **pattern, ("target", "model"): spec.reference}),
                                       out / "reference_outputs.json")
        overrides[("target", "reference_outputs")] = str(reference)
    variants = [Variant(model=model, dir=model) for model in spec.models]
    interrupted = False
    print(f"compare: {len(variants)} variants, " + ("each swept to its saturation" if spec.sweep else
                                                   "the same load against each") + f" -> {out}", flush=True)
    with open_cluster(distributed) if distributed and not spec.sweep else nullcontext() as cluster:
        for variant in variants:
            print(f"compare: {variant.model}", flush=True)
            try:
                if spec.sweep is not None:
                    _sweep_variant(overrides, path, variant, out / variant.dir, spec, distributed)
                else:
                    _run_variant(overrides, path, variant, out / variant.dir, spec, cluster)
            except KeyboardInterrupt:
                interrupted = True
                break
            except LoadgenError as exc:
                variant.status, variant.error = "failed", str(exc).replace("\n", " ")
                print(f"compare: {variant.model} failed: {variant.error}", file=sys.stderr, flush=True)
            _finish(variant, spec)
    mark_pareto(variants)
    write_compare(out, variants, slo=first.slo, interrupted=interrupted, swept=spec.sweep is not None,
                  server_metrics=spec.server_metrics, cost_per_hour=spec.cost_per_hour,
                  model_repository=spec.model_repository)
    if not quiet:
        print(render_compare(variants))
    print(f"results in {out}/ (compare.json, compare.csv, one folder per variant)", file=sys.stderr, flush=True)
    if interrupted:
        return 130
    if not any(v.status == "ok" for v in variants):
        return 2
    if first.slo and not any(v.slo_met for v in variants if v.status == "ok"):
        return 1
    return 0


def _reference_outputs(scenario: Scenario, path: Path) -> Path:
    """The reference model's answer to each input-data entry (its first output), fetched once and
    written to `path`; raises a TargetError when it cannot be had."""
    target = scenario.target
    if not isinstance(target, KServeOptions) or target.input_data is None:
        problem = ("--reference needs a kserve protocol and --input-data: the reference's answer to each entry "
                   "is what the variants are scored against")
        raise ScenarioError([problem], "flags")
    client = make_client(target, scenario.pattern.seed)
    try:
        metadata = client.prepare()
        if not isinstance(client, TensorClient):
            raise ProtocolMismatch(f"protocol {target.protocol} cannot hand back answers")
        answers = client.answers()
    finally:
        client.close()
    output = (metadata.get("outputs") or [{}])[0].get("name")
    rows = []
    for index, answer in enumerate(answers):
        if isinstance(answer, str) or output not in answer:
            raise ProtocolMismatch(f"reference model {target.model!r}: entry {index} has no {output} in its answer "
                                   f"({answer if isinstance(answer, str) else sorted(answer)})")
        values = np.asarray(answer[output][2], dtype=np.float64)
        rows.append(values.reshape(values.shape[0], -1)[0].tolist() if values.ndim > 1 else values.tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": target.model, "output": output, "data": rows}) + "\n", encoding="utf-8")
    print(f"compare: scored against {target.model}'s answers to the {len(rows)} entries ({path})", flush=True)
    return path


def _memory_usage(target: TargetOptions) -> dict[str, int] | None:
    """memory_usage of the model's statistics (GET /v2/models/{m}/stats), by type; None when the server
    reports none (or the protocol has no statistics over HTTP)."""
    if target.protocol != "kserve-http":
        return None
    import httpx

    url = f"{target.url.rstrip('/')}/v2/models/{target.model}/stats"
    try:
        response = httpx.get(url, headers=target.auth_headers(), verify=target.ssl_context() or True,
                             timeout=target.connect_timeout)
        stats = response.json()["model_stats"] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    usage: dict[str, int] = {}
    for entry in stats[:1]:
        for item in entry.get("memory_usage") or []:
            usage[str(item.get("type"))] = usage.get(str(item.get("type")), 0) + int(item.get("byte_size", 0))
    return usage or None


def _finish(variant: Variant, spec: CompareSpec) -> None:
    variant.model_bytes = _model_bytes(spec.model_repository, variant.model)
    server = variant.server or {}
    if variant.memory:
        variant.memory_mb = round(sum(variant.memory.values()) / 2**20, 3)
    variant.energy_j_per_inference = server.get("energy_j_per_inference")
    inferences = variant.saturation_rps if variant.saturation_rps is not None else variant.achieved_inferences_per_s
    variant.cost_per_million = usd_per_million(spec.cost_per_hour, inferences) if spec.cost_per_hour else None
