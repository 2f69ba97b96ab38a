#!/usr/bin/env bash
# Mask transfer, 2x2: masks learned by ChipNet (MACs budget 0.5) on the CIFAR-10 subset or on the
# MNIST subset (32x32x3), applied to a fresh ResNet-20 trained from scratch (6 epochs) on either.
#   bash results/chipnet/run_transfer.sh      (writes results/chipnet/transfer.md)
set -euo pipefail
RUN=${RUN:-python -m experiments.main}
OUT=${OUT:-runs/chipnet_transfer}
C10=${C10:-runs/chipnet_cmp/flops_0.5_s0_chipnet}   # a ChipNet run on CIFAR-10 at flops 0.5 (run_experiment.sh)
DENSE_C10=${DENSE_C10:-runs/chipnet_r20}
MNIST=$OUT/chipnet_mnist_f50
$RUN --config experiments/configs/chipnet_mnist_subset_32x3_resnet20.py --workdir $MNIST \
  --config.progress=False --config.method.budget_type=flops --config.method.budget=0.5
for src in c10:$C10 mnist:$MNIST; do
  name=${src%%:*}; dir=${src#*:}
  $RUN --config experiments/configs/chipnet_transfer_cifar10_subset_to_mnist_resnet20.py \
    --workdir $OUT/${name}_to_mnist --config.progress=False \
    --config.method.transfer_from=$dir --config.method.pretrained=$MNIST
  $RUN --config experiments/configs/chipnet_transfer_mnist_to_cifar10_subset_resnet20.py \
    --workdir $OUT/${name}_to_c10 --config.progress=False \
    --config.method.transfer_from=$dir --config.method.pretrained=$DENSE_C10
done
python -m experiments.summarize $OUT/*_to_* --by source.data,dataset \
  --columns seeds,acc,dense_acc,macs_kept,params_kept --out results/chipnet/transfer.md
