#!/usr/bin/env bash
# The prepared GPU check (issues 11 and 20): the paper model's training and inference figures on one
# GPU, one JSON line each, from synthetic data of the real shapes; then the replay's exactness under
# CUDA autocast (kept boxes of the model's heads against the CPU replay) and the CUDA tests. Needs only
# the repo and a CUDA PyTorch (mlflow and optuna are not imported). Finishes within 8 minutes; without
# CUDA it says so and exits 0.
#   bash bench/device.sh [--steps 20] [--iters 8]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 330 "$PY" bench/gpu.py --config experiments/paper-norm.yaml "$@" || exit $?
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  PYTHONPATH=. timeout 90 "$PY" bench/replay_exactness.py --cases 400 --device cuda
  if "$PY" -c "import pytest" 2>/dev/null; then
    PYTHONPATH=. timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py --noconftest
  else
    PYTHONPATH=. timeout 60 "$PY" tests/test_gpu.py
  fi
fi
# Whole slides (issue 24): the paper model's megapixels/s through the slide path on one GPU, where
# the machine has the project's dependencies and the slides extra (mlflow, openslide-bin, tiffslide).
if "$PY" -c "import torch, mlflow, openslide, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PYTHONPATH=. timeout 240 "$PY" bench/slides.py --config experiments/paper-norm.yaml --device cuda --fields 8 \
    --skip-memory --skip-ray
else
  echo '{"figure": "slides", "skipped": "needs CUDA, mlflow and the slides extra"}'
fi
