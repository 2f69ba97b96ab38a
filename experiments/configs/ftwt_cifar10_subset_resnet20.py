"""FTWT dynamic gating of ResNet-20 on the shipped CIFAR-10 subset.

Pretrain (6 epochs, the dense config) -> FTWT predictors + backbone with
per-sample gates (4 epochs; predictor lr 0.1 constant, backbone lr 0.01) ->
test accuracy and per-sample MACs (mean / spread, exact and paper counts).

  python -m experiments.main \
      --config experiments/configs/ftwt_cifar10_subset_resnet20.py --workdir runs/ftwt_r20
  # reuse a finished dense run, other r, joint mode, GMP predictors:
  python -m experiments.main \
      --config experiments/configs/ftwt_cifar10_subset_resnet20.py --workdir runs/ftwt_r20_95 \
      --config.method.pretrained=runs/dense_r20 --config.method.r=0.95 \
      --config.method.mode=joint --config.method.pool=max
  # CPU smoke run:
  python -m experiments.main \
      --config experiments/configs/ftwt_cifar10_subset_resnet20.py:quick --workdir runs/ftwt_quick
"""

from experiments.configs import defaults, dense_cifar10_subset_resnet20


def get_config(arg: str | None = None):
  c = dense_cifar10_subset_resnet20.get_config(arg)
  c.method = defaults.ftwt()
  if arg == "quick":
    c.method.epochs = 1
  return c
