# Sourced by run_experiment.sh and run_ftwt.sh (SEED set): the shared settings, and the
# dense network of the FTWT official runs (results/ftwt/run_official.sh; DENSE overrides
# it), trained first when it is missing.
RUN=${RUN:-python -m experiments.main}
OUT=${OUT:-runs/manidp}
DENSE=${DENSE:-runs/ftwt_official/dense_s$SEED}
C=experiments/configs
if [ ! -f "$DENSE/results.json" ]; then
  $RUN --config $C/dense_official_cifar10_subset_resnet20.py --workdir $DENSE --config.seed=$SEED --config.progress=False
fi
