"""Dense ResNet-56 on the shipped CIFAR-10 subset.

  python -m experiments.main --config experiments/configs/dense_cifar10_subset_resnet56.py \
      --workdir runs/dense_r56
  python -m experiments.main \
      --config experiments/configs/dense_cifar10_subset_resnet56.py:quick --workdir runs/r56_quick

ResNet-56 is about 3x ResNet-20 per step: about 2 min per epoch on 2 CPU cores.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base()
  c.model.name = 'resnet56'
  c.train.epochs = 3
  c.train.warmup_epochs = 0.5
  if arg == 'quick':
    c.train.epochs = 1
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; expected 'quick' or none.")
  return c
