"""The accuracy-vs-speed table of make-repo's digits variants on this machine, with ratios against fp32.

make-repo trains the digits CNN and writes its variants (fp16, bf16, int8 dynamic and static, ONNX
fp32 and int8, pruned 50 % and 90 %, a distilled student); the Triton-compatible server serves them on
one core (core 1) and `loadgen compare --sweep --slo "p99<SLO"` on the other core sweeps each to its
saturation, scoring every answer against the test labels. Each request carries --batch-size digits
(default 16), so the server's work per request is the model's, not its HTTP handling. Printed per variant, beside its own figures:
  speed-up at the SLO   its highest throughput meeting the p99 SLO / fp32's (a step counts only when
                        the generator was healthy)
  saturation ratio      its saturation throughput / fp32's
  accuracy delta        its top-1 accuracy minus fp32's, in points
  memory, size ratios   what loading it took on the server, and its files on disk, / fp32's

    flock /tmp/bench.lock .venv/bin/python bench/compare_digits.py            # ~5 minutes
    flock /tmp/bench.lock .venv/bin/python bench/compare_digits.py --quick    # ~1 minute: one rate each

Needs two cores. Results: bench/results/compare_digits.json (and the compare folder it names).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("digits_cnn", "digits_cnn_fp16", "digits_cnn_bf16", "digits_cnn_int8", "digits_cnn_int8_static",
            "digits_cnn_onnx", "digits_cnn_onnx_int8", "digits_cnn_pruned50", "digits_cnn_pruned90", "digits_student")
BASELINE = "digits_cnn"


def _start_server(repository: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "servers.triton", "--http-port", "0", "--model-repository",
                             str(repository)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.sched_setaffinity(proc.pid, {1})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("the Triton-compatible server did not start")


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one open-loop run at --rate each, no sweep")
    parser.add_argument("--rate", type=float, default=300.0, help="--quick: the rate of each run")
    parser.add_argument("--slo-ms", type=float, default=5.0, help="the p99 SLO of the sweeps")
    parser.add_argument("--step-duration", default="3s")
    parser.add_argument("-b", "--batch-size", type=int, default=16,
                        help="digits a request carries: a digit costs the server microseconds, so with one a "
                             "request the generator's per-request cost would be measured, not the model")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores: the server on one, the generator on the other")
    work = Path(tempfile.mkdtemp(prefix="compare-digits-"))
    repository, out = work / "models", work / "compare"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "servers.models.make_repo", str(repository)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"make-repo: {time.monotonic() - started:.1f} s")
    proc, url = _start_server(repository)
    try:
        load = (["--rate", str(args.rate), "--duration", "10s"] if args.quick else
                ["--sweep", "--step-duration", args.step_duration, "--warmup", "1s"])
        command = [sys.executable, "-m", "loadgen", "compare", "--target", url, "--models", ",".join(VARIANTS),
                   "--input-data", str(repository / "_data" / "digits_test.json"),
                   "--labels", str(repository / "_data" / "digits_test_labels.json"),
                   "--model-repository", str(repository), "--slo", f"p99<{args.slo_ms:g}ms", *load,
                   "-b", str(args.batch_size),
                   "--out", str(out)]
        run = subprocess.Popen(command, cwd=ROOT)
        os.sched_setaffinity(run.pid, {0})
        run.wait()
    finally:
        proc.terminate()
        proc.wait(10)
    document = json.loads((out / "compare.json").read_text())
    models = {m["model"]: m for m in document["models"]}
    base = models[BASELINE]
    rate = "achieved_rps" if args.quick else "saturation_rps"
    print(f"\n{'variant':<24}{'acc':>8}{'d acc pt':>9}{'p99 ms':>9}{'sat/s':>9}{'x sat':>7}{'SLO/s':>9}{'x SLO':>7}"
          f"{'x mem':>7}{'x disk':>7}")
    rows = []
    for name in VARIANTS:
        m = models[name]
        if m["status"] != "ok":
            print(f"{name:<24}FAILED: {m['error']}")
            continue
        row = {
            "model": name, "accuracy": m["accuracy"],
            "accuracy_delta_points": round(100 * (m["accuracy"] - base["accuracy"]), 2),
            "p99_ms": m["latency_ms"]["p99"], "throughput_rps": m[rate],
            "throughput_ratio": _ratio(m[rate], base[rate]),
            "rps_meeting_slo": m.get("max_rps_meeting_slo"),
            "speedup_at_slo": _ratio(m.get("max_rps_meeting_slo"), base.get("max_rps_meeting_slo")),
            "memory_ratio": _ratio(m.get("memory_mb"), base.get("memory_mb")),
            "disk_ratio": _ratio(m.get("model_bytes"), base.get("model_bytes")),
            "generator_bound": m["generator_bound"],
        }
        rows.append(row)
        cells = [row["accuracy"], row["accuracy_delta_points"], row["p99_ms"], row["throughput_rps"],
                 row["throughput_ratio"], row["rps_meeting_slo"], row["speedup_at_slo"], row["memory_ratio"],
                 row["disk_ratio"]]
        text = "".join(f"{'-' if c is None else format(c, '.4g'):>{w}}"
                       for c, w in zip(cells, (8, 9, 9, 9, 7, 9, 7, 7, 7)))
        print(f"{name:<24}{text}" + ("  GENERATOR-BOUND" if row["generator_bound"] else ""))
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(),
              "quick": args.quick, "batch_size": args.batch_size, "slo_p99_ms": args.slo_ms, "rows": rows, "compare_folder": str(out)}
    (ROOT / "bench" / "results" / "compare_digits.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nload average {os.getloadavg()[0]:.1f} (a shared host moves every figure); "
          "results in bench/results/compare_digits.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
