#!/usr/bin/env bash
# FTWT on the CIFAR-10 subset, ResNet-20: r in {0.8, 0.9, 0.95} x {decoupled, joint},
# all from ONE dense network (the one the ChipNet/magnitude comparison starts from), then
# then run_static.sh (the static baseline at equal MACs) writes the table:
#   bash results/ftwt/run_sweep.sh [seeds...]   (default: 0)
set -euo pipefail
RUN=${RUN:-python -m experiments.main}
CFG=experiments/configs/ftwt_cifar10_subset_resnet20.py
OUT=${OUT:-runs/ftwt_sweep}
DENSE=${DENSE:-runs/chipnet_r20}   # the dense run results/chipnet/run_experiment.sh makes
EPOCHS=${EPOCHS:-8}
SEEDS=${@:-0}
[ -d "$DENSE/pretrain/checkpoints" ] || [ -d "$DENSE/train/checkpoints" ] || \
  $RUN --config experiments/configs/dense_cifar10_subset_resnet20.py --workdir $DENSE --config.progress=False
for seed in $SEEDS; do
  for mode in decoupled joint; do
    for r in 0.8 0.9 0.95; do
      $RUN --config $CFG --workdir $OUT/${mode}_r${r}_s${seed} --config.progress=False \
        --config.seed=$seed --config.method.seed=$seed --config.method.r=$r \
        --config.method.mode=$mode --config.method.epochs=$EPOCHS --config.method.pretrained=$DENSE
    done
  done
done
bash results/collect.sh $OUT results/ftwt/runs
