#!/usr/bin/env bash
# The recipe runs, one after another once the probes are done; each step skips what is finished.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
while kill -0 4031 2>/dev/null; do sleep 5; done
PROBE="--steps 50 --train.micro_batch_size=16 --train.seed=42"
[ -f benchmarks/routing_probe/zloss1e-3-seed42.json ] || nice -n 10 python benchmarks/routing_probe.py $PROBE --out benchmarks/routing_probe/zloss1e-3-seed42 --moelora.router_z_loss_coef=1e-3 --moelora.router_aux_loss_coef=0 > outputs/recipe/probe-zloss.log 2>&1
[ -f benchmarks/routing_probe/aux0.01-noise1-seed42.json ] || nice -n 10 python benchmarks/routing_probe.py $PROBE --out benchmarks/routing_probe/aux0.01-noise1-seed42 --moelora.router_noise=1.0 --moelora.router_aux_loss_coef=0.01 > outputs/recipe/probe-auxnoise.log 2>&1
HYP="--data.train_path=data/wordnet-hypernyms/train.jsonl --data.eval_path=data/wordnet-hypernyms/test.jsonl"
CELL="--optimizers adamw --adamw-rates 2e-3 --steps 150 --num-ranks 1 --parallel 2 --micro-batch-size 16 --deepspeed=ds_configs/zero0.json --model.dtype=bfloat16 --section none --results /tmp/none.md --plot /tmp/none.png"
# 1. the quickstart itself (2 ranks, ZeRO-3), load balancing on, seed 42
if [ ! -f benchmarks/recipe/quickstart-aux0.01.log ]; then
  nice -n 10 bash scripts/quickstart.sh --moelora.router_aux_loss_coef=0.01 > outputs/recipe/quickstart-aux0.01.log 2>&1 \
    && cp outputs/recipe/quickstart-aux0.01.log benchmarks/recipe/quickstart-aux0.01.log \
    && cp outputs/quickstart/expert_health.json benchmarks/recipe/quickstart-aux0.01-expert_health.json \
    && cp outputs/quickstart/expert_health.png benchmarks/recipe/quickstart-aux0.01-expert_health.png
fi
# 2. the same recipe, seeds 1 and 2 (1 rank of 16, ZeRO-0, the first 200 test questions)
nice -n 10 python benchmarks/quality.py $CELL --methods riemannian+sqrt --seeds 1 2 --out-dir benchmarks/recipe/wordnet-aux0.01 --moelora.router_aux_loss_coef=0.01
# 3. the hypernym quiz: the base model, then the recipe and MoE-LoRA without the preconditioner (plain), 3 seeds
[ -f benchmarks/recipe/hypernyms-base.json ] || nice -n 10 deepspeed --num_gpus 1 launcher/eval.py --config launcher/configs/quickstart.yaml $HYP --data.eval_max_samples=200 --json-out benchmarks/recipe/hypernyms-base.json > outputs/recipe/hypernyms-base.log 2>&1
Q="nice -n 10 python benchmarks/quality.py $CELL"  # --parallel 2: each cell 1 thread, two cells at a time
$Q --methods riemannian+sqrt plain --seeds 42 --out-dir benchmarks/recipe/hypernyms-aux0.01 --moelora.router_aux_loss_coef=0.01 $HYP
$Q --methods riemannian+sqrt --seeds 1 2 --out-dir benchmarks/recipe/hypernyms-aux0.01 --moelora.router_aux_loss_coef=0.01 $HYP
# 4. plain LoRA in the same trainer: one expert of rank 8, and of rank 32 (4 x 8)
$Q --methods riemannian+sqrt --seeds 42 1 --out-dir benchmarks/recipe/hypernyms-e1r8 --moelora.num_experts=1 --moelora.top_k=null $HYP
$Q --methods riemannian+sqrt --seeds 2 --out-dir benchmarks/recipe/hypernyms-e1r8 --moelora.num_experts=1 --moelora.top_k=null $HYP &
$Q --methods riemannian+sqrt --seeds 42 --out-dir benchmarks/recipe/hypernyms-e1r32 --moelora.num_experts=1 --moelora.top_k=null --moelora.rank=32 --moelora.alpha=64 $HYP
wait
