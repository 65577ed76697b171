#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, build the WordNet quiz, evaluate the base model,
# fine-tune it with 2 DeepSpeed ranks (ZeRO-3, precision auto, MoE-LoRA 4x rank 8 top-2 on q/k/v/o, Riemannian
# AdamW, sqrt gate rescaling), evaluate the exported merged model, and generate an answer with plain transformers.
# Extra arguments are training overrides, e.g. `bash scripts/quickstart.sh --train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

CONFIG=launcher/configs/quickstart.yaml
OUT=outputs/quickstart
MERGED=outputs/quickstart-merged
NUM_RANKS=${NUM_RANKS:-2}
mkdir -p outputs

setup_done=$(date +%s)
python scripts/quickstart_estimate.py 2>&1 | grep -v "Setting accelerator"

echo "== 1/5 building the WordNet definition quiz (2000 train / 500 test)"
python -m moelora_ds.data.wordnet --out data/wordnet --seed 0

echo "== 2/5 evaluating the base model"
deepspeed --num_gpus "$NUM_RANKS" launcher/eval.py --config "$CONFIG" --json-out outputs/quickstart-before.json

echo "== 3/5 fine-tuning"
rm -rf "$OUT"
deepspeed --num_gpus "$NUM_RANKS" launcher/train.py --config "$CONFIG" --train.output_dir="$OUT" "$@"

echo "== 4/5 exporting the merged model and evaluating it"
rm -rf "$MERGED"
moelora-export --checkpoint "$OUT" --out "$MERGED" --mode merged
deepspeed --num_gpus "$NUM_RANKS" launcher/eval.py --config "$CONFIG" --model "$MERGED" --trust-remote-code \
  --json-out outputs/quickstart-after.json

echo "== 5/5 the exported model in plain transformers (trust_remote_code): a few test questions"
python - "$MERGED" <<'PY'
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from moelora_ds.evaluation.evaluate import multiple_choice_predictions
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
records = [json.loads(line) for line, _ in zip(open("data/wordnet/test.jsonl"), range(6))]
# scored as the evaluation scores: the answer letter whose token the model ranks highest after the question
for record, chosen in zip(records, multiple_choice_predictions(model, tokenizer, records)):
    expected = record["messages"][-1]["content"]
    question = " ".join(record["messages"][0]["content"].split())
    print(f"  {'right' if chosen == expected else 'wrong'}: model {chosen}, expected {expected} | {question[:90]}...")
PY

python - "$OUT" "$started" "$setup_done" <<'PY'
import json, sys, time
out, started, setup_done = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
before = json.load(open("outputs/quickstart-before.json"))
after = json.load(open("outputs/quickstart-after.json"))
steps = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if '"tokens_per_s"' in line]
rate = sum(r["tokens_per_s"] for r in steps) / len(steps)
print(f"accuracy before: {before['accuracy']:.1%}   after: {after['accuracy']:.1%}   "
      f"(eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f})")
print(f"training: {len(steps)} steps, mean {rate:,.0f} tokens/s; wall time of the whole job: {time.time() - started:.0f} s "
      f"(setup {setup_done - started} s)")
last = steps[-1]
if "dead_experts" in last:
    print(f"expert health at step {last['step']}: {last['dead_experts']} dead experts, expert shares "
          f"{last['expert_share_min']:.1%}-{last['expert_share_max']:.1%}; heat map: {out}/expert_health.png")
print(f"loss curve: {out}/loss_curve.png   metrics: {out}/metrics.jsonl   merged model: outputs/quickstart-merged")
PY
