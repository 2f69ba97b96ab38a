#!/usr/bin/env bash
#   bash results/epi/run_experiment.sh SEED "PRUNE_EPOCHS"   (from the repo root)
# EPI on ResNet-20 / cifar10_subset, 30 epochs from scratch, p = 50% of the MACs:
#  - the dense run recording both EPI curves (a checkpoint per epoch),
#  - the oracle sweep: prune at each of PRUNE_EPOCHS (default 0 2 4 8 12 16 24) with the
#    magnitude criterion, the dense part of each taken from the recorded run (identical
#    to training it again),
#  - each criterion's EPI pick at the paper's tau (0.983 magnitude, 0.944 Taylor), pruned
#    with that criterion's sub-network,
#  - train -> prune -> finetune at equal total epochs: dense 20 epochs (lr x0.1 at 10
#    and 15), global L2 (normalised per group) to 50% of the MACs on the same units,
#    finetune 10 epochs (lr 0.01, x0.1 at 5).
# Finished runs are skipped; then the summaries are copied to results/epi/runs.
set -euo pipefail
SEED=${1:-0}; EPOCHS=${2:-0 2 4 8 12 16 24}
RUN=${RUN:-python -m experiments.main}
OUT=${OUT:-runs/epi}
C=experiments/configs
epi() {  # WORKDIR [overrides...]
  local wd=$1; shift
  [ -f "$wd/results.json" ] || $RUN --config $C/epi_cifar10_subset_resnet20.py --workdir "$wd" \
    --config.seed=$SEED --config.progress=False "$@"
}
epi $OUT/dense_s$SEED --config.method.prune_epoch=-2 --config.checkpoint.keep=40
for e in $EPOCHS; do
  epi $OUT/at${e}_s$SEED --config.method.prune_epoch=$e --config.method.dense_from=$OUT/dense_s$SEED
done
# EPI's own picks (the paper's tau): the magnitude pick is a sweep run when it lands on one
fired() { python -c "import json; print(json.load(open('$OUT/dense_s$SEED/results.json'))['details']['fired']['$1'])"; }
for crit in magnitude taylor; do
  e=$(fired $crit)
  [ "$e" = None ] && continue
  [ "$crit" = magnitude ] && [ -f "$OUT/at${e}_s$SEED/results.json" ] && continue
  epi $OUT/${crit}_at${e}_s$SEED --config.method.prune_epoch=$e --config.method.criterion=$crit \
    --config.method.dense_from=$OUT/dense_s$SEED
done
if [ "${TPF:-1}" = 1 ]; then
  d20=$OUT/dense20_s$SEED
  [ -f "$d20/results.json" ] || $RUN --config $C/dense_official_cifar10_subset_resnet20.py --workdir $d20 \
    --config.seed=$SEED --config.progress=False --config.train.epochs=20 "--config.train.decay_epochs=(10,15)"
  wd=$OUT/tpf_s$SEED
  [ -f "$wd/results.json" ] || $RUN --config $C/magnitude_official_cifar10_subset_resnet20.py --workdir $wd \
    --config.seed=$SEED --config.progress=False --config.method.pretrained=$d20 --config.method.units=stream \
    --config.method.criterion=l2 --config.method.budget=0.5 --config.method.finetune.epochs=10 \
    "--config.method.finetune.decay_epochs=(5,)"
fi
for f in "$OUT"/dense_s$SEED/results.json "$OUT"/at*_s$SEED/results.json "$OUT"/*_at*_s$SEED/results.json \
  "$OUT"/tpf_s$SEED/results.json; do
  [ -f "$f" ] || continue
  run=$(basename "$(dirname "$f")"); mkdir -p results/epi/runs/$run; cp "$f" results/epi/runs/$run/
done
