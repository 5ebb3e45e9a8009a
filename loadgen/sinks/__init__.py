"""Sinks: where recorded figures go (interval log, summary JSON, terminal table, Prometheus collector).

Place in the flow: Recorder -> **sinks**. Each sink reads a Recorder or a summary dict and never
records anything itself.
"""

from loadgen.sinks.hlog import read_hlog, write_hlog
from loadgen.sinks.prometheus import RunCollector
from loadgen.sinks.summary import build_summary, write_summary
from loadgen.sinks.table import render_table

__all__ = [
    "RunCollector",
    "build_summary",
    "read_hlog",
    "render_table",
    "write_hlog",
    "write_summary",
]
