#!/usr/bin/env bash
# One-call correctness check on this machine's GPU (scripts/gpu_check.py says what it checks and prints);
# `--smoke` runs the same checks tiny, on the CPU. Exits 1 if a check failed.
# Where the Python ($PYTHON, default python3) lacks deepspeed, the wheels of .gpu/whl (scripts/gpu_prepare.sh
# builds them on a machine with the project's venv) are installed into /tmp/moelora-site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  if [ ! -d .gpu/whl ]; then
    echo "deepspeed is not importable and .gpu/whl is missing: run 'bash scripts/gpu_prepare.sh' where the project's venv is"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moelora-site \
    .gpu/whl/*.whl 2>&1 | grep -v -i "warning" || true
  export PYTHONPATH=/tmp/moelora-site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/moelora-site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
