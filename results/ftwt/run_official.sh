#!/usr/bin/env bash
#   bash results/ftwt/run_official.sh [SEED] [FTWT_EPOCHS] [R] [MODE] [UNITS]   (from the repo root)
# FTWT on its official gating units and schedule, beside static L1 on the same units at
# the same mean MACs, from one dense ResNet-20 trained with the official recipe (30
# epochs). FTWT_EPOCHS: 20 (the config's scaled official schedule, lr x0.1 at 10 and
# 15) or 10 (shortened: x0.1 at 5 and 8); the static baseline finetunes as long with
# the same backbone schedule. R (default 0.8), MODE (decoupled | joint) and UNITS (branch |
# stream) name the FTWT run: ftwt_r0.8_s0, ftwt_joint_r0.9_s0, ftwt_stream_r0.8_s0, ...
set -euo pipefail
SEED=${1:-0}; E=${2:-20}; R=${3:-0.8}; MODE=${4:-decoupled}; UNITS=${5:-branch}
RUN=${RUN:-python -m experiments.main}
OUT=${OUT:-runs/ftwt_official}
C=experiments/configs
DENSE=$OUT/dense_s$SEED
$RUN --config $C/dense_official_cifar10_subset_resnet20.py --workdir $DENSE --config.seed=$SEED --config.progress=False
if [ "$E" = 20 ]; then SCHED=(); FT=(); TAG=""; else
  SCHED=(--config.method.epochs=$E "--config.method.decay_epochs=(5,8)")
  FT=(--config.method.finetune.epochs=$E "--config.method.finetune.decay_epochs=(5,8)"); TAG="_e$E"; fi
NAME=ftwt
if [ "$MODE" != decoupled ]; then NAME+=_$MODE; fi
if [ "$UNITS" != branch ]; then NAME+=_$UNITS; fi
NAME+=_r${R}${TAG}
$RUN --config $C/ftwt_official_cifar10_subset_resnet20.py --workdir $OUT/${NAME}_s$SEED --config.seed=$SEED \
  --config.progress=False --config.method.pretrained=$DENSE --config.method.r=$R --config.method.mode=$MODE \
  --config.method.units=$UNITS "${SCHED[@]}"
BUDGET=$(python -c "import json; print(round(json.load(open('$OUT/${NAME}_s$SEED/results.json'))['ratios']['macs'], 4))")
L1=l1_at_${NAME/_r0.8/}  # the r = 0.8 baselines keep their first names (l1_at_ftwt_s0)
$RUN --config $C/magnitude_official_cifar10_subset_resnet20.py --workdir $OUT/${L1}_s$SEED --config.seed=$SEED \
  --config.progress=False --config.method.pretrained=$DENSE --config.method.budget=$BUDGET "${FT[@]}"
bash results/collect.sh "$OUT" results/ftwt/official_runs
