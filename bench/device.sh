#!/usr/bin/env bash
# The prepared GPU check (issue 11): the paper model's training and inference figures on one GPU,
# one JSON line each, from synthetic data of the real shapes. Needs only the repo and a CUDA PyTorch
# (mlflow and optuna are not imported). Finishes within 8 minutes; without CUDA it says so, exits 0.
#   bash bench/device.sh [--steps 20] [--iters 8]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec timeout 480 "$PY" bench/gpu.py --config experiments/paper-norm.yaml "$@"
