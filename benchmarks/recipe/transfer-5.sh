#!/usr/bin/env bash
# The definition quiz's LoRA of E times the experts' rank (rank 32, alpha 64), 3 seeds: a third queue beside
# transfer-4.sh's two (one thread each).
. "$(dirname "$0")/cells.sh"
for seed in 42 1 2; do
  nice -n 10 python benchmarks/quality.py $(cell_args 2) --methods riemannian+sqrt --seeds $seed \
    --out-dir $R/wordnet-e1r32 $E1R32 > outputs/recipe/def-e1r32-$seed.log 2>&1
done
