"""Magnitude channel pruning of resnet56 on the shipped CIFAR-10 subset (baseline for the methods).

  python -m experiments.main \
      --config experiments/configs/magnitude_cifar10_subset_resnet56.py --workdir runs/magnitude_resnet56
  python -m experiments.main \
      --config experiments/configs/magnitude_cifar10_subset_resnet56.py:quick --workdir runs/mag_resnet56_quick
"""

from experiments.configs import defaults, dense_cifar10_subset_resnet56


def get_config(arg: str | None = None):
  c = dense_cifar10_subset_resnet56.get_config(arg)
  c.method = defaults.magnitude()
  if arg == "quick":
    c.method.finetune.epochs = 1
  return c
