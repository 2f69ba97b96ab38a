#!/usr/bin/env bash
# Static baseline at FTWT's mean MACs: global L1 magnitude pruning of the same dense network
# to MAC budgets 0.66 / 0.87 / 0.93 (what FTWT r = 0.8 / 0.9 / 0.95 keep on average), slim,
# 4 finetune epochs.  bash results/ftwt/run_static.sh [seeds...]   (default: 0 1; ~3 min a run)
set -euo pipefail
RUN=${RUN:-python -m experiments.main}
OUT=${OUT:-runs/ftwt_static}
DENSE=${DENSE:-runs/chipnet_r20}   # the dense network the FTWT runs started from
SEEDS=${@:-0 1}
for seed in $SEEDS; do
  for b in 0.66 0.87 0.93; do
    $RUN --config experiments/configs/magnitude_cifar10_subset_resnet20.py \
      --workdir $OUT/magnitude_macs${b}_s${seed} --config.progress=False --config.seed=$seed \
      --config.method.budget=$b --config.method.pretrained=$DENSE
  done
done
bash results/collect.sh $OUT results/ftwt/runs
python -m experiments.summarize results/ftwt/runs --by method,config.method.mode,config.method.r,budget \
  --columns seeds,acc,dense_acc,macs_per_image,reduction,reduction_legacy \
  --out results/ftwt/table.md --plot results/ftwt/accuracy_vs_macs.png --series method,config.method.mode
