#!/usr/bin/env bash
# Ready for a GPU (issue 18, target 5): bench/gpu_check.py under a 5-minute limit, figures into $OUT when the
# device machine sets it (else /tmp). Without CUDA it prints that it skips and exits 0.
#   bench/gpu_check.sh [--no-compile] [--batch-size 128] ...      (arguments go to gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-${TMPDIR:-/tmp}}/gpu_check.json"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
timeout --signal=INT --kill-after=10 300 python3 bench/gpu_check.py --out "$out" "$@"
