#!/usr/bin/env bash
# Cells of the quality sweep (benchmarks/quality.py) on a GPU machine, with the real SmolLM2 model, whose GGUF file
# does not travel in one call: scripts/gpu_prepare.sh splits it into .gpu-model1/, .gpu-model2/, ... and prints
# what each call carries. One call per part, back to back (files under /tmp stay while the machine is held):
#   bash scripts/gpu_sweep.sh stage               keeps the parts brought along in $GPU_STAGE and installs
#                                                 .gpu/'s wheels (scripts/gpu_env.sh)
#   bash scripts/gpu_sweep.sh run SECONDS ARGS... stages, joins the parts (SHA-256 checked), converts the model once,
#                                                 runs `benchmarks/quality.py ARGS` on that model for at most SECONDS
#                                                 and packs the cells it finished into $OUT/cells.tar.gz
# ARGS name the cells and their --out-dir (benchmarks/quality_sweep: its committed cells are skipped). Back here:
#   tar -xzf cells.tar.gz --skip-old-files        (from the repository root; cells finished here are kept)
# GPU_STAGE (default /tmp/moelora-model) and GPU_PARTS (default the repository root) are for the CPU-side test.
set -uo pipefail
cd "$(dirname "$0")/.."
stage_dir=${GPU_STAGE:-/tmp/moelora-model}
parts_root=${GPU_PARTS:-.}
out=${OUT:-outputs}

stage() {
  mkdir -p "$stage_dir"
  local found=0 f
  for f in "$parts_root"/.gpu-model[0-9]*/*; do
    [ -f "$f" ] || continue
    cp "$f" "$stage_dir/" && found=$((found + 1))
  done
  echo "[gpu_sweep] staged $found file(s); $stage_dir holds: $(cd "$stage_dir" && ls | tr '\n' ' ')"
}

join_model() {
  local sums="$stage_dir/SHA256SUMS" name parts
  [ -f "$sums" ] || { echo "[gpu_sweep] $sums missing: bring .gpu-model1/ (scripts/gpu_prepare.sh)" >&2; return 2; }
  name=$(awk '{print $2}' "$sums")
  parts=$(cd "$stage_dir" && ls "$name".part* 2>/dev/null | sort -V)
  [ -n "$parts" ] || { echo "[gpu_sweep] no parts of $name in $stage_dir" >&2; return 2; }
  (cd "$stage_dir" && cat $parts > "$name.joining" && mv "$name.joining" "$name")
  if ! (cd "$stage_dir" && sha256sum --quiet -c SHA256SUMS); then
    echo "[gpu_sweep] $name joined from [$(echo $parts)] fails its SHA-256: a part is missing or damaged;" \
      "bring every .gpu-model*/ folder scripts/gpu_prepare.sh printed" >&2
    rm -f "$stage_dir/$name"
    return 2
  fi
  echo "[gpu_sweep] joined $name from $(echo "$parts" | wc -l) part(s), SHA-256 verified"
}

case ${1:-} in
  stage)
    stage && source scripts/gpu_env.sh
    ;;
  join)
    stage && join_model
    ;;
  run)
    seconds=${2:?usage: gpu_sweep.sh run SECONDS QUALITY_ARGS...}
    shift 2
    stage && join_model || exit 2
    source scripts/gpu_env.sh || exit 2
    name=$(awk '{print $2}' "$stage_dir/SHA256SUMS")
    model=("--model.name_or_path=$stage_dir" "--model.gguf_file=$name")
    mkdir -p data/wordnet "$out"
    for f in .gpu/data/*.jsonl; do [ -f "data/wordnet/$(basename "$f")" ] || cp "$f" data/wordnet/; done
    "$PY" -c "import sys; from moelora_ds.config import ModelConfig; from moelora_ds.models.loading import local_model_dir
print('[gpu_sweep] model:', local_model_dir(ModelConfig(name_or_path=sys.argv[1], gguf_file=sys.argv[2])))" \
      "$stage_dir" "$name" || exit 2
    marker=$(mktemp)
    started=$(date +%s)
    timeout --signal=TERM "$seconds" "$PY" benchmarks/quality.py "$@" "${model[@]}"
    rc=$?
    echo "[gpu_sweep] driver ended after $(($(date +%s) - started)) s (exit $rc$([ $rc = 124 ] && echo ", time up"))"
    cells=outputs/bench-quality
    while [ $# -gt 0 ]; do
      case $1 in --out-dir) cells=${2:-$cells}; shift ;; --out-dir=*) cells=${1#--out-dir=} ;; esac
      shift
    done
    mapfile -t finished < <(find "$cells" -name result.json -newer "$marker" | sort)
    files=()
    for result in "${finished[@]}"; do
      for f in result.json metrics.jsonl expert_health.json train.log; do
        [ -f "$(dirname "$result")/$f" ] && files+=("$(dirname "$result")/$f")
      done
    done
    if [ ${#files[@]} -gt 0 ]; then
      tar -czf "$out/cells.tar.gz" "${files[@]}"
    fi
    echo "[gpu_sweep] ${#finished[@]} cell(s) finished; packed into $out/cells.tar.gz:"
    printf '  %s\n' "${finished[@]}"
    ;;
  *)
    echo "usage: bash scripts/gpu_sweep.sh stage | join | run SECONDS QUALITY_ARGS..." >&2
    exit 2
    ;;
esac
