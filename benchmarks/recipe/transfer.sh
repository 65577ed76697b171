#!/usr/bin/env bash
# Transfer comparison (RESULTS.md `recipe`): the default against one LoRA of the experts' rank (E=1 r8), one of E
# times it (E=1 r32, alpha 64) and MoE-LoRA without the preconditioner (plain AdamW), 3 seeds, on the hypernym quiz
# and the definition quiz; 1 rank of 16, ZeRO-0, bf16, 150 steps, first 200 questions. Two queues, a core each.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p outputs/recipe
HYP="--data.train_path=data/wordnet-hypernyms/train.jsonl --data.eval_path=data/wordnet-hypernyms/test.jsonl"
CELL="--optimizers adamw --adamw-rates 2e-3 --steps 150 --num-ranks 1 --parallel 1 --micro-batch-size 16 --deepspeed=ds_configs/zero0.json --model.dtype=bfloat16 --section none --results /tmp/none.md --plot /tmp/none.png"
E1R8="--moelora.num_experts=1 --moelora.top_k=null"
E1R32="$E1R8 --moelora.rank=32 --moelora.alpha=64"
R=benchmarks/recipe
q() { core=$1; shift; nice -n 10 taskset -c "$core" python benchmarks/quality.py $CELL "$@"; }
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
