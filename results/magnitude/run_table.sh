#!/usr/bin/env bash
#   bash results/magnitude/run_table.sh   (from the repo root; 6 runs of 7-10 min on 2 cores)
# The magnitude-baseline table in the README: ResNet-20 on the shipped CIFAR-10 subset,
# global L1, one-shot, MAC budgets 0.5 / 0.25 / 0.125, seeds 0 and 1. One dense
# pretraining per seed (in its budget-0.5 run) is shared by its other budgets
# (method.pretrained). Seed 0 at 0.5 is the README's main job.
set -euo pipefail
RUN=${RUN:-python -m experiments.main}
CFG=experiments/configs/magnitude_cifar10_subset_resnet20.py
OUT=${OUT:-runs/magnitude_table}
for seed in 0 1; do
  dense=$OUT/seed${seed}_macs0.5
  for budget in 0.5 0.25 0.125; do
    wd=$OUT/seed${seed}_macs${budget}
    reuse=(); [ "$wd" = "$dense" ] || reuse=(--config.method.pretrained="$dense")
    $RUN --config $CFG --workdir "$wd" --config.seed=$seed --config.method.budget=$budget \
      --config.progress=False "${reuse[@]}"
  done
done
bash results/collect.sh "$OUT" results/magnitude/runs
python -m experiments.summarize results/magnitude/runs --by unit,budget \
  --columns seeds,dense_acc,before_ft,acc,macs_kept,params_kept,macs,params,speedup \
  --out results/magnitude/table.md --plot results/magnitude/accuracy_vs_budget.png
