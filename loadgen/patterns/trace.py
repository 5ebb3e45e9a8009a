"""Trace replay: the send instants (and request sizes) of a recorded trace, as an open-loop schedule.

A trace is read once, validated whole, and becomes arrays: each row's time (seconds from the first
row), and, where the format gives them, its input and output token counts, model and prefix-block ids.
The schedule (schedule.py) replays the times divided by the speed-up, fixed before the run like every
open-loop schedule, so lag, dropped and unsent are counted as for any other pattern; with `loop` the
trace repeats, each pass one period later (the span plus one mean gap, so a pass's first row does not
land on the previous pass's last).

Formats (`format = "auto"` tells them apart by the file's first row):
  jsonl     one JSON object a line: `timestamp` (seconds, or ms with time_unit = "ms"; or a
            `timestamp_ms` key), optional `input_tokens`, `output_tokens`, `model`
            (`input_length` / `output_length` and `prompt_tokens` / `max_tokens` are read as the same)
  csv       the same columns with a header row
  azure     the Azure LLM inference trace: TIMESTAMP (date and time), ContextTokens, GeneratedTokens
  mooncake  Mooncake's JSONL: timestamp (ms), input_length, output_length, hash_ids
  burstgpt  BurstGPT's CSV: Timestamp (s), Model, Request tokens, Response tokens, ...

Rows out of time order are sorted (stable) and counted, or refused with `strict`. Every problem is
reported with the file and line it is on, and nothing is sent.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TRACE_FORMATS", "Trace", "TraceError", "read_trace"]

TRACE_FORMATS = ("auto", "jsonl", "csv", "azure", "mooncake", "burstgpt")
_MAX_PROBLEMS = 10
_ALIASES = {
    "input_tokens": ("input_tokens", "input_length", "prompt_tokens"),
    "output_tokens": ("output_tokens", "output_length", "max_tokens"),
}
_AZURE = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURSTGPT = ("Timestamp", "Request tokens", "Response tokens")


class TraceError(ValueError):
    """A trace that cannot be replayed; `problems` name the file and line of each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, eq=False)
class Trace:
    """A trace's rows in time order."""

    path: str
    format: str
    times_s: np.ndarray
    """Each row's instant, seconds from the first row (ascending)."""
    input_tokens: np.ndarray
    """Prompt tokens of each row, -1 where the trace gives none."""
    output_tokens: np.ndarray
    """Tokens to generate for each row, -1 where the trace gives none."""
    models: tuple[str, ...] | None
    """Each row's model, when the trace names them."""
    hash_ids: tuple[tuple[int, ...], ...] | None
    """Mooncake's prefix-block ids of each row (rows sharing ids share a prompt prefix)."""
    sorted_rows: int
    """Rows that were out of time order and were sorted into place."""
    lines: np.ndarray
    """Each row's line in the file (to name a row that cannot be sent)."""

    def __len__(self) -> int:
        return len(self.times_s)

    @property
    def span_s(self) -> float:
        """First row to last row."""
        return float(self.times_s[-1]) if len(self.times_s) else 0.0

    @property
    def period_s(self) -> float:
        """One pass of a looped trace: its span plus one mean gap between rows (1 s for a single row)."""
        n = len(self.times_s)
        return self.span_s * n / (n - 1) if n > 1 and self.span_s > 0 else max(self.span_s, 1.0)

    @property
    def sized(self) -> bool:
        """Whether some row gives an input or output size."""
        return bool((self.input_tokens >= 0).any() or (self.output_tokens >= 0).any())

    def describe(self) -> dict[str, Any]:
        """What summary.json keeps of the trace."""
        sizes = {}
        for name, column in (("input_tokens", self.input_tokens), ("output_tokens", self.output_tokens)):
            given = column[column >= 0]
            if len(given):
                sizes[name] = {"mean": round(float(given.mean()), 2), "max": int(given.max())}
        return {"path": self.path, "format": self.format, "rows": len(self), "span_s": round(self.span_s, 6),
                "sorted_rows": self.sorted_rows, **sizes}


