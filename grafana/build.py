"""Builds grafana/dashboards/*.json with Grafana's foundation SDK (grafana-foundation-sdk on PyPI).

The dashboards used to be hand-kept JSON: 40-odd panels that repeat the same datasource, legend,
tooltip and line settings, laid out by hand-computed gridPos. Here each panel is its title, unit,
description and PromQL; what they share is said once, and the layout flows (panels fill rows of 24
columns left to right), so adding or widening a panel moves the others. The SDK's typed builders
write the Grafana model (schema 39, Grafana 11.0: the SDK build pinned in pyproject.toml), so a
misspelt option fails here rather than being ignored by Grafana.

    python grafana/build.py            # writes grafana/dashboards/*.json
    python grafana/build.py --check    # exit 1, naming the files that differ from what it would write

tests/test_grafana_build.py runs --check, so a hand edit of a dashboard's JSON fails CI: change this
file and run it. tests/test_grafana.py asks a real Prometheus every panel's expression.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from grafana_foundation_sdk.builders import barchart, prometheus, stat, table, timeseries, xychart
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import xychart as xychart_models
from grafana_foundation_sdk.models.dashboard import (
    Dashboard,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    GridPos,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
# The datasource that grafana/provisioning/datasources/prometheus.yml provisions.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="loadgen-prometheus")
# Grafana 11.0's dashboard schema; the SDK build pinned in pyproject.toml writes its panel options.
SCHEMA_VERSION = 39
GRID_COLUMNS = 24

PanelBuilder = timeseries.Panel | barchart.Panel | xychart.Panel | stat.Panel | table.Panel
P = TypeVar("P", timeseries.Panel, barchart.Panel, xychart.Panel, stat.Panel, table.Panel)


# -- queries ---------------------------------------------------------------------------------------

def series(expr: str, legend: str) -> prometheus.Dataquery:
    """A range query drawn over time, one line per series, named by `legend`."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def instant(expr: str) -> prometheus.Dataquery:
    """One instant query at the end of the range, as a table: what the per-step sweep panels merge.
    Its value column is "Value #<refId>", which the panels' organize transformation renames."""
    return prometheus.Dataquery().expr(expr).instant().format(PromQueryFormat.TABLE).datasource(DATASOURCE)


def with_queries(panel: P, queries: Sequence[prometheus.Dataquery]) -> P:
    """The queries, lettered A, B, C... in order."""
    for index, query in enumerate(queries):
        panel.with_target(query.ref_id(chr(ord("A") + index)))
    return panel


# -- what panels share -----------------------------------------------------------------------------

def legend() -> common_builders.VizLegendOptions:
    return (common_builders.VizLegendOptions().show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM))


def tooltip(mode: common.TooltipDisplayMode = common.TooltipDisplayMode.MULTI,
            ) -> common_builders.VizTooltipOptions:
    return common_builders.VizTooltipOptions().mode(mode)


def unit_and_axis(unit: str | None, axis: common.AxisPlacement | None = None) -> list[DynamicConfigValue]:
    """Field override properties: another unit for one series, and the side of its own axis."""
    values = [] if unit is None else [DynamicConfigValue(id_val="unit", value=unit)]
    if axis is not None:
        values.append(DynamicConfigValue(id_val="custom.axisPlacement", value=axis))
    return values


def described(panel: P, title: str, description: str, unit: str | None) -> P:
    panel.title(title).description(description).datasource(DATASOURCE)
    if unit is not None:
        panel.unit(unit)
    return panel


