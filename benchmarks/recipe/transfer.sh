#!/usr/bin/env bash
# Transfer comparison (RESULTS.md `recipe`): the default against one LoRA of the experts' rank (E=1 r8), one of E
# times it (E=1 r32, alpha 64) and MoE-LoRA without the preconditioner (plain AdamW), 3 seeds, on the hypernym quiz
# and the definition quiz. Two queues, a core each.
. "$(dirname "$0")/cells.sh"
q() { core=$1; shift; nice -n 10 taskset -c "$core" python benchmarks/quality.py $(cell_args 1) "$@"; }
(
  q 0 --methods riemannian+sqrt --seeds 42 1 2 --out-dir $R/hypernyms-default $HYP
  q 0 --methods riemannian+sqrt --seeds 42 1 2 --out-dir $R/hypernyms-e1r8 $E1R8 $HYP
  q 0 --methods riemannian+sqrt --seeds 42 1 2 --out-dir $R/wordnet-e1r8 $E1R8
) > outputs/recipe/transfer-core0.log 2>&1 &
(
  q 1 --methods plain --seeds 42 1 2 --out-dir $R/hypernyms-plain $HYP
  q 1 --methods riemannian+sqrt --seeds 42 1 2 --out-dir $R/hypernyms-e1r32 $E1R32 $HYP
  q 1 --methods riemannian+sqrt --seeds 42 --out-dir $R/wordnet-aux0.01
  q 1 --methods riemannian+sqrt --seeds 42 1 2 --out-dir $R/wordnet-e1r32 $E1R32
) > outputs/recipe/transfer-core1.log 2>&1 &
wait
