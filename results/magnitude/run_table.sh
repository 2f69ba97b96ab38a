#!/usr/bin/env bash
#   bash results/magnitude/run_table.sh   (from the repo root)
# Reproduces the magnitude-baseline table in the README: ResNet-20 on the shipped
# CIFAR-10 subset, global L1, one-shot, MAC budgets 0.5 / 0.25 / 0.125, seeds 0 and 1.
# One dense pretraining per seed is shared by its budgets (its finished 'pretrain'
# phase is copied into each run's workdir, where the pipeline resumes it).
set -euo pipefail
CFG=experiments/configs/magnitude_cifar10_subset_resnet20.py
OUT=${OUT:-runs/magnitude_table}
for seed in 0 1; do
  first=""
  for budget in 0.5 0.25 0.125; do
    wd=$OUT/seed${seed}_macs${budget}
    if [ -n "$first" ] && [ ! -d "$wd/pretrain" ]; then mkdir -p "$wd"; cp -r "$first/pretrain" "$wd/"; fi
    python -m experiments.main --config $CFG --workdir "$wd" --config.seed=$seed \
      --config.method.budget=$budget --config.progress=False
    first=${first:-$wd}
  done
done
python -m experiments.summarize_magnitude "$OUT"
