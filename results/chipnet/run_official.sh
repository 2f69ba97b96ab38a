#!/usr/bin/env bash
# ChipNet vs magnitude on the official units and the official recipe scaled to the subset
# (experiments/configs/chipnet_official_cifar10_subset_resnet20.py): option-B ResNet-20,
# 4,585 / 500 train / validation split, dense 30 epochs, soft pruning 10, finetune 20.
# Per seed: one dense network, then ChipNet and the magnitude baseline (global |gamma| of
# the BN scales on the same units, same finetune) at volume 0.5 / 0.25 / 0.125, official
# volume 0.25 and MACs 0.5; for seed 0 also ChipNet on stream units at volume 0.25, and
# ChipNet at volume 0.125 with 20 soft epochs instead of 10, and with each hard candidate's
# BN statistics re-estimated on 30 training batches before selection (method.select_bn_batches).
#   bash results/chipnet/run_official.sh [seeds...]      (default: 0)
# About 15 min (dense) + 12 min per ChipNet run + 8 min per magnitude run on 2 CPU cores.
set -euo pipefail
RUN=${RUN:-python -m experiments.main}
CFG=experiments/configs/chipnet_official_cifar10_subset_resnet20.py
OUT=${OUT:-runs/chip}
SEEDS=${@:-0}
for s in $SEEDS; do
  DENSE=$OUT/dense_s$s
  [ -f "$DENSE/results.json" ] || $RUN --config $CFG:dense --workdir $DENSE --config.seed=$s --config.progress=False
  for spec in volume:0.25 volume:0.5 volume:0.125 volume_paper:0.25 flops:0.5; do
    type=${spec%%:*}; budget=${spec##*:}; unit=${type/flops/macs}
    $RUN --config $CFG --workdir $OUT/chip_${type}_${budget}_s$s --config.seed=$s --config.progress=False \
      --config.method.budget_type=$type --config.method.budget=$budget --config.method.pretrained=$DENSE
    $RUN --config $CFG:magnitude --workdir $OUT/mag_${type}_${budget}_s$s --config.seed=$s --config.progress=False \
      --config.method.unit=$unit --config.method.budget=$budget --config.method.pretrained=$DENSE
  done
  if [ "$s" = 0 ]; then
    $RUN --config $CFG --workdir $OUT/chip_stream_volume_0.25_s$s --config.seed=$s --config.progress=False \
      --config.method.units=stream --config.method.budget=0.25 --config.method.pretrained=$DENSE
    # does longer soft pruning change the smallest budget? 20 soft epochs instead of 10
    $RUN --config $CFG --workdir $OUT/chip_volume_0.125_soft20_s$s --config.seed=$s --config.progress=False \
      --config.method.budget=0.125 --config.method.soft.epochs=20 --config.method.pretrained=$DENSE
    # does selection improve when each hard candidate's BN statistics are re-estimated first?
    $RUN --config $CFG --workdir $OUT/chip_volume_0.125_bn30_s$s --config.seed=$s --config.progress=False \
      --config.method.budget=0.125 --config.method.select_bn_batches=30 --config.method.pretrained=$DENSE
  fi
done
for f in "$OUT"/{chip,mag}_*/results.json; do
  [ -f "$f" ] || continue
  run=$(basename "$(dirname "$f")"); dest=official_runs
  case $run in  # the ablations: kept out of the table's rows
    *soft20*) dest=longer_soft_runs;;
    *bn30*) dest=bn_recalibrated_runs;;
  esac
  mkdir -p results/chipnet/$dest/$run
  cp "$f" results/chipnet/$dest/$run/results.json
done
python -m experiments.summarize results/chipnet/official_runs --by config.method.units,unit,budget,method \
  --columns seeds,acc,dense_acc,before_ft,volume_exact,volume_paper,macs_kept,params_kept,speedup \
  --out results/chipnet/official_table.md --plot results/chipnet/official_accuracy_vs_budget.png \
  --x budget,ratios.macs --series method,config.method.units,unit
