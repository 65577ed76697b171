# Sourced (`source scripts/gpu_env.sh`) on a GPU machine: where the Python ($PYTHON, default python3) lacks
# deepspeed, installs the wheels of .gpu/whl (scripts/gpu_prepare.sh builds them where the project's venv is)
# into /tmp/moelora-site, or uses that folder if an earlier call on the same machine filled it; then exports
# PYTHONPATH, PATH (the `deepspeed` launcher) and offline settings.
PY=${PYTHON:-python3}
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  if [ -d /tmp/moelora-site/deepspeed ]; then
    :
  elif [ ! -d .gpu/whl ]; then
    echo "deepspeed is not importable and .gpu/whl is missing: run 'bash scripts/gpu_prepare.sh' where the project's venv is"
    return 2 2>/dev/null || exit 2
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moelora-site \
      .gpu/whl/*.whl 2>&1 | grep -v -i "warning"
  fi
  export PYTHONPATH=/tmp/moelora-site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/moelora-site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
