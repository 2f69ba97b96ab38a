"""Magnitude channel pruning of vgg16 on the shipped CIFAR-10 subset (baseline for the methods).

  python -m experiments.main \
      --config experiments/configs/magnitude_cifar10_subset_vgg16.py --workdir runs/magnitude_vgg16
  python -m experiments.main \
      --config experiments/configs/magnitude_cifar10_subset_vgg16.py:quick --workdir runs/mag_vgg16_quick
"""

from experiments.configs import defaults, dense_cifar10_subset_vgg16


def get_config(arg: str | None = None):
  c = dense_cifar10_subset_vgg16.get_config(arg)
  c.method = defaults.magnitude()
  if arg == "quick":
    c.method.finetune.epochs = 1
  return c
