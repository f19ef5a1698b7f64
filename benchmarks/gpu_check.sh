#!/usr/bin/env bash
# One short GPU check, under 5 minutes on one GPU. On the device machine, from the repository root:
#   bash benchmarks/gpu_check.sh [DATA_DIR]      # DATA_DIR holds cifar-10-batches-py/ (else synthetic data)
# Installs the package into the machine's Python if needed (no venv: the GPU machine brings its own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import ipasdctl" 2>/dev/null || python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
args=()
[ -n "${1:-}" ] && args=(--data "$1")
PYTHONUNBUFFERED=1 timeout 280 python3 benchmarks/gpu_check.py "${args[@]}"
