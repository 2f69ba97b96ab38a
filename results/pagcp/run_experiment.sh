#!/usr/bin/env bash
#   bash results/pagcp/run_experiment.sh [SEED]   (from the repo root; ~25 min on 2 loaded cores)
#   ARG=sum bash results/pagcp/run_experiment.sh [SEED]   (three tasks: left, right, their sum)
# PAGCP on MultiMNIST (tasks left, right) with the zoo's multitask ResNet: dense (12 epochs,
# inside the first run), PAGCP at the official tolerance (delta0 0.05, T 1.5) and at a loose
# one (0.3, 6), the single-task-guided ablation (left's loss only) and task-blind global L1
# of the encoder at the loose PAGCP's MACs, finetuned 4 epochs and, for equal training, 8
# (PAGCP's two masked 2-epoch rounds + its 4-epoch finetune).
set -euo pipefail
SEED=${1:-0}
RUN=${RUN:-python -m experiments.main}
ARG=${ARG:-}; TAG=${ARG:+_$ARG}
CFG=experiments/configs/pagcp_multimnist_resnet.py${ARG:+:$ARG}
OUT=${OUT:-runs/pagcp$TAG}
COMMON=(--config.seed=$SEED --config.progress=False)
LOOSE=(--config.method.delta0=0.3 --config.method.total=6.0)
$RUN --config $CFG --workdir $OUT/pagcp${TAG}_s$SEED "${COMMON[@]}"
DENSE=(--config.method.pretrained=$OUT/pagcp${TAG}_s$SEED)
$RUN --config $CFG --workdir $OUT/loose${TAG}_s$SEED "${COMMON[@]}" "${DENSE[@]}" "${LOOSE[@]}"
TARGET=$(python -c "import json; print(round(json.load(open('$OUT/loose${TAG}_s$SEED/results.json'))['ratios']['flops_paper'], 4))")
$RUN --config $CFG --workdir $OUT/left${TAG}_s$SEED "${COMMON[@]}" "${DENSE[@]}" "${LOOSE[@]}" \
  --config.method.guide=left --config.method.target=$TARGET
$RUN --config $CFG --workdir $OUT/l1${TAG}_s$SEED "${COMMON[@]}" "${DENSE[@]}" --config.method.guide=l1 --config.method.target=$TARGET
$RUN --config $CFG --workdir $OUT/l1_ft8${TAG}_s$SEED "${COMMON[@]}" "${DENSE[@]}" --config.method.guide=l1 \
  --config.method.target=$TARGET --config.method.finetune.epochs=8
bash results/collect.sh "$OUT" results/pagcp/runs$TAG
python results/pagcp/plot_units.py results/pagcp/runs$TAG/loose${TAG}_s$SEED --out results/pagcp/units$TAG.png