def graph(title: str, unit: str | None, description: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    """A time series panel: thin lines, no fill, the legend below, every series in the tooltip."""
    panel = described(timeseries.Panel(), title, description, unit)
    panel.line_width(1).fill_opacity(0).legend(legend()).tooltip(tooltip())
    return with_queries(panel, queries)


def merged_table(rename: dict[str, str], keep_step: bool = False) -> list[DataTransformerConfig]:
    """The instant tables of a per-step panel as one: merged on their labels (step, load, unit),
    Prometheus's own columns dropped, each query's value named."""
    dropped = ["Time", "__name__", "instance", "job"]
    if not keep_step:
        dropped.insert(1, "step")
    exclude = dict.fromkeys(dropped, True)
    return [
        DataTransformerConfig(id_val="merge", options={}),
        DataTransformerConfig(id_val="organize", options={
            "excludeByName": exclude, "renameByName": rename, "indexByName": {}}),
    ]


def sorted_by(field: str) -> DataTransformerConfig:
    return DataTransformerConfig(id_val="sortBy", options={"sort": [{"field": field}]})


def step_bars(title: str, unit: str, description: str, rename: dict[str, str],
              *queries: prometheus.Dataquery, sort_by: str | None = None) -> barchart.Panel:
    """Grouped bars, one group per completed sweep step, by its load."""
    panel = described(barchart.Panel(), title, description, unit)
    panel.x_field("load").orientation(common.VizOrientation.VERTICAL).group_width(0.7).bar_width(0.9)
    panel.show_value(common.VisibilityMode.AUTO).legend(legend()).tooltip(tooltip())
    transformations = merged_table(rename)
    if sort_by is not None:
        transformations.append(sorted_by(sort_by))
    return with_queries(panel.transformations(transformations), queries)


# -- layout ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """A panel and its size in grid units (24 columns wide)."""

    width: int
    height: int
    panel: PanelBuilder


def dashboard(uid: str, title: str, description: str, slots: Sequence[Slot], *,
              tags: Sequence[str] = ("loadgen",), time_from: str = "now-15m") -> Dashboard:
    """The dashboard, its panels numbered in order and laid left to right: a panel that does not fit
    in what is left of its row starts the next row, below the tallest panel of this one."""
    board = (dashboard_builders.Dashboard(title).uid(uid).description(description).tags(list(tags))
             .editable().refresh("5s").time(time_from, "now").timezone("browser").version(1))
    x = y = row_height = 0
    for number, slot in enumerate(slots, start=1):
        if x + slot.width > GRID_COLUMNS:
            x, y, row_height = 0, y + row_height, 0
        slot.panel.id(number).grid_pos(GridPos(x=x, y=y, w=slot.width, h=slot.height))
        board.with_panel(slot.panel)
        x, row_height = x + slot.width, max(row_height, slot.height)
    model = board.build()
    model.schema_version = SCHEMA_VERSION  # the SDK's builder has no setter for it
    return model


# -- the dashboards --------------------------------------------------------------------------------

def live() -> Dashboard:
    return dashboard("loadgen-live", "loadgen: live run", (
        "One loadgen run as it goes (loadgen run --metrics-port 9646). Percentiles are read from the "
        "generator's HDR histograms, not interpolated from buckets."), [
        Slot(12, 8, graph(
            "Offered vs achieved rate", "reqps",
            "What the schedule asks for, what was sent, and what completed. Achieved below offered: the "
            "endpoint is saturating (or the generator is: see lag).",
            series("loadgen_offered_rps", "offered"),
            series("loadgen_achieved_rps", "achieved"),
            series("rate(loadgen_sent_total[10s])", "sent"))),
        Slot(12, 8, graph(
            "Latency percentiles, last 10 s", "s",
            "From the intended send time (open loop): free of coordinated omission.",
            series('loadgen_latency_percentile_seconds{window="10s"}', "p{{quantile}}"))),
        Slot(12, 8, graph(
            "Latency percentiles, whole run", "s", "",
            series('loadgen_latency_percentile_seconds{window="run"}', "p{{quantile}}"))),
        Slot(12, 8, graph(
            "Service time percentiles, last 10 s", "s",
            "From the actual send: what the endpoint took once the request was on the wire.",
            series('loadgen_service_percentile_seconds{window="10s"}', "p{{quantile}}"))),
        Slot(12, 8, graph(
            "Responses by outcome", "reqps", "",
            series("sum by (outcome, kind) (rate(loadgen_requests_total[10s]))", "{{outcome}} {{kind}}"))),
        Slot(12, 8, graph(
            "In flight", "short", "",
            series("loadgen_in_flight", "in flight"))),
        Slot(12, 8, graph(
            "Generator health: schedule lag", "s",
            "How late the generator sent. Lag p99 above 1 ms: the run is generator-bound.",
            series('loadgen_lag_percentile_seconds{window="10s"}', "lag p{{quantile}}"))),
        Slot(12, 8, graph(
            "Generator health: dropped arrivals and CPU", "short", "",
            series("rate(loadgen_dropped_total[10s])", "dropped/s"),
            series("loadgen_generator_cpu_ratio", "generator CPU (cores)"))),
        Slot(24, 8, graph(
            "Latency distribution (histogram buckets)", "s",
            "Prometheus's own interpolation over the x1.25 buckets, for alerting rules; the HDR gauges "
            "above are finer.",
            series("histogram_quantile(0.99, sum by (le) (rate(loadgen_latency_seconds_bucket[30s])))",
                   "p99 from buckets"))),
    ])


def llm() -> Dashboard:
    return dashboard("loadgen-llm", "loadgen: LLM run", (
        'One loadgen run against an OpenAI-compatible endpoint (loadgen run --protocol openai --goodput '
        '"ttft<200ms,tpot<50ms" --metrics-port 9646): goodput, TTFT, ITL, TPOT and output tokens as it '
        "goes. Percentiles are read from the generator's HDR histograms, not interpolated from buckets."), [
        Slot(12, 8, graph(
            "Offered, achieved and goodput rate", "reqps",
            "What the schedule asks for, what completed, and what completed good (every --goodput term "
            "met: TTFT, TPOT, largest inter-token gap, end-to-end latency of that request). Goodput falling "
            "away from achieved: the endpoint still answers, but too slowly for its users.",
            series("loadgen_offered_rps", "offered"),
            series("loadgen_achieved_rps", "achieved"),
            series("loadgen_goodput_rps", "goodput"))),
        Slot(12, 8, graph(
            "Good share, last 10 s", "percentunit",
            "Good responses over all responses (ok and errors) over the last 10 s. Needs --goodput.",
            series("sum by (instance) (rate(loadgen_good_requests_total[10s])) / "
                   "sum by (instance) (rate(loadgen_requests_total[10s]))", "good share"))),
        Slot(8, 8, graph(
            "Time to first token, last 10 s", "s",
            "TTFT percentiles from the generator's HDR histogram, from the intended send instant (open "
            "loop: a late send counts).",
            series('loadgen_ttft_percentile_seconds{window="10s"}', "p{{quantile}}"))),
        Slot(8, 8, graph(
            "Inter-token latency, last 10 s", "s",
            "Every gap between two successive token chunks, pooled over responses (vLLM's ITL).",
            series('loadgen_itl_percentile_seconds{window="10s"}', "p{{quantile}}"))),
        Slot(8, 8, graph(
            "Time per output token, last 10 s", "s",
            "Per response: (last token chunk - first token chunk) / (output tokens - 1).",
            series('loadgen_tpot_percentile_seconds{window="10s"}', "p{{quantile}}"))),
        Slot(12, 8, graph(
            "TTFT, ITL and TPOT p99, whole run", "s",
            "The run's cumulative p99 of each token figure (summary.json's ttft_ms, itl_ms, tpot_ms).",
            series('loadgen_ttft_percentile_seconds{window="run", quantile="0.99"}', "TTFT p99"),
            series('loadgen_itl_percentile_seconds{window="run", quantile="0.99"}', "ITL p99"),
            series('loadgen_tpot_percentile_seconds{window="run", quantile="0.99"}', "TPOT p99"))),
        Slot(12, 8, graph(
            "Output tokens per second", "short",
            "Output tokens of the responses completed in the last interval, and the 10 s rate of the token "
            "counter.",
            series("loadgen_output_tokens_per_s", "output tokens/s (last interval)"),
            series("rate(loadgen_output_tokens_total[10s])", "output tokens/s (10 s)"))),
        Slot(8, 8, graph(
            "Errors by kind", "reqps",
            "Failed responses per second by kind (stream_truncated, stream_error, timeout, http_5xx, ...).",
            series('sum by (kind) (rate(loadgen_requests_total{outcome="error"}[10s]))', "{{kind}}"))),
        Slot(8, 8, graph(
            "In flight", "short",
            "Requests sent and not yet answered: long streams keep many open.",
            series("loadgen_in_flight", "in flight"))),
        Slot(8, 8, graph(
            "Generator health: schedule lag", "s",
            "How late the generator sent against its schedule. Lag near a TTFT term means the figures "
            "describe the generator, not the endpoint.",
            series('loadgen_lag_percentile_seconds{window="10s"}', "lag p{{quantile}}"))),
        Slot(12, 8, graph(
            "Achieved rate by model (mixes)", "reqps",
            "A run with [[mix]] entries (or --mix): each entry's completed requests per second; empty "
            "without a mix.",
            series("loadgen_model_achieved_rps", "{{model}}"))),
        Slot(12, 8, graph(
            "Latency and TTFT p99 by model, last 10 s (mixes)", "s",
            "Each mix entry's end-to-end latency and time to first token, 99th percentile over the last "
            "10 s (from its own HDR histograms).",
            series('loadgen_model_latency_percentile_seconds{quantile="0.99",window="10s"}',
                   "latency {{model}}"),
            series('loadgen_model_ttft_percentile_seconds{quantile="0.99",window="10s"}', "ttft {{model}}"))),
    ], tags=("loadgen", "llm"))


# The per-step families of a sweep, read as Grafana asks an instant query: at the end of the range,
# the last value of each step within it ($__range), so a finished sweep stays on the panels.
STEP_OFFERED = "last_over_time(loadgen_sweep_step_offered_rps[$__range])"
STEP_ACHIEVED = "last_over_time(loadgen_sweep_step_achieved_rps[$__range])"
STEP_P50 = ('max without (quantile) '
            '(last_over_time(loadgen_sweep_step_latency_seconds{quantile="0.5"}[$__range]))')
STEP_P99 = ('max without (quantile) '
            '(last_over_time(loadgen_sweep_step_latency_seconds{quantile="0.99"}[$__range]))')


def sweep_curve() -> xychart.Panel:
    """p99 (y) against achieved throughput (x), one point per completed step, joined in order."""
    panel = described(xychart.Panel(), "p99 latency vs achieved throughput (the curve)", (
        "Each point is a completed step: x its achieved throughput, y its p99 latency from the step's HDR "
        "histogram. The curve bends up at the knee."), "s")
    panel.show(xychart_models.ScatterShow.POINTS_AND_LINES)
    panel.point_size(common_builders.ScaleDimensionConfig().fixed(6))
    panel.override_by_name("achieved", unit_and_axis("reqps"))
    panel.series_mapping(xychart_models.SeriesMapping.AUTO)
    panel.dims(xychart.XYDimensionConfig().x("achieved").exclude(["load"]))
    panel.legend(legend()).tooltip(tooltip(common.TooltipDisplayMode.SINGLE))
    panel.transformations([*merged_table({"Value #A": "achieved", "Value #B": "p99"}), sorted_by("achieved")])
    return with_queries(panel, [instant(STEP_ACHIEVED), instant(STEP_P99)])


def sweep_verdict() -> stat.Panel:
    panel = described(stat.Panel(), "Saturation verdict (steps so far)", (
        "The verdict of the completed steps, final once 'finished' is 1: saturation throughput (a lower "
        "bound while 'saturated' is 0), the knee and its load, the highest throughput that met the SLO."),
        "reqps")
    panel.decimals(1).override_by_regexp("saturated|finished|knee load", [
        DynamicConfigValue(id_val="unit", value="none"), DynamicConfigValue(id_val="decimals", value=0)])
    panel.reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
    panel.color_mode(common.BigValueColorMode.VALUE).graph_mode(common.BigValueGraphMode.NONE)
    panel.text_mode(common.BigValueTextMode.VALUE_AND_NAME).orientation(common.VizOrientation.AUTO)
    return with_queries(panel, [
        series("loadgen_sweep_saturation_rps", "saturation"),
        series("loadgen_sweep_knee_rps", "knee"),
        series("loadgen_sweep_knee_load", "knee load"),
        series("loadgen_sweep_max_rps_meeting_slo", "max meeting SLO"),
        series("loadgen_sweep_saturated", "saturated"),
        series("loadgen_sweep_finished", "finished"),
    ])


def sweep_steps() -> table.Panel:
    panel = described(table.Panel(), "Steps", (
        "Every completed step: its load, offered and achieved rate, p50/p99, error ratio, and whether the "
        "generator kept up (a generator-bound step is never the saturation point), the step was stable "
        "and met the SLO."), None)
    panel.decimals(3).show_header(True)
    panel.sort_by([common_builders.TableSortByFieldState().display_name("step").desc(False)])
    columns = {"A": "offered req/s", "B": "achieved req/s", "C": "p50 s", "D": "p99 s", "E": "error ratio",
               "F": "generator-bound", "G": "stable", "H": "SLO met"}
    panel.transformations([
        *merged_table({f"Value #{ref}": name for ref, name in columns.items()}, keep_step=True),
        DataTransformerConfig(id_val="convertFieldType", options={
            "conversions": [{"targetField": "step", "destinationType": "number"}]}),
    ])
    return with_queries(panel, [instant(expr) for expr in (
        STEP_OFFERED, STEP_ACHIEVED, STEP_P50, STEP_P99,
        "last_over_time(loadgen_sweep_step_error_ratio[$__range])",
        "last_over_time(loadgen_sweep_step_generator_bound[$__range])",
        "last_over_time(loadgen_sweep_step_stable[$__range])",
        "last_over_time(loadgen_sweep_step_slo_met[$__range])")])


def sweep() -> Dashboard:
    progress = graph(
        "Sweep progress: step and its load", None,
        "The step running now and its load (req/s in open loop, users in closed loop). Each step is a run "
        "at one load: warm-up, then the measured part.",
        series("loadgen_sweep_current_step", "step"),
        series("loadgen_sweep_current_load * on (job, instance) group_left (unit) loadgen_sweep_info",
               "load ({{unit}})"))
    progress.line_interpolation(common.LineInterpolation.STEP_AFTER)
    progress.override_by_name("step", unit_and_axis(None, common.AxisPlacement.RIGHT))
    running = graph(
        "Live: offered vs achieved, p99 (last 10 s)", "reqps",
        "The running step's own figures (the same families as the live run dashboard): throughput climbs "
        "step by step until the endpoint saturates.",
        series("loadgen_offered_rps and on (job, instance) loadgen_sweep_info", "offered"),
        series("loadgen_achieved_rps and on (job, instance) loadgen_sweep_info", "achieved"),
        series('loadgen_latency_percentile_seconds{quantile="0.99",window="10s"} and on (job, instance) '
               "loadgen_sweep_info", "p99"))
    running.override_by_name("p99", unit_and_axis("s", common.AxisPlacement.RIGHT))
    return dashboard("loadgen-sweep", "loadgen: sweep (throughput under load)", (
        "A loadgen sweep as it goes (loadgen sweep ... --metrics-port 9646): the curve of completed steps, "
        "the running step, and the saturation verdict so far. Percentiles come from each step's HDR "
        "histogram."), [
        Slot(12, 8, progress),
        Slot(12, 8, running),
        Slot(12, 9, step_bars(
            "Throughput under load: achieved vs offered, per step", "reqps",
            "One group of bars per completed step, by its load (req/s, or users in closed loop). Achieved "
            "below offered, or no longer growing with more users: the endpoint is saturated.",
            {"Value #A": "offered", "Value #B": "achieved"},
            instant(STEP_OFFERED), instant(STEP_ACHIEVED), sort_by="achieved")),
        Slot(12, 9, sweep_curve()),
        Slot(12, 8, step_bars(
            "Latency p50 and p99 per step", "s",
            "Each completed step's latency percentiles (open loop: from the intended send time), by its "
            "load.",
            {"Value #A": "p50", "Value #B": "p99"},
            instant(STEP_P50), instant(STEP_P99))),
        Slot(12, 8, sweep_verdict()),
        Slot(24, 9, sweep_steps()),
    ], time_from="now-30m")


def torchserve() -> Dashboard:
    per_request = ('sum by (model_name) (rate({family}{{job="torchserve"}}[10s])) / clamp_min(sum by '
                   '(model_name) (rate(ts_inference_requests_total{{job="torchserve"}}[10s])), 1e-9) / 1e6')
    return dashboard("loadgen-torchserve-server", "Inference server: TorchServe metrics (ts_*)", (
        "Server-side view of a TorchServe endpoint under load, from its metrics API "
        "(metrics_mode=prometheus), or loadgen serve torchserve."), [
        Slot(12, 8, graph(
            "Inference requests by model", "reqps", "",
            series('sum by (model_name) (rate(ts_inference_requests_total{job="torchserve"}[10s]))',
                   "{{model_name}}"))),
        Slot(12, 8, graph(
            "Responses by status class", "reqps",
            "TorchServe's frontend counters Requests2XX, Requests4XX and Requests5XX (each appears once it "
            "is non-zero).",
            series('sum by (__name__) (rate({__name__=~"Requests[245]XX",job="torchserve"}[10s]))',
                   "{{__name__}}"))),
        Slot(12, 8, graph(
            "Average inference latency", "s",
            "Frontend latency per request: ts_inference_latency_microseconds over "
            "ts_inference_requests_total.",
            series(per_request.format(family="ts_inference_latency_microseconds"), "{{model_name}}"))),
        Slot(12, 8, graph(
            "Average queue time", "s",
            "Time in the model's job queue before a worker took the request (batching delay included).",
            series(per_request.format(family="ts_queue_latency_microseconds"), "{{model_name}}"))),
        Slot(12, 8, graph(
            "Handler and prediction time", "ms",
            "Backend gauges of the last batch: the handler's own time and the whole prediction.",
            series('avg by (ModelName) (HandlerTime{job="torchserve"})', "handler {{ModelName}}"),
            series('avg by (ModelName) (PredictionTime{job="torchserve"})', "prediction {{ModelName}}"))),
        Slot(12, 8, graph(
            "Host CPU and memory", "percent",
            "Host figures TorchServe reports (Level=Host).",
            series('CPUUtilization{job="torchserve"}', "CPU %"),
            series('MemoryUtilization{job="torchserve"}', "memory %"))),
    ])


def triton() -> Dashboard:
    def per(family: str, count: str, scale: str = " / 1e6") -> str:
        """A counter's rate over another's, per model: average microseconds per request in seconds."""
        return (f"sum by (model) (rate({family}[10s])) / clamp_min(sum by (model) (rate({count}[10s])), "
                f"1e-9){scale}")

    return dashboard("loadgen-triton-server", "Inference server: Triton metrics (nv_*)", (
        "Server-side view of the endpoint under load, from Triton's metrics port (or loadgen serve triton "
        "--metrics-port)."), [
        Slot(12, 8, graph(
            "Successful requests by model", "reqps", "",
            series("sum by (model) (rate(nv_inference_request_success[10s]))", "{{model}}"))),
        Slot(12, 8, graph(
            "Failed requests by model and reason", "reqps", "",
            series("sum by (model, reason) (rate(nv_inference_request_failure[10s]))",
                   "{{model}} {{reason}}"))),
        Slot(12, 8, graph(
            "Average request time", "s", "",
            series(per("nv_inference_request_duration_us", "nv_inference_request_success"), "{{model}}"))),
        Slot(12, 8, graph(
            "Average queue and compute time", "s", "",
            series(per("nv_inference_queue_duration_us", "nv_inference_request_success"), "queue {{model}}"),
            series(per("nv_inference_compute_infer_duration_us", "nv_inference_exec_count"),
                   "compute {{model}}"))),
        Slot(12, 8, graph(
            "Average batch size", "short", "",
            series(per("nv_inference_count", "nv_inference_exec_count", scale=""), "{{model}}"))),
        Slot(12, 8, graph(
            "Pending requests", "short", "",
            series("sum by (model) (nv_inference_pending_request_count)", "{{model}}"))),
        Slot(12, 8, graph(
            "Server process CPU", "short", "",
            series('rate(process_cpu_seconds_total{job="inference-server"}[10s])', "cores"))),
        Slot(12, 8, graph(
            "Server process memory", "bytes", "",
            series('process_resident_memory_bytes{job="inference-server"}', "resident"))),
    ])


BOARDS = {
    "loadgen-live.json": live,
    "loadgen-llm.json": llm,
    "loadgen-sweep.json": sweep,
    "triton-server.json": triton,
    "torchserve-server.json": torchserve,
}


def render() -> dict[str, str]:
    """Each dashboard file's name and its JSON text."""
    return {name: json.dumps(make(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"
            for name, make in BOARDS.items()}


def differing(folder: Path, files: dict[str, str]) -> list[str]:
    """The dashboard files in `folder` that are not what this script writes: changed, missing, or
    JSON that no board here makes."""
    present = {path.name for path in folder.glob("*.json")}
    changed = [name for name, text in files.items()
               if name not in present or (folder / name).read_text(encoding="utf-8") != text]
    return sorted(changed + sorted(present - files.keys()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write grafana/dashboards/*.json from the panels declared in grafana/build.py.",
        epilog="example: python grafana/build.py --check  (exit 1 when a file is not what it would write)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming the files that differ from what would be written")
    parser.add_argument("--dir", type=Path, default=DASHBOARDS,
                        help="the dashboards folder (default: grafana/dashboards beside this script)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not a folder")
    files = render()
    if args.check:
        stale = differing(args.dir, files)
        if stale:
            print(f"{args.dir}: not what grafana/build.py makes: {', '.join(stale)}\n"
                  "change grafana/build.py and run `python grafana/build.py` (a file it does not make: "
                  "add its board to the script, or delete the file)", file=sys.stderr)
            return 1
        print(f"{args.dir}: {len(files)} dashboards, as grafana/build.py makes them")
        return 0
    for name, text in files.items():
        (args.dir / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} dashboards to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
