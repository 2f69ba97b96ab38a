#!/usr/bin/env bash
# ChipNet vs magnitude (global L1) on the CIFAR-10 subset, ResNet-20, from ONE dense network.
# Each run: ChipNet soft pruning (16 epochs) -> best hard mask -> slim -> finetune 4 epochs,
# and (compare_magnitude) the magnitude baseline at the same budget, same finetune.
#   bash results/chipnet/run_experiment.sh [seeds...]      (default: 0)
# About 15 min per budget per seed on 2 CPU cores.
set -euo pipefail
RUN=${RUN:-python -m experiments.main}
CFG=experiments/configs/chipnet_cifar10_subset_resnet20.py
OUT=${OUT:-runs/chipnet_cmp}
DENSE=${DENSE:-runs/chipnet_r20}   # a finished ChipNet (or dense) run: its pretrain checkpoint
SEEDS=${@:-0}
# The dense network (6 epochs); skipped when $DENSE already holds it.
[ -d "$DENSE/pretrain/checkpoints" ] || $RUN --config $CFG --workdir $DENSE --config.progress=False
for seed in $SEEDS; do
  for spec in volume:0.5 volume:0.25 volume:0.125 volume:0.0625 flops:0.5; do
    type=${spec%%:*}; budget=${spec##*:}
    $RUN --config $CFG --workdir $OUT/${type}_${budget}_s${seed} --config.progress=False \
      --config.seed=$seed --config.method.budget_type=$type --config.method.budget=$budget \
      --config.method.compare_magnitude=True --config.method.pretrained=$DENSE
  done
done
