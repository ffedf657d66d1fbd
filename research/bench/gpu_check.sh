#!/usr/bin/env bash
# The project's GPU check: gpu-marked tests + CUDA benchmarks at DeiT-Small layer sizes, one
# table. Skips cleanly (exit 0) without CUDA. Usage: bash research/bench/gpu_check.sh [--skip-tests]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" research/bench/gpu_check.py "$@"
