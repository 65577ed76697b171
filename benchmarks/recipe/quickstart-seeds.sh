#!/usr/bin/env bash
# The quickstart's fine-tune itself (2 ranks, ZeRO-3, launcher/configs/quickstart.yaml) on seeds 1 and 2, both at once,
# each ending with its evaluation on the 500 test questions (the base model: 23.4%, outputs/quickstart-before.json).
. "$(dirname "$0")/cells.sh"
export OMP_NUM_THREADS=1
for seed in 1 2; do
  nice -n 10 deepspeed --num_gpus 2 --master_port $((29600 + seed)) launcher/train.py \
    --config launcher/configs/quickstart.yaml --train.seed=$seed --train.output_dir=outputs/recipe/quickstart-seed$seed \
    > outputs/recipe/quickstart-seed$seed.log 2>&1 &
  sleep 20
done
wait
