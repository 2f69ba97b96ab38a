"""Dense ResNet-20 on the shipped CIFAR-10 subset with FTWT's official baseline recipe.

The official code (job_baseline.sh, cifar.py): SGD momentum 0.9 (no Nesterov), lr 0.1,
weight decay 5e-4, batch 128, lr x0.1 at epochs 81/122/151 of 200; every training
image each epoch (PyTorch keeps the last partial batch). Scaled to the subset: 30
epochs, x0.1 at epochs 15 and 23. The dense start of the FTWT and ManiDP runs.

  python -m experiments.main \
      --config experiments/configs/dense_official_cifar10_subset_resnet20.py --workdir runs/dense_off
  # FTWT's own option-A shortcut (2x2 average pooling, zeros after the stream,
  # no gradient through the shortcut) instead of He et al.'s:
  python -m experiments.main \
      --config experiments/configs/dense_official_cifar10_subset_resnet20.py:avg --workdir runs/dense_avg
"""

from experiments.configs import common

EPOCHS = 30
DECAY_EPOCHS = (15, 23)


def official_train(c):
  """The official dense recipe, scaled to the subset (shared by the FTWT and ManiDP configs)."""
  c.train.epochs = EPOCHS
  c.train.lr = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 5e-4
  c.train.schedule = 'step'
  c.train.decay_epochs = DECAY_EPOCHS
  c.train.decay_factor = 0.1
  c.train.warmup_epochs = 0.0
  c.data.batch_size = 128
  c.data.drop_last = False
  return c


def get_config(arg: str | None = None):
  c = official_train(common.base())
  c.model.name = 'resnet20'
  if arg == 'avg':
    c.model.kwargs.shortcut = 'A_avg'
  elif arg == 'quick':
    c.train.epochs = 2
    c.train.decay_epochs = (1,)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; expected 'avg', 'quick' or none.")
  return c
