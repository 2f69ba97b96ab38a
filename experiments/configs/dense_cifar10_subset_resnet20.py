"""Dense ResNet-20 on the shipped CIFAR-10 subset (5,085 train / 1,017 test).

  python -m experiments.main --config experiments/configs/dense_cifar10_subset_resnet20.py \
      --workdir runs/dense_r20
  # CPU smoke run (2 epochs):
  python -m experiments.main \
      --config experiments/configs/dense_cifar10_subset_resnet20.py:quick --workdir runs/r20_quick

Sized for 2 CPU cores: about 40 s per epoch (train + eval).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base()
  c.model.name = 'resnet20'
  c.train.epochs = 6
  c.train.lr = 0.1
  c.train.weight_decay = 5e-4
  c.train.warmup_epochs = 0.5  # lr 0.1 on a cold ResNet is unstable on 5k images
  if arg == 'quick':
    c.train.epochs = 2
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; expected 'quick' or none.")
  return c
