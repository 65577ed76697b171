#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite, multi-rank, SLURM and MPI tests included.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
python -c "import os, torch; print(f'torch CPU capability: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores')"
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "WARNING: pytest collected no tests (exit 5)"; exit 0; fi
exit "$rc"
