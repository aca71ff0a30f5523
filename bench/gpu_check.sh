#!/usr/bin/env bash
# Versions, then the GPU tests (all of them take about 25 minutes on an H100: more than
# one 10-minute device call, so pass a -k expression to split them).
# Usage on the GPU machine: bash bench/gpu_check.sh [pytest -k expression]
set -uo pipefail
OUT=${OUT:-/tmp/flexjax_out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, 'triton', triton.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu tests -q ${1:+-k "$1"} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
