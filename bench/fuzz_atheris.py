"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that read untrusted bytes, a few minutes each.

tests/test_fuzz.py checks the same properties with hypothesis on every `make test` (a bounded number of
examples around valid inputs). This hunt goes further: libFuzzer mutates towards new coverage of the
instrumented parser code for as long as it is given, and any input that makes a target raise anything
but the protocol's own error, or take longer than --timeout-s, is a finding written to the results folder.

Targets (each starts from the valid inputs in SEEDS):
  http1   the servers' HTTP/1.1 request parser (servers/core/http1.py), fed in pieces the input chooses;
          only HttpError (4xx/5xx) may escape
  infer   the KServe v2 infer decoder, JSON and binary tensor extension (servers/triton/_tensors.py),
          with the Inference-Header-Content-Length the input chooses; only InferError may escape
  sse     the generator's SSE parser (loadgen/protocols/openai.py SseStream), fed in pieces; nothing may
          escape, and every byte is counted
  trace   the trace reader (loadgen/patterns/trace.py), every format; only TraceError may escape

    .venv/bin/python -m pip install atheris            # or: pip install -e '.[bench]'
    flock /tmp/test.lock .venv/bin/python bench/fuzz_atheris.py                  # 60 s a target
    flock /tmp/test.lock .venv/bin/python bench/fuzz_atheris.py --seconds 600 --only http1,infer

