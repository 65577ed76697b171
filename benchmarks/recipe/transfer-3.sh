#!/usr/bin/env bash
# The definition quiz's LoRA arm (one LoRA of rank 8, 3 seeds at once, one thread each) and the default's seed 42
# in the same 1-rank cell, for the transfer comparison's other task.
. "$(dirname "$0")/cells.sh"
q() { nice -n 10 python benchmarks/quality.py $(cell_args 2) --methods riemannian+sqrt "$@"; }
for seed in 42 1 2; do q --seeds $seed --out-dir $R/wordnet-e1r8 $E1R8 > outputs/recipe/def-e1r8-$seed.log 2>&1 & sleep 20; done
wait
q --seeds 42 --out-dir $R/wordnet-aux0.01 > outputs/recipe/def-default-42.log 2>&1
