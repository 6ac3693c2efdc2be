#!/usr/bin/env bash
# Issue 7 item 4 on a lent GPU, as ONE device call (its 15 minutes include the machine's start):
#   device run: bash bench/gpu_run.sh          (timeout_s 540 leaves room for one rerun)
# 1. environment; 2. the CUDA tests (Triton kernel parity, CUDA-graph decode == eager reference);
# 3. bench/gpu_speed.py (HBM bandwidth, bench-medium graph/eager/transformers, one 300B layer at int4).
# Everything lands in $OUT (the device tool brings it back); copy gpu_speed.{json,md} to bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ernie45-gpu}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py -k cuda 2>&1 | tee "$OUT/pytest.txt"
timeout 330 python3 bench/gpu_speed.py --out "$OUT" 2>&1 | tee "$OUT/gpu_speed.log"
