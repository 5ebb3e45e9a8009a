"""Write and read a run's intervals as an HdrHistogram interval log (.hlog).

Place in the flow: Recorder -> **hlog sink**. The file is the standard interval-log format that
HdrHistogram's own tools read (HistogramLogProcessor, HdrHistogramVisualizer, hdrh's reader): a
StartTime/BaseTime header in epoch seconds, a legend, then per interval three lines:

    <start>,<length>,<max>,<latency histogram>            untagged, so plain readers see latency
    Tag=service,<start>,<length>,<max>,<service histogram>
    Tag=lag,<start>,<length>,<max>,<lag histogram>

A streamed run (protocol openai) adds four tagged lines per interval after these: Tag=ttft,
Tag=ttft_service, Tag=itl and Tag=tpot (loadgen/recorder/_recorder.py says what each measures).

A run with a mix ([[mix]]) adds one line per entry and interval after those: its latency histogram,
tagged `latency:<entry name>` (Tag=latency:llama-8b), so the untagged line stays the total latency.

Start times are seconds since the log's start; values are microseconds, so the max column is divided
by 1000 and reads in milliseconds.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from typing import TextIO

from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader, HistogramLogWriter

from loadgen.files import atomic_writer
from loadgen.recorder import Interval, Recorder, new_histogram
from loadgen.recorder._figures import STREAM_HISTOGRAMS

MAX_VALUE_UNIT_RATIO = 1000.0
"""Divisor for the max column: histogram values are microseconds, the column reads milliseconds."""
TAGS: dict[str, str | None] = {"latency": None, "service": "service", "lag": "lag"}
"""Histogram field -> tag in the log (None: untagged)."""
STREAM_TAGS: dict[str, str] = {name: name for name in STREAM_HISTOGRAMS}
"""StreamFigures histogram field -> tag in the log, written for intervals that have them."""
MODEL_TAG = "latency"
"""A mix entry's latency line is tagged `latency:<name>`."""


def write_hlog(path: str | os.PathLike[str], recorder: Recorder, start_epoch_s: float) -> None:
    """Write every closed interval of `recorder` to `path`.

    `start_epoch_s` is the wall-clock (epoch) time of `recorder.start_t`. Should an interval start
    before it (a merged interval from another clock), the log starts at that interval instead, since
    the format has no negative times.

    >>> write_hlog("run.hlog", recorder, start_epoch_s=time.time() - elapsed)  # doctest: +SKIP
    """
    intervals = sorted(recorder.intervals, key=lambda interval: interval.start_t)
    log_start_t = min([recorder.start_t, *(interval.start_t for interval in intervals)])
    log_start_epoch_s = start_epoch_s - (recorder.start_t - log_start_t)
    with atomic_writer(path) as out:  # the previous log or the complete new one, never a part
        writer = HistogramLogWriter(out)
        models = recorder.models or tuple(recorder.cumulative.by_model or ())
        _write_header(writer, log_start_epoch_s, any(i.figures.stream is not None for i in intervals), models)
        for interval in intervals:
            _write_interval(out, writer, interval, log_start_t)


def read_hlog(path: str | os.PathLike[str]) -> dict[str | None, list[HdrHistogram]]:
    """Read an interval log back: tag -> its interval histograms in file order (None: latency).

    >>> read_hlog("run.hlog")[None][0].get_total_count()  # doctest: +SKIP
    1000
    """
    reader = HistogramLogReader(str(path), new_histogram())
    by_tag: dict[str | None, list[HdrHistogram]] = {}
    try:
        while (hist := reader.get_next_interval_histogram()) is not None:
            by_tag.setdefault(hist.get_tag(), []).append(hist)
    finally:
        reader.close()
    return by_tag


def _write_header(writer: HistogramLogWriter, start_epoch_s: float, streams: bool = False,
                  models: tuple[str, ...] = ()) -> None:
    writer.output_log_format_version()
    # hdrh 0.10.8's output_start_time() fails on epoch times (it treats milliseconds as seconds),
    # so the StartTime line is written as a comment in the same format its reader parses.
    started = datetime.fromtimestamp(start_epoch_s, tz=UTC).isoformat(" ")
    # Never after BaseTime (floored to the microsecond): a StartTime rounded up past BaseTime makes
    # readers drop the first interval as starting before the log.
    floored = math.floor(start_epoch_s * 1e6) / 1e6
    writer.output_comment(f"[StartTime: {floored:.6f} (seconds since epoch), {started}]")
    writer.output_base_time(start_epoch_s * 1000.0)
    tags = "untagged = latency, Tag=service, Tag=lag"
    if streams:
        tags += ", " + ", ".join(f"Tag={tag}" for tag in STREAM_TAGS.values())
    if models:
        tags += ", " + ", ".join(f"Tag={MODEL_TAG}:{name}" for name in models)
    writer.output_comment(f"[Values in microseconds; {tags}]")
    writer.output_legend()


def _write_interval(out: TextIO, writer: HistogramLogWriter, interval: Interval, log_start_t: float) -> None:
    start_s = interval.start_t - log_start_t
    end_s = interval.end_t - log_start_t
    figures = interval.figures
    lines: list[tuple[str | None, HdrHistogram]] = [
        (tag, getattr(figures, name)) for name, tag in TAGS.items()
    ]
    if figures.stream is not None:
        lines += [(tag, getattr(figures.stream, name)) for name, tag in STREAM_TAGS.items()]
    if figures.by_model is not None:
        lines += [(f"{MODEL_TAG}:{name}", entry.latency) for name, entry in figures.by_model.items()]
    for tag, histogram in lines:
        hist = _Stamped(histogram, start_s, end_s)
        if tag is not None:
            # The writer has no tag argument; the format puts "Tag=<name>," before the line.
            out.write(f"Tag={tag},")
        writer.output_interval_histogram(hist, start_s, end_s, max_value_unit_ratio=MAX_VALUE_UNIT_RATIO)


class _Stamped:
    """A histogram seen with interval stamps (ms since log start), without touching the original.

    HistogramLogWriter ignores a start (or end) of 0.0 and reads the histogram's own stamp instead,
    so the first interval, which starts at 0.0, needs stamps that say the same thing.
    """

    def __init__(self, hist: HdrHistogram, start_s: float, end_s: float) -> None:
        self._hist = hist
        self._start_ms = start_s * 1000.0
        self._end_ms = end_s * 1000.0

    def get_start_time_stamp(self) -> float:
        return self._start_ms

    def get_end_time_stamp(self) -> float:
        return self._end_ms

    def get_max_value(self) -> int:
        return self._hist.get_max_value()

    def encode(self) -> bytes:
        return self._hist.encode()
