"""EPI (pruning-aware training) on ResNet-20 and the shipped CIFAR-10 subset: 30 epochs
from scratch with the official-schedule recipe of the FTWT runs (SGD momentum 0.9, lr 0.1,
weight decay 5e-4, batch 128, x0.1 at epochs 15 and 23), p = 50% of the MACs.

  # when EPI fires (magnitude criterion; taylor: --config.method.criterion=taylor):
  python -m experiments.main --config experiments/configs/epi_cifar10_subset_resnet20.py \
      --workdir runs/epi_mag --config.method.tau_magnitude=0.98
  # the dense run recording both EPI curves, keeping a checkpoint per epoch:
  python -m experiments.main --config experiments/configs/epi_cifar10_subset_resnet20.py \
      --workdir runs/epi_dense --config.method.prune_epoch=-2 --config.checkpoint.keep=40
  # the oracle sweep: prune at epoch 8, the dense part taken from the recorded run:
  python -m experiments.main --config experiments/configs/epi_cifar10_subset_resnet20.py \
      --workdir runs/epi_at8 --config.method.prune_epoch=8 --config.method.dense_from=runs/epi_dense
"""

from experiments.configs import defaults
from experiments.configs import dense_official_cifar10_subset_resnet20 as dense


def get_config(arg: str | None = None):
  c = dense.get_config(arg)
  c.method = defaults.epi()
  return c
