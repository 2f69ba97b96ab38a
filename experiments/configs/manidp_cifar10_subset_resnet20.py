"""ManiDP on ResNet-20 and the shipped CIFAR-10 subset, from the same dense network as the
FTWT runs (`dense_official_cifar10_subset_resnet20.py`), 20 epochs (the length of the
FTWT runs): SGD Nesterov 0.9, lr 0.05 cosine per step, weight decay 5e-4 on the
backbone, none on the gates, batch 128; target kept rate 0.65, lambda_sparse 5e-3,
lambda_sim 1.0 (the official README's CIFAR example).

  python -m experiments.main \
      --config experiments/configs/manidp_cifar10_subset_resnet20.py --workdir runs/manidp_065 \
      --config.method.pretrained=runs/dense_off
  # other target rate; ablations without the similarity term or complexity weighting:
  ... --config.method.target_rate=0.5
  ... --config.method.lambda_sim=0
  ... --config.method.thre_cls=1e9      (w = 1 for every sample: plain L1 sparsity)
"""

from experiments.configs import defaults
from experiments.configs import dense_official_cifar10_subset_resnet20 as dense


def get_config(arg: str | None = None):
  c = dense.get_config(arg)
  c.method = defaults.manidp()
  if arg == 'quick':
    c.method.epochs = 2
  return c
