#!/usr/bin/env bash
#   bash results/manidp/run_ftwt.sh [SEED] [EPOCHS]   (from the repo root)
# FTWT (branch units, decoupled) beside the ManiDP runs of run_experiment.sh: same dense
# network, same schedule length, at r chosen to land near ManiDP's mean MACs. FTWT's
# per-layer target r keeps about r^2 of a conv's MACs (both its input and output are
# gated): r 0.8 removed 34-38% in the official runs, so r 0.73 aims at ManiDP 0.65's
# ~47% and r 0.59 at ManiDP 0.5's ~65%. EPOCHS 10: backbone lr x0.1 at epochs 5 and 8
# (the FTWT e10 runs); 20: the config's official schedule. Finished runs are skipped.
set -euo pipefail
SEED=${1:-0}; E=${2:-10}
RUN=${RUN:-python -m experiments.main}
OUT=${OUT:-runs/manidp}
DENSE=${DENSE:-runs/ftwt_official/dense_s$SEED}
C=experiments/configs
if [ ! -f "$DENSE/results.json" ]; then
  $RUN --config $C/dense_official_cifar10_subset_resnet20.py --workdir $DENSE --config.seed=$SEED --config.progress=False
fi
if [ "$E" = 20 ]; then SCHED=(); else SCHED=(--config.method.epochs=$E "--config.method.decay_epochs=(5,8)"); fi
for pair in 0.65:0.73 0.5:0.59; do  # ManiDP target rate : FTWT r
  rate=${pair%:*}; r=${pair#*:}
  wd=$OUT/ftwt_at_manidp_r${rate}_e${E}_s$SEED
  [ -f "$wd/results.json" ] || $RUN --config $C/ftwt_official_cifar10_subset_resnet20.py --workdir "$wd" \
    --config.seed=$SEED --config.progress=False --config.method.pretrained=$DENSE --config.method.r=$r "${SCHED[@]}"
done
bash results/collect.sh "$OUT" results/manidp/runs
