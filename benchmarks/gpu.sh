#!/usr/bin/env bash
# The GPU benchmark in one script: the engine's decode step (no HTTP) and the HTTP serving comparison
# (ours vs transformers generate() behind a lock vs one static generate() batch, same weights, plus the
# roofline) for a random-weight GPT-2-124M-shaped model in bfloat16 at up to 256 concurrent streams.
#
#   benchmarks/gpu.sh OUT_DIR
#
# Needs one CUDA device and torch with CUDA; installs nothing and reaches no network. The HTTP part also needs
# the service's dependencies (fastapi, uvicorn, httpx, ...); transformers is optional (without it the two
# baselines are reported as skipped). Each part has its own time limit; the whole stays under 8 minutes.
# Written for an H100/H200 class machine. The test suite dry-runs the plumbing on a CPU with tiny sizes:
#   DEVICE=cpu CONCURRENCY=1,2 BATCHES=1,2 OUTPUT_LEN=8 STATIC_BATCH=2 PRESET=tiny-gpt MODEL=shakespeare-gpt \
#     DTYPE=float32 benchmarks/gpu.sh OUT_DIR
set -uo pipefail
DEVICE=${DEVICE:-cuda}
CONCURRENCY=${CONCURRENCY:-1,8,32,64,128,256}
BATCHES=${BATCHES:-1,8,32,64,128,256}
OUTPUT_LEN=${OUTPUT_LEN:-128}
STATIC_BATCH=${STATIC_BATCH:-256}
PRESET=${PRESET:-gpt2-small}   # the engine-only benchmarks' model shape
MODEL=${MODEL:-gpt2-small}     # the HTTP benchmark's model
DTYPE=${DTYPE:-bfloat16}
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
work=${TMPDIR:-/tmp}/attnserve-bench-gpu  # random-weight checkpoints (~0.5 GB each): not results
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/gpu.log"; }

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA device visible to torch: nothing to measure"
  exit 1
fi
{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"; } \
  > "$out/device.txt" 2>&1
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["fastapi", "uvicorn", "httpx", "pydantic_settings", "prometheus_client", "tokenizers", "safetensors",
        "tqdm", "matplotlib", "numpy"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
"$PY" -c "import transformers" 2>/dev/null || log "transformers is not installed: the naive baselines will be skipped"

# 0. the CUDA-marked tests: graphs == eager, bf16 engine close to the float32 reference
if [ "$DEVICE" = cuda ]; then
  log "CUDA tests (pytest -m cuda)"
  timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests > "$out/cuda_tests.txt" 2>&1 \
    || log "CUDA tests failed or timed out (rc $?); see cuda_tests.txt"
fi

# 1. the engine without HTTP: one decode step per batch size (about a minute)
log "decode step (benchmarks.decode_step)"
timeout 90 "$PY" -m benchmarks.decode_step --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCHES" --preset "$PRESET" --steps "$OUTPUT_LEN" \
  --json "$out/decode_step.json" > "$out/decode_step.txt" 2>&1 || log "decode_step failed or timed out (rc $?)"

# 2. the continuous-batching engine without HTTP, GPT-2 small shape
log "engine benchmark (benchmarks.engine_bench)"
timeout 120 "$PY" -m benchmarks.engine_bench --device "$DEVICE" --preset "$PRESET" --dtype "$DTYPE" \
  --batch-sizes "$BATCHES" --output-len "$OUTPUT_LEN" --no-progress --json "$out/engine_bench.json" \
  > "$out/engine_bench.txt" 2>&1 || log "engine_bench failed or timed out (rc $?)"

# 3. HTTP: our server vs the baselines, GPT-2 small shape, bf16, 1..256 streams of 32 in / 128 out (llama.cpp's
# server, the CPU peer of `make bench`, is a CPU build: off here, also in the CPU dry run, which would build it)
if [ -n "$missing" ]; then
  log "skipping the HTTP benchmark: missing Python packages: $missing"
else
  log "HTTP serving benchmark (benchmarks.run_cpu --device $DEVICE)"
  timeout 250 "$PY" -m benchmarks.run_cpu --device "$DEVICE" --models "$MODEL" --dtypes "$DTYPE" --no-llama-cpp \
    --concurrency "$CONCURRENCY" --naive-concurrency 1 --static-batch "$STATIC_BATCH" --output-len "$OUTPUT_LEN" \
    --budget-s 220 \
    --work-dir "$work" --out "$out/http" > "$out/http.txt" 2> "$out/http.log" \
    || log "HTTP benchmark failed or timed out (rc $?); see http.log"
fi
log "done; results in $out"
