"""Dense VGG-16 (BN) on the shipped CIFAR-10 subset.

  python -m experiments.main --config experiments/configs/dense_cifar10_subset_vgg16.py \
      --workdir runs/dense_vgg16
  python -m experiments.main \
      --config experiments/configs/dense_cifar10_subset_vgg16.py:quick --workdir runs/vgg16_quick

VGG-16 is slow on CPU with XLA (see benchmarks/train_step.py): the default is
one epoch; ``:quick`` runs 10 steps.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base()
  c.model.name = 'vgg16'
  c.train.epochs = 1
  c.train.lr = 0.05
  c.train.warmup_epochs = 0.2
  if arg == 'quick':
    c.train.max_steps_per_epoch = 10
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; expected 'quick' or none.")
  return c