Prints, per target: executions, executions/s, coverage (libFuzzer's cov/ft), findings; exit 1 on any
finding. Writes bench/results/fuzz_atheris.json; findings (and the corpus grown) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TARGETS = ("http1", "infer", "sse", "trace")

SEEDS: dict[str, list[bytes]] = {
    "http1": [
        (b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 17\r\n\r\n{\"inputs\": [1,2]}"),
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    ],
    "infer": [
        (b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": '
        b'[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}'),
        b'{"id": "1", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], '
        b'"parameters": {"binary_data_size": 64}}], "outputs": [{"name": "OUTPUT0", '
        b'"parameters": {"binary_data": true}}]}' + bytes(64),
        b'{"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [2], "data": ["ab", "c"]}]}',
    ],
    "sse": [
        (b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n: ping\n\n'
        b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n'),
        b'event: error\r\ndata: {"error": {"message": "x"}}\r\n\r\n',
    ],
    "trace": [
        b'{"timestamp": 0, "input_tokens": 3, "output_tokens": 5}\n{"timestamp": 0.5, "model": "m"}\n',
        (b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
        b"2023-11-16 18:15:50.9951690,396,109\n"),
        b'{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]}\n',
        b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,ChatGPT,472,18,490,Conversation log\n",
    ],
}


# ---- the child: one target under atheris ----------------------------------------------------------------

def _pieces(provider, data: bytes) -> list[bytes]:
    cuts = [provider.ConsumeIntInRange(1, 64) for _ in range(provider.ConsumeIntInRange(0, 8))]
    out, position = [], 0
    for size in cuts:
        out.append(data[position:position + size])
        position += size
    out.append(data[position:])
    return out


def _target(name: str, scratch: Path):
    import atheris

    with atheris.instrument_imports(include=["servers", "loadgen"]):
        if name == "http1":
            from servers.core.http1 import HttpError, RequestParser
        elif name == "infer":
            from servers.models.builtin import builtin_models
            from servers.triton._infer import InferError
            from servers.triton._tensors import parse_infer
        elif name == "sse":
            from loadgen.protocols.openai import SseStream
        else:
            from loadgen.patterns.trace import TraceError, read_trace

    if name == "http1":
        def run(data: bytes) -> None:
            provider = atheris.FuzzedDataProvider(data[:64])
            parser = RequestParser()
            parser.accepts_chunked = bool(data[:1]) and data[0] & 1 == 1
            try:
                for piece in _pieces(provider, data[64:]):
                    parser.feed(piece)
                    while parser.next_request() is not None:
                        pass
            except HttpError as exc:
                if not 400 <= exc.status < 600:
                    raise AssertionError(f"HttpError with status {exc.status}") from exc
    elif name == "infer":
        models = builtin_models()
        names = ["identity", "identity_bytes", "mlp"]

        def run(data: bytes) -> None:
            provider = atheris.FuzzedDataProvider(data[:8])
            model = models[names[provider.ConsumeIntInRange(0, len(names) - 1)]]
            header_kind = provider.ConsumeIntInRange(0, 2)
            body = data[8:]
            header = None if header_kind == 0 else str(provider.ConsumeIntInRange(0, len(body) + 4)) \
                if header_kind == 1 else provider.ConsumeUnicodeNoSurrogates(4)
            try:
                request = parse_infer(body, header, model)
            except InferError:
                return
            if not request.inputs or request.batch_size < 1:
                raise AssertionError("a decoded request without inputs or with batch size < 1")
    elif name == "sse":
        def run(data: bytes) -> None:
            provider = atheris.FuzzedDataProvider(data[:32])
            sse = SseStream(keep_text=True)
            body = data[32:]
            for k, piece in enumerate(_pieces(provider, body)):
                sse.feed(piece, float(k))
            if sse.body_bytes != len(body) or sse.output_tokens < 0 or sse.token_times != sorted(sse.token_times):
                raise AssertionError("SSE counts do not add up")
    else:
        formats = ["auto", "jsonl", "csv", "azure", "mooncake", "burstgpt"]
        path = scratch / "trace.txt"

        def run(data: bytes) -> None:
            fmt = formats[data[0] % len(formats)] if data else "auto"
            path.write_bytes(data[1:])
            try:
                trace = read_trace(path, fmt)
            except TraceError as exc:
                if not exc.problems:
                    raise AssertionError("a TraceError naming no problem") from exc
                return
            if len(trace) == 0 or not (trace.times_s[1:] >= trace.times_s[:-1]).all():
                raise AssertionError("a trace read with no rows or out of time order")
    return run


def child(name: str, seconds: int, timeout_s: int, out: Path) -> None:
    import atheris

    corpus = out / name / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for k, seed in enumerate(SEEDS[name]):
        prefix = bytes(64 if name == "http1" else 8 if name == "infer" else 32 if name == "sse" else 1)
        (corpus / f"seed-{k}").write_bytes(prefix + seed)
    run = _target(name, out / name)
    argv = [sys.argv[0], f"-max_total_time={seconds}", f"-timeout={timeout_s}", "-print_final_stats=1",
            f"-artifact_prefix={out / name}/", "-rss_limit_mb=4096", str(corpus)]
    atheris.Setup(argv, run)
    atheris.Fuzz()


# ---- the parent: each target in turn, its figures read from libFuzzer's stats -------------------------

def _stat(text: str, key: str) -> int | None:
    match = re.search(rf"stat::{key}:\s+(\d+)", text)
    return int(match.group(1)) if match else None


def hunt(name: str, seconds: int, timeout_s: int, out: Path) -> dict:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--seconds", str(seconds),
                           "--timeout-s", str(timeout_s), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=seconds + 120, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          check=False)
    wall = time.monotonic() - started
    log = proc.stdout + proc.stderr
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "fuzz.log").write_text(log)
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", log)
    findings = sorted(str(p) for p in (out / name).glob("*")
                      if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    executions = _stat(log, "number_of_executed_units")
    return {"target": name, "seconds": seconds, "wall_s": round(wall, 1), "exit_code": proc.returncode,
            "executions": executions, "executions_per_s": _stat(log, "average_exec_per_sec"),
            "coverage": int(coverage[-1][0]) if coverage else None,
            "features": int(coverage[-1][1]) if coverage else None,
            "corpus_files": len(list((out / name / "corpus").glob("*"))), "findings": findings,
            "ok": proc.returncode == 0 and not findings and executions is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    parser.add_argument("--timeout-s", type=int, default=2, help="an input taking longer is a finding (a hang)")
    parser.add_argument("--only", help=f"comma-separated targets out of {','.join(TARGETS)}")
    parser.add_argument("--out", type=Path, help="folder for corpora, logs and findings (default: a temp folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fuzz-atheris-"))).resolve()
    if args.child:
        child(args.child, args.seconds, args.timeout_s, out)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: .venv/bin/python -m pip install atheris", file=sys.stderr)
        return 2
    targets = args.only.split(",") if args.only else list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"--only: unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    results = []
    print(f"{'target':<8} {'seconds':>7} {'executions':>11} {'exec/s':>8} {'cov':>6} {'ft':>6} {'corpus':>6}  result")
    for name in targets:
        result = hunt(name, args.seconds, args.timeout_s, out)
        results.append(result)
        verdict = "ok" if result["ok"] else f"FINDINGS: {', '.join(result['findings']) or 'exit ' + str(result['exit_code'])}"
        print(f"{name:<8} {args.seconds:>7} {result['executions'] or 0:>11} {result['executions_per_s'] or 0:>8} "
              f"{result['coverage'] or 0:>6} {result['features'] or 0:>6} {result['corpus_files']:>6}  {verdict}",
              flush=True)
    (BENCH / "results").mkdir(exist_ok=True)
    path = BENCH / "results" / "fuzz_atheris.json"
    path.write_text(json.dumps({"out": str(out), "targets": results}, indent=2) + "\n")
    print(f"logs, corpora and findings under {out}; written to {path}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
