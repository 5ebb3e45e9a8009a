"""`make test`: the suite in two lanes at once, the timing lane at the host's normal priority and the
background lane in the CPU time it leaves idle.

Most of the suite's wall time is timing tests waiting: a run at 200 req/s for a few seconds keeps a core
busy a tenth of the time. The modules of BACKGROUND time nothing: they check protocols, model files,
parsers and counts (a server's answers to tritonclient, an archive that does not load, a fuzzed parser,
a model repository's bytes). They run beside the timing tests as one pytest session at SCHED_IDLE (its
servers and runs too: the policy is inherited), which the kernel preempts at once whenever a timing test's
process becomes runnable, as it does the keep-awake spinners (loadgen/lowlevel/keepawake.py). So the
timing tests see the host they would see alone, and the host-noise probes (tests/support/timing.py) would
say otherwise if not; the background lane takes only what they leave.

    python -m tests.support.lanes [PYTEST ARGS]    # both lanes; exit 0 only when both pass

`pytest --lane timing` or `--lane background` runs one lane; without --lane, pytest runs every test.
A module not listed is in the timing lane: a new module is timed alone until someone decides otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["BACKGROUND", "lane_of", "main"]

BACKGROUND = frozenset({
    "test_backends", "test_builtin_models", "test_calibration_http", "test_check_response", "test_compare_units",
    "test_digits_models", "test_distributed_units", "test_exported_members", "test_fuzz", "test_grafana_build",
    "test_http1_chunked", "test_import_rules", "test_kserve_http_tensors", "test_minilm_models",
    "test_mix_units", "test_openai_units", "test_options", "test_patterns", "test_prometheus", "test_recorder",
    "test_repository", "test_scenario", "test_server_connection_cap", "test_sinks", "test_slo",
    "test_sweep_units", "test_test_layout", "test_torchserve_archive", "test_torchserve_grpc",
    "test_torchserve_http", "test_torchserve_limits", "test_torchserve_units", "test_trace_units",
    "test_triton_app", "test_triton_bad_input", "test_triton_grpc", "test_triton_grpc_tls", "test_triton_http",
    "test_triton_metrics", "test_triton_repository",
})
"""Test modules that time nothing (see the module docstring); every other module is in the timing lane."""

ROOT = Path(__file__).resolve().parents[2]


def lane_of(module_path: str) -> str:
    """'background' or 'timing': the lane of the test module at `module_path`."""
    return "background" if Path(module_path).stem in BACKGROUND else "timing"


def _idle() -> None:
    """In the background lane's process, before it runs pytest: SCHED_IDLE, else the lowest nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-q", *argv]
    with tempfile.TemporaryFile("w+") as log:
        background = subprocess.Popen([*pytest, "--lane", "background", "-p", "no:cacheprovider"], cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, preexec_fn=_idle)  # noqa: PLW1509
        try:
            timing = subprocess.run([*pytest, "--lane", "timing", "--durations=25"], cwd=ROOT, check=False)
            background.wait()
        finally:
            if background.poll() is None:  # interrupted: the background lane ends with it
                background.terminate()
                background.wait()
        log.seek(0)
        print("\n== background lane (SCHED_IDLE) ==", flush=True)
        sys.stdout.write(log.read())
    print(f"\ntiming lane: exit {timing.returncode}; background lane: exit {background.returncode}", flush=True)
    return timing.returncode or background.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
