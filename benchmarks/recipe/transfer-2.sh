#!/usr/bin/env bash
# The transfer comparison's LoRA arms, after transfer.sh's default and plain arms: the three seeds of one LoRA of the
# experts' rank at once (one thread each on the 2 cores), then one of E times it (seed 42).
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
while pgrep -f "out-dir benchmarks/recipe/hypernyms-(default|plain)" >/dev/null; do sleep 10; done
HYP="--data.train_path=data/wordnet-hypernyms/train.jsonl --data.eval_path=data/wordnet-hypernyms/test.jsonl"
CELL="--optimizers adamw --adamw-rates 2e-3 --steps 150 --num-ranks 1 --parallel 2 --micro-batch-size 16 --deepspeed=ds_configs/zero0.json --model.dtype=bfloat16 --section none --results /tmp/none.md --plot /tmp/none.png"
E1R8="--moelora.num_experts=1 --moelora.top_k=null"
R=benchmarks/recipe
q() { nice -n 10 python benchmarks/quality.py $CELL --methods riemannian+sqrt "$@" $HYP; }
for seed in 42 1 2; do q --seeds $seed --out-dir $R/hypernyms-e1r8 $E1R8 > outputs/recipe/e1r8-$seed.log 2>&1 & sleep 20; done
wait
q --seeds 42 --out-dir $R/hypernyms-e1r32 $E1R8 --moelora.rank=32 --moelora.alpha=64 > outputs/recipe/e1r32-42.log 2>&1
