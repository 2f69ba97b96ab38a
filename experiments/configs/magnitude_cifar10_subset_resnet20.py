"""Magnitude channel pruning of ResNet-20 on the shipped CIFAR-10 subset: the README's main job.

Train (6 epochs) -> global L1 channel scores -> keep 50% of the MACs -> slim
-> finetune (4 epochs). About 7 minutes on 2 CPU cores.

  python -m experiments.main \
      --config experiments/configs/magnitude_cifar10_subset_resnet20.py --workdir runs/magnitude_r20
  # other budgets/criteria/units, iterative pruning in 3 stages:
  python -m experiments.main \
      --config experiments/configs/magnitude_cifar10_subset_resnet20.py --workdir runs/mag_it \
      --config.method.budget=0.25 --config.method.steps=3 --config.method.criterion=fpgm
  # CPU smoke run:
  python -m experiments.main \
      --config experiments/configs/magnitude_cifar10_subset_resnet20.py:quick --workdir runs/mag_quick
"""

from experiments.configs import defaults, dense_cifar10_subset_resnet20


def get_config(arg: str | None = None):
  c = dense_cifar10_subset_resnet20.get_config(arg)
  c.method = defaults.magnitude()
  if arg == "quick":
    c.method.finetune.epochs = 1
  return c