def read_trace(path: str | os.PathLike[str], fmt: str = "auto", time_unit: str = "s",
               strict: bool = False) -> Trace:
    """Read and validate a whole trace file (cached by path, modification time and options)."""
    file = Path(path)
    try:
        stamp = file.stat().st_mtime_ns
    except OSError as exc:
        raise TraceError([f"{path}: {exc.strerror or exc}"]) from None
    return _read(str(file), stamp, fmt, time_unit, strict)


@functools.lru_cache(maxsize=4)
def _read(path: str, _stamp: int, fmt: str, time_unit: str, strict: bool) -> Trace:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError([f"{path}: cannot be read ({exc})"]) from None
    if fmt == "auto":
        fmt = _detect(path, text)
    rows = _ROW_READERS[fmt](path, text)
    return _assemble(path, fmt, rows, time_unit, strict)


@dataclass
class _Row:
    line: int
    time: float | None
    input_tokens: int = -1
    output_tokens: int = -1
    model: str | None = None
    hash_ids: tuple[int, ...] | None = None
    problem: str | None = None
    file_unit: bool = False
    """`time` is in the file's unit (time_unit: s or ms), not yet in seconds."""


def _detect(path: str, text: str) -> str:
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        try:
            keys = set(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            return "jsonl"  # the reader names the line
        return "mooncake" if {"hash_ids", "input_length"} & keys and "timestamp" in keys \
            and "input_tokens" not in keys else "jsonl"
    header = [cell.strip() for cell in next(csv.reader([first]), [])]
    if set(_AZURE) <= set(header):
        return "azure"
    if set(_BURSTGPT) <= set(header):
        return "burstgpt"
    return "csv"


_MAX_COUNT = 2**31 - 1
"""The largest token count a row may give (beyond any model's context; a larger one is a typo or junk)."""


def _number(value: Any, name: str, row: _Row, integer: bool = False) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        row.problem = f"{name} {value!r} is not a number"
        return None
    if not np.isfinite(number) or number < 0 or (integer and number != int(number)):
        row.problem = f"{name} {value!r} is not a {'whole ' if integer else ''}number >= 0"
        return None
    if integer and number > _MAX_COUNT:
        row.problem = f"{name} {value!r} is over {_MAX_COUNT:,}"
        return None
    return number


def _sizes(row: _Row, get: Any) -> None:
    for field, names in _ALIASES.items():
        value = next((get(name) for name in names if get(name) not in (None, "")), None)
        number = _number(value, field, row, integer=True)
        if number is not None:
            setattr(row, field, int(number))


def _jsonl_rows(path: str, text: str, mooncake: bool = False) -> list[_Row]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        row = _Row(line, None)
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            row.problem = f"not JSON ({exc.msg})"
            rows.append(row)
            continue
        if not isinstance(item, dict):
            row.problem = "expected a JSON object"
            rows.append(row)
            continue
        if "timestamp_ms" in item and "timestamp" not in item:
            ms = _number(item["timestamp_ms"], "timestamp_ms", row)
            row.time = ms / 1000.0 if ms is not None else None
        else:
            row.time = _number(item.get("timestamp"), "timestamp", row)
            if mooncake and row.time is not None:
                row.time /= 1000.0
            row.file_unit = not mooncake
        _sizes(row, item.get)
        model = item.get("model")
        row.model = str(model) if model is not None else None
        ids = item.get("hash_ids")
        if ids is not None:
            if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
                row.hash_ids = tuple(ids)
            else:
                row.problem = "hash_ids must be a list of integers"
        rows.append(row)
    return rows


def _csv_rows(path: str, text: str, columns: dict[str, str] | None = None) -> list[_Row]:
    """Rows of a CSV file with a header; `columns` maps our names to the format's column names."""
    reader = csv.DictReader(io.StringIO(text))
    names = {name.strip(): name for name in reader.fieldnames or ()}
    rows = []
    for record in reader:
        line = reader.line_num
        row = _Row(line, None)
        cells = {name: record.get(original) for name, original in names.items()}
        if columns is None:
            if cells.get("timestamp_ms") not in (None, "") and cells.get("timestamp") in (None, ""):
                ms = _number(cells["timestamp_ms"], "timestamp_ms", row)
                row.time = ms / 1000.0 if ms is not None else None
            else:
                row.time, row.file_unit = _number(cells.get("timestamp"), "timestamp", row), True
            _sizes(row, cells.get)
            row.model = cells.get("model") or None
        else:
            row.time = _timestamp(cells.get(columns["timestamp"]), row)
            for field in ("input_tokens", "output_tokens"):
                number = _number(cells.get(columns[field]), columns[field], row, integer=True)
                if number is not None:
                    setattr(row, field, int(number))
            row.model = cells.get(columns.get("model", "")) or None
        rows.append(row)
    return rows


def _timestamp(value: str | None, row: _Row) -> float | None:
    """Seconds of a number, or of an ISO date-time (Azure: '2023-11-16 18:15:46.6805900', 7 digits)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    whole, _, fraction = value.partition(".")
    try:
        stamp = datetime.fromisoformat(whole).timestamp()
        return stamp + (float("0." + fraction) if fraction.isdigit() else 0.0)
    except ValueError:
        row.problem = f"timestamp {value!r} is neither a number nor a date-time"
        return None


_ROW_READERS = {
    "jsonl": _jsonl_rows,
    "mooncake": lambda path, text: _jsonl_rows(path, text, mooncake=True),
    "csv": _csv_rows,
    "azure": lambda path, text: _csv_rows(path, text, {"timestamp": "TIMESTAMP", "input_tokens": "ContextTokens",
                                                       "output_tokens": "GeneratedTokens"}),
    "burstgpt": lambda path, text: _csv_rows(path, text, {"timestamp": "Timestamp", "model": "Model",
                                                          "input_tokens": "Request tokens",
                                                          "output_tokens": "Response tokens"}),
}


def _assemble(path: str, fmt: str, rows: list[_Row], time_unit: str, strict: bool) -> Trace:
    scale = 0.001 if time_unit == "ms" else 1.0
    problems = []
    for row in rows:
        if row.problem is None and row.time is None:
            row.problem = "no timestamp"
        if row.problem is not None:
            problems.append(f"{path}:{row.line}: {row.problem}")
        elif row.file_unit:
            row.time *= scale
    if not rows:
        problems.append(f"{path}: the trace has no rows")
    if problems:
        extra = len(problems) - _MAX_PROBLEMS
        raise TraceError(problems[:_MAX_PROBLEMS] + ([f"{path}: ... and {extra} more"] if extra > 0 else []))
    times = np.array([row.time for row in rows], dtype=np.float64)
    back = np.flatnonzero(np.diff(times) < 0)
    if len(back) and strict:
        row = rows[back[0] + 1]
        message = (f"{path}:{row.line}: timestamp {row.time:g} s is before the previous row's "
                   f"{rows[back[0]].time:g} s (strict: rows must be in time order)")
        raise TraceError([message])
    order = np.argsort(times, kind="stable")
    moved = int(np.count_nonzero(order != np.arange(len(order))))
    rows = [rows[i] for i in order]
    times = times[order]
    models = tuple(row.model or "" for row in rows) if any(row.model for row in rows) else None
    ids = tuple(row.hash_ids or () for row in rows) if any(row.hash_ids for row in rows) else None
    return Trace(path=path, format=fmt, times_s=times - times[0],
                 input_tokens=np.array([row.input_tokens for row in rows], dtype=np.int64),
                 output_tokens=np.array([row.output_tokens for row in rows], dtype=np.int64),
                 models=models, hash_ids=ids, sorted_rows=moved,
                 lines=np.array([row.line for row in rows], dtype=np.int64))
