#!/usr/bin/env bash
#   bash results/manidp/run_experiment.sh [SEED] [EPOCHS] [ABLATIONS]   (from the repo root)
# ManiDP on ResNet-20 / cifar10_subset at target kept rates 0.5 and 0.65, each beside
# static global L1 on the same units at ManiDP's mean per-image MACs, finetuned as long;
# ABLATIONS=1 adds, at rate 0.5, ManiDP without the similarity term and without the
# complexity weighting; FTWT near ManiDP's MACs follows (run_ftwt.sh). All from the
# dense network of the FTWT official runs (dense.sh; DENSE overrides it). EPOCHS 10 is the
# shortened schedule of the FTWT e10 runs (L1 finetune: lr x0.1 at epochs 5 and 8); 20 the
# full one.
# The gates start near 1 (method.gate_init_scale=0.1): with the official init the
# pretrained network's logits blow up (docs/manidp.md). Finished runs are skipped.
set -euo pipefail
SEED=${1:-0}; E=${2:-10}; ABL=${3:-1}
source results/manidp/dense.sh
if [ "$E" = 20 ]; then FT=(); else FT=(--config.method.finetune.epochs=$E "--config.method.finetune.decay_epochs=(5,8)"); fi
manidp() {  # NAME RATE [overrides...]
  local wd=$OUT/$1_e${E}_s$SEED rate=$2; shift 2
  [ -f "$wd/results.json" ] || $RUN --config $C/manidp_cifar10_subset_resnet20.py --workdir "$wd" \
    --config.seed=$SEED --config.progress=False --config.method.pretrained=$DENSE \
    --config.method.target_rate=$rate --config.method.epochs=$E --config.method.gate_init_scale=0.1 "$@"
}
l1_at() {  # the ManiDP run whose mean MACs to match
  local src=$OUT/$1_e${E}_s$SEED wd=$OUT/l1_at_$1_e${E}_s$SEED
  local budget; budget=$(python -c "import json; print(round(json.load(open('$src/results.json'))['ratios']['macs'], 4))")
  [ -f "$wd/results.json" ] || $RUN --config $C/magnitude_official_cifar10_subset_resnet20.py --workdir "$wd" \
    --config.seed=$SEED --config.progress=False --config.method.pretrained=$DENSE --config.method.budget=$budget "${FT[@]}"
}
for rate in 0.5 0.65; do
  manidp manidp_r$rate $rate
  l1_at manidp_r$rate
done
if [ "$ABL" = 1 ]; then
  manidp nosim_r0.5 0.5 --config.method.lambda_sim=0
  manidp noweight_r0.5 0.5 --config.method.thre_cls=1e9  # w = 1 for every sample
fi
bash results/manidp/run_ftwt.sh $SEED $E  # FTWT near the same MACs, then collects
