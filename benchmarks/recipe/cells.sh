# Sourced by the recipe's run scripts: repository root, venv, offline, the hypernym quiz's paths, the LoRA arms'
# overrides (E1R8, E1R32), and
# `cell_args N`, the benchmarks/quality.py arguments of a recipe cell (1 rank of 16, ZeRO-0, bf16, 150 steps, lr 2e-3)
# with N cells at once.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p outputs/recipe
R=benchmarks/recipe
HYP="--data.train_path=data/wordnet-hypernyms/train.jsonl --data.eval_path=data/wordnet-hypernyms/test.jsonl"
E1R8="--moelora.num_experts=1 --moelora.top_k=null"
E1R32="$E1R8 --moelora.rank=32 --moelora.alpha=64"
cell_args() {
  echo "--optimizers adamw --adamw-rates 2e-3 --steps 150 --num-ranks 1 --parallel $1 --micro-batch-size 16" \
       "--deepspeed=ds_configs/zero0.json --model.dtype=bfloat16 --section none --results /tmp/none.md --plot /tmp/none.png"
}
