#!/usr/bin/env bash
# The transfer comparison's remaining cells, after the quickstart that runs first: the definition quiz's LoRA of the
# experts' rank (3 seeds) and the default's seed 42 in the 1-rank cell, then the hypernym quiz's rank-32 LoRA seeds 1
# and 2. Two queues, one thread each on the 2 cores.
. "$(dirname "$0")/cells.sh"
while pgrep -f "scripts/quickstart.sh" >/dev/null; do sleep 10; done
q() { log=$1; shift; nice -n 10 python benchmarks/quality.py $(cell_args 2) --methods riemannian+sqrt "$@" > "outputs/recipe/$log.log" 2>&1; }
rm -rf $R/wordnet-e1r8/*/running.pid
(
  q def-e1r8-42 --seeds 42 --out-dir $R/wordnet-e1r8 $E1R8
  q def-e1r8-2 --seeds 2 --out-dir $R/wordnet-e1r8 $E1R8
  q e1r32-1 --seeds 1 --out-dir $R/hypernyms-e1r32 $E1R32 $HYP
) &
sleep 20
(
  q def-e1r8-1 --seeds 1 --out-dir $R/wordnet-e1r8 $E1R8
  q def-default-42 --seeds 42 --out-dir $R/wordnet-aux0.01
  q e1r32-2 --seeds 2 --out-dir $R/hypernyms-e1r32 $E1R32 $HYP
) &
wait
