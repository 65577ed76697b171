#!/usr/bin/env bash
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
while pgrep -f "out-dir benchmarks/recipe/wordnet-aux0.01-noise0.3" >/dev/null; do sleep 5; done
HYP="--data.train_path=data/wordnet-hypernyms/train.jsonl --data.eval_path=data/wordnet-hypernyms/test.jsonl"
CELL="--optimizers adamw --adamw-rates 2e-3 --steps 150 --num-ranks 1 --parallel 2 --micro-batch-size 16 --deepspeed=ds_configs/zero0.json --model.dtype=bfloat16 --section none --results /tmp/none.md --plot /tmp/none.png"
Q="nice -n 10 python benchmarks/quality.py $CELL"
E1="--moelora.num_experts=1 --moelora.top_k=null"
nice -n 10 deepspeed --num_gpus 1 launcher/eval.py --config launcher/configs/quickstart.yaml $HYP --data.eval_max_samples=200 --json-out benchmarks/recipe/hypernyms-base.json > outputs/recipe/hypernyms-base.log 2>&1 &
nice -n 10 deepspeed --num_gpus 1 --master_port 29777 launcher/eval.py --config launcher/configs/quickstart.yaml --data.eval_max_samples=200 --json-out benchmarks/recipe/wordnet-base.json > outputs/recipe/wordnet-base.log 2>&1
wait
# the hypernym quiz's arms: transfer.sh
