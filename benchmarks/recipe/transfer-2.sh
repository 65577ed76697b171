#!/usr/bin/env bash
# The transfer comparison's LoRA arms, after transfer.sh's default and plain arms: the three seeds of one LoRA of the
# experts' rank at once (one thread each on the 2 cores), then one of E times it (seed 42).
. "$(dirname "$0")/cells.sh"
while pgrep -f "out-dir benchmarks/recipe/hypernyms-(default|plain)" >/dev/null; do sleep 10; done
q() { nice -n 10 python benchmarks/quality.py $(cell_args 2) --methods riemannian+sqrt "$@" $HYP; }
for seed in 42 1 2; do q --seeds $seed --out-dir $R/hypernyms-e1r8 $E1R8 > outputs/recipe/e1r8-$seed.log 2>&1 & sleep 20; done
wait
q --seeds 42 --out-dir $R/hypernyms-e1r32 $E1R32 > outputs/recipe/e1r32-42.log 2>&1
