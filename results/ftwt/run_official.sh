#!/usr/bin/env bash
#   bash results/ftwt/run_official.sh [SEED] [FTWT_EPOCHS]   (from the repo root)
# FTWT on its official gating units and schedule, beside static L1 on the same units at
# the same mean MACs, from one dense ResNet-20 trained with the official recipe (30
# epochs). FTWT_EPOCHS: 20 (the config's scaled official schedule, lr x0.1 at 10 and
# 15) or 10 (shortened: x0.1 at 5 and 8); the static baseline finetunes as long with
# the same backbone schedule.
set -euo pipefail
SEED=${1:-0}; E=${2:-20}
RUN=${RUN:-python -m experiments.main}
OUT=${OUT:-runs/ftwt_official}
C=experiments/configs
DENSE=$OUT/dense_s$SEED
$RUN --config $C/dense_official_cifar10_subset_resnet20.py --workdir $DENSE --config.seed=$SEED --config.progress=False
if [ "$E" = 20 ]; then SCHED=(); FT=(); TAG=""; else
  SCHED=(--config.method.epochs=$E "--config.method.decay_epochs=(5,8)")
  FT=(--config.method.finetune.epochs=$E "--config.method.finetune.decay_epochs=(5,8)"); TAG="_e$E"; fi
$RUN --config $C/ftwt_official_cifar10_subset_resnet20.py --workdir $OUT/ftwt_r0.8${TAG}_s$SEED --config.seed=$SEED \
  --config.progress=False --config.method.pretrained=$DENSE --config.method.r=0.8 "${SCHED[@]}"
BUDGET=$(python -c "import json; print(round(json.load(open('$OUT/ftwt_r0.8${TAG}_s$SEED/results.json'))['ratios']['macs'], 4))")
$RUN --config $C/magnitude_official_cifar10_subset_resnet20.py --workdir $OUT/l1_at_ftwt${TAG}_s$SEED --config.seed=$SEED \
  --config.progress=False --config.method.pretrained=$DENSE --config.method.budget=$BUDGET "${FT[@]}"
bash results/collect.sh "$OUT" results/ftwt/official_runs
