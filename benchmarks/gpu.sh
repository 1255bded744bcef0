#!/usr/bin/env bash
# The accelerator benchmark in one call (benchmarks/gpu_suite.py says what it measures), for a short GPU lease:
#   bash benchmarks/gpu.sh [OUTDIR]          # on a CUDA machine with jax[cuda] and torch installed; under 8 minutes
#   bash benchmarks/gpu.sh OUTDIR --toy      # the same at toy sizes, on any machine (how the tests check it)
# Writes OUTDIR/gpu.jsonl (JSON lines) and OUTDIR/gpu.md (the lines' table), and prints both.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_bench}"
shift || true
mkdir -p "$out"
PYTHON="${PYTHON:-python}"
"$PYTHON" - <<'PY'
import jax, torch
print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}) x {jax.device_count()}; "
      f"torch {torch.__version__}, cuda {'yes' if torch.cuda.is_available() else 'no'}", flush=True)
PY
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 470 "$PYTHON" -m benchmarks.gpu_suite --output="$out/gpu.jsonl" "$@" | tee "$out/gpu.log"
grep '^|' "$out/gpu.log" > "$out/gpu.md" || true
