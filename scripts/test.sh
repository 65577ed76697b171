#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite, multi-rank, SLURM and MPI tests included.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
python -c "import os, torch; print(f'torch CPU capability: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores')"
# Test files run in parallel, one process per core up to 4 (pytest-xdist; a file's tests stay in one process, so
# its fixtures exist once; tests/conftest.py groups them): most of a multi-rank test is start-up and waiting.
cores=$(nproc)
python -m pytest -q -n "$(( cores < 4 ? cores : 4 ))" --dist loadgroup --no-loadscope-reorder "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "WARNING: pytest collected no tests (exit 5)"; exit 0; fi
exit "$rc"
