#!/usr/bin/env bash
# One-call correctness check on this machine's GPU (scripts/gpu_check.py says what it checks and prints);
# `--smoke` runs the same checks tiny, on the CPU. Exits 1 if a check failed. scripts/gpu_env.sh installs
# the wheels of .gpu/ first where the Python ($PYTHON, default python3) lacks deepspeed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh || exit 2
exec "$PY" scripts/gpu_check.py "$@"
