#!/usr/bin/env bash
# The default's definition-quiz seeds 1 and 2 again, once transfer-4/5.sh are done, now that expert_health.json
# records each layer's longest run of collapsed steps: how close a 1-rank cell comes to the alarm's patience of 20.
# The earlier cells of the same seeds are kept beside the new ones for comparison (outputs/recipe/earlier-*).
. "$(dirname "$0")/cells.sh"
while pgrep -f "benchmarks/quality.py" >/dev/null; do sleep 10; done
for seed in 1 2; do
  cell=$R/wordnet-aux0.01/adamw-ours-riemannian+sqrt-lr0.002-seed$seed
  [ -f $cell/result.json ] && ! grep -q longest_collapsed_intervals $cell/expert_health.json && \
    rm -rf outputs/recipe/earlier-seed$seed && mv $cell outputs/recipe/earlier-seed$seed
  nice -n 10 python benchmarks/quality.py $(cell_args 2) --methods riemannian+sqrt --seeds $seed \
    --out-dir $R/wordnet-aux0.01 > outputs/recipe/def-default-$seed.log 2>&1 &
  sleep 20
done
wait
