#!/usr/bin/env bash
# Routing probes, one at a time with both cores: ARM=overrides pairs, seed given; skips finished ones.
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
while pgrep -f "routing_probe.py --steps 50 --out benchmarks/routing_probe/base-seed42" >/dev/null; do sleep 5; done
seed=$1; shift
for spec in "$@"; do
  arm=${spec%%=*}; overrides=${spec#*=}
  out=benchmarks/routing_probe/$arm-seed$seed
  [ -f $out.json ] && continue
  nice -n 10 python benchmarks/routing_probe.py --steps 50 --out $out --train.micro_batch_size=16 --train.seed=$seed $overrides > outputs/recipe/probe-$arm-seed$seed.log 2>&1
done
