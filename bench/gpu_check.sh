#!/usr/bin/env bash
# The one device check: the reference servers on CUDA, a short compare and sweep, the GPU metrics.
#
#   bash bench/gpu_check.sh                 # on the device machine (a bare one: it installs what it needs)
#   QUICK=1 bash bench/gpu_check.sh         # the same steps, shorter (and how it is tried on a CPU host)
#
# Steps, each printed with its figures, all results under $OUT (default: a temp folder):
#   1. the host: nvidia-smi, torch's CUDA view, NVML through the servers' own reader;
#   2. make-repo (digits variants, no MiniLM), the Triton-compatible server on it with its metrics port:
#      KIND_AUTO models load onto cuda:0 when there is a GPU (the model statistics say where);
#   3. `loadgen compare --sweep` of the fp32 / fp16 / bf16 / ONNX / student variants with --server-metrics
#      and --cost-per-hour: saturation, p99 at the knee, GPU memory, energy (NVML) and $ per million;
#   4. `loadgen sweep` of digits_cnn_fp16 with an SLO, its curve and verdict;
#   5. the server's nv_gpu_* and nv_energy_consumption lines after the runs.
# Without a GPU every step still runs (on CPU) and step 1 says so: the script is checked that way on
# a CPU host, so a device session spends its minutes measuring, not debugging.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
QUICK="${QUICK:-0}"
PY="${PYTHON:-}"
STEP_S=3s; WARMUP=1s; VARIANTS=digits_cnn,digits_cnn_fp16,digits_cnn_bf16,digits_cnn_onnx,digits_student
[ "$QUICK" = 1 ] && { STEP_S=1s; WARMUP=0.5s; VARIANTS=digits_cnn,digits_cnn_fp16,digits_student; }

say() { printf '\n== %s\n' "$*"; }

if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else
    say "installing loadgen (a bare machine): pip install -e '.[test]'"
    python3 -m venv "$OUT/venv" && PY="$OUT/venv/bin/python"
    WHEELS=(); [ -d .wheels ] && WHEELS=(--find-links .wheels)
    "$PY" -m pip install -q "${WHEELS[@]}" -e '.[test]' nvidia-ml-py || { echo "install failed"; exit 2; }
  fi
fi

say "1. host"
nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" \
  || echo "no nvidia-smi: a CPU host"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/host.txt"
import torch
from servers.core.gpu import GpuSampler
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      "devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0))
sampler = GpuSampler()
print("NVML:", sampler.read() if sampler.available else sampler.unavailable_reason)
EOF

say "2. make-repo and the Triton-compatible server"
"$PY" -m servers.models.make_repo "$OUT/models" --no-minilm > "$OUT/make_repo.txt" 2>&1 || { cat "$OUT/make_repo.txt"; exit 1; }
"$PY" -m servers.triton --model-repository "$OUT/models" --http-port 0 --metrics-port 0 > "$OUT/server.txt" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
URL=""; METRICS=""
for _ in $(seq 1 240); do
  URL=$(sed -n 's/^listening on //p' "$OUT/server.txt" | head -1)
  METRICS=$(sed -n 's/^metrics listening on //p' "$OUT/server.txt" | head -1)
  [ -n "$METRICS" ] && METRICS="$METRICS/metrics"
  [ -n "$URL" ] && break
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/server.txt"; exit 1; }
  sleep 0.5
done
[ -n "$URL" ] || { echo "the server did not start"; cat "$OUT/server.txt"; exit 1; }
echo "server $URL, metrics ${METRICS:-none}"
"$PY" - "$URL" <<'EOF' | tee "$OUT/placement.txt"
import sys, httpx
stats = httpx.get(sys.argv[1] + "/v2/models/stats", timeout=10).json()
for model in stats.get("model_stats", []):
    usage = {u["kind"]: u["byte_size"] for u in model.get("memory_usage", [])}
    print(f"{model['name']:<26} memory_usage {usage or 'not loaded yet'}")
EOF

say "3. compare --sweep"
DATA="$OUT/models/_data"
"$PY" -m loadgen compare --target "$URL" --models "$VARIANTS" --sweep --step-duration "$STEP_S" --warmup "$WARMUP" \
  --input-data "$DATA/digits_test.json" --labels "$DATA/digits_test_labels.json" \
  --model-repository "$OUT/models" ${METRICS:+--server-metrics "$METRICS" --cost-per-hour 2.5} \
  --slo "p99<5ms" --out "$OUT/compare" 2>&1 | tail -25
"$PY" -m loadgen report "$OUT/compare" > /dev/null 2>&1 && echo "report: $OUT/compare/report.html"

say "4. sweep of digits_cnn_fp16"
"$PY" -m loadgen sweep --target "$URL" --model digits_cnn_fp16 --input-data "$DATA/digits_test.json" \
  --step-duration "$STEP_S" --warmup "$WARMUP" --slo "p99<5ms" ${METRICS:+--server-metrics "$METRICS"} \
  --out "$OUT/sweep" 2>&1 | tail -15

say "5. GPU metrics after the runs"
if [ -n "$METRICS" ]; then
  "$PY" -c "import httpx,sys; print(httpx.get(sys.argv[1], timeout=10).text)" "$METRICS" \
    | grep -E '^nv_(gpu|energy)|^nv_inference_(count|compute_infer_duration_us)' | tee "$OUT/gpu_metrics.txt" | head -40
  [ -s "$OUT/gpu_metrics.txt" ] || echo "no nv_gpu_* lines: no GPU seen by NVML"
fi
echo; echo "results in $OUT"
