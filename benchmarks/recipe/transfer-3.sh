#!/usr/bin/env bash
# The definition quiz's LoRA arm (one LoRA of rank 8, 3 seeds at once, one thread each) and the default's seed 42
# in the same 1-rank cell, for the transfer comparison's other task.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CELL="--optimizers adamw --adamw-rates 2e-3 --steps 150 --num-ranks 1 --parallel 2 --micro-batch-size 16 --deepspeed=ds_configs/zero0.json --model.dtype=bfloat16 --section none --results /tmp/none.md --plot /tmp/none.png"
R=benchmarks/recipe
q() { nice -n 10 python benchmarks/quality.py $CELL --methods riemannian+sqrt "$@"; }
for seed in 42 1 2; do q --seeds $seed --out-dir $R/wordnet-e1r8 --moelora.num_experts=1 --moelora.top_k=null > outputs/recipe/def-e1r8-$seed.log 2>&1 & sleep 20; done
wait
q --seeds 42 --out-dir $R/wordnet-aux0.01 > outputs/recipe/def-default-42.log 2>&1
