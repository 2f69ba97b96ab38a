"""Static global L1 baseline for the FTWT and ManiDP runs: the same dense network
(`dense_official_cifar10_subset_resnet20.py`), the same units (residual branches and
inner convs, streams whole), finetuned with FTWT's 20-epoch backbone schedule (SGD
momentum 0.9, lr 0.01, x0.1 at epochs 10 and 15, weight decay 5e-4).

  python -m experiments.main \
      --config experiments/configs/magnitude_official_cifar10_subset_resnet20.py --workdir runs/l1_063 \
      --config.method.pretrained=runs/dense_off --config.method.budget=0.63
"""

from experiments.configs import defaults
from experiments.configs import dense_official_cifar10_subset_resnet20 as dense


def get_config(arg: str | None = None):
  c = dense.get_config(arg)
  c.method = defaults.magnitude()
  c.method.units = 'branch'
  c.method.finetune = {
    'epochs': 20 if arg != 'quick' else 1,
    'lr': 0.01,
    'momentum': 0.9,
    'nesterov': False,
    'weight_decay': 5e-4,
    'schedule': 'step',
    'decay_epochs': (10, 15),
    'decay_factor': 0.1,
    'warmup_epochs': 0.0,
  }
  return c
