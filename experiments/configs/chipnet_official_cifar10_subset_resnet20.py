"""ChipNet on ResNet-20 (projection shortcuts, as the official code builds it) and the
shipped CIFAR-10 subset, with the official recipe scaled to the subset.

Data: 4,585 training / 500 validation images of the shipped training set (the official
45k/5k split; `data.holdout`), hard-mask selection on validation, final numbers on the
1,017 test images. Dense (pretraining.py): 30 epochs, SGD momentum 0.9, lr 0.05,
weight decay 1e-3, batch 128, lr x0.5 every 10 epochs. Soft pruning (pruning.py):
10 epochs, AdamW lr 1e-3, weight decay 1e-3 (none on the gates), batch 32, budget
weight 30, crispness weight 10, the per-step beta/gamma schedules of the subset
configs. Finetune (finetuning.py): 20 epochs, SGD momentum 0.9, lr 0.05, weight decay
1e-3, x0.5 every 7 epochs. Units: the official ones (`method.units='branch'`).

  python -m experiments.main \
      --config experiments/configs/chipnet_official_cifar10_subset_resnet20.py --workdir runs/chip_v25 \
      --config.method.budget=0.25 --config.method.pretrained=runs/dense_chip
  # the magnitude baseline on the same units (BN scales), same finetune:
  python -m experiments.main \
      --config experiments/configs/chipnet_official_cifar10_subset_resnet20.py:magnitude \
      --workdir runs/mag_v25 --config.method.budget=0.25 --config.method.pretrained=runs/dense_chip
  # not official: re-estimate each hard candidate's BN statistics (30 batches) before selecting
  ... --config.method.select_bn_batches=30
  # the dense network alone:
  python -m experiments.main \
      --config experiments/configs/chipnet_official_cifar10_subset_resnet20.py:dense --workdir runs/dense_chip
"""

from experiments.configs import common, defaults
from experiments.configs.chipnet_cifar10_subset_resnet20 import set_cpu_schedule

FINETUNE = {
  'epochs': 20,
  'lr': 0.05,
  'optimizer': 'sgd',
  'momentum': 0.9,
  'nesterov': False,
  'weight_decay': 1e-3,
  'schedule': 'step',
  'decay_epochs': (7, 14),
  'decay_factor': 0.5,
  'warmup_epochs': 0.0,
}


def get_config(arg: str | None = None):
  c = common.base()
  c.model.name = 'resnet20'
  c.model.kwargs.shortcut = 'B'
  c.data.holdout = 500
  c.train.epochs = 30
  c.train.lr = 0.05
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 1e-3
  c.train.schedule = 'step'
  c.train.decay_epochs = (10, 20)
  c.train.decay_factor = 0.5
  c.train.warmup_epochs = 0.0
  kind, _, quick = (arg or '').partition(':')
  if kind == 'quick':
    kind, quick = '', 'quick'
  if kind == 'dense':
    c.method = defaults.dense()
  elif kind == 'magnitude':
    c.method = defaults.magnitude()
    c.method.units = 'branch'
    c.method.criterion = 'bn_scale'  # the official baseline: global |gamma| of the BN scales
    c.method.unit = 'volume'
    c.method.finetune = dict(FINETUNE)
  elif kind == '':
    c.method = defaults.chipnet()
    c.method.units = 'branch'
    c.method.budget_type = 'volume'
    set_cpu_schedule(c.method)
    c.method.soft.epochs = 10
    c.method.soft.lr = 1e-3
    c.method.soft.weight_decay = 1e-3
    c.method.soft.batch_size = 32
    c.method.select_on = 'holdout'
    c.method.finetune = dict(FINETUNE)
  else:
    raise ValueError(f"Unknown config argument {arg!r}; expected '', 'magnitude', 'dense' (optionally ':quick')")
  if quick:
    c.train.epochs = 1
    c.train.max_steps_per_epoch = 5
    if kind == '':
      set_cpu_schedule(c.method, quick=True)
      c.method.select_on = 'holdout'
    if 'finetune' in c.method:
      c.method.finetune = {**dict(c.method.finetune), 'epochs': 1}
  return c
