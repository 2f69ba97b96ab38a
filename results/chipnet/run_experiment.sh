#!/usr/bin/env bash
# ChipNet vs magnitude (global L1) on the CIFAR-10 subset, ResNet-20, from ONE dense network.
# Per budget and seed: ChipNet soft pruning (16 epochs) -> best hard mask -> slim -> finetune
# 4 epochs; and the magnitude baseline to the same budget with the same finetune.
#   bash results/chipnet/run_experiment.sh [seeds...]      (default: 0)
# About 15 min per budget per seed on 2 CPU cores.
set -euo pipefail
RUN=${RUN:-python -m experiments.main}
CFG=experiments/configs/chipnet_cifar10_subset_resnet20.py
MAG=experiments/configs/magnitude_cifar10_subset_resnet20.py
OUT=${OUT:-runs/chipnet_cmp}
DENSE=${DENSE:-runs/chipnet_r20}   # a finished ChipNet (or dense) run: its pretrain checkpoint
SEEDS=${@:-0}
# The dense network (6 epochs); skipped when $DENSE already holds it.
[ -d "$DENSE/pretrain/checkpoints" ] || $RUN --config $CFG --workdir $DENSE --config.progress=False
for seed in $SEEDS; do
  for spec in volume:0.5 volume:0.25 volume:0.125 volume:0.0625 flops:0.5; do
    type=${spec%%:*}; budget=${spec##*:}; unit=${type/flops/macs}
    $RUN --config $CFG --workdir $OUT/${type}_${budget}_s${seed}_chipnet --config.progress=False \
      --config.seed=$seed --config.method.budget_type=$type --config.method.budget=$budget \
      --config.method.pretrained=$DENSE
    $RUN --config $MAG --workdir $OUT/${type}_${budget}_s${seed}_magnitude --config.progress=False \
      --config.seed=$seed --config.method.unit=$unit --config.method.budget=$budget \
      --config.method.pretrained=$DENSE
  done
done
bash results/collect.sh $OUT results/chipnet/runs
python -m experiments.summarize results/chipnet/runs --by unit,budget,method \
  --columns seeds,acc,before_ft,achieved,macs_kept,params_kept,speedup \
  --out results/chipnet/table.md --plot results/chipnet/accuracy_vs_budget.png --x budget,ratios.macs \
  --series method,unit
