"""ChipNet on VGG-16 (BN) and the shipped CIFAR-10 subset (CPU-sized; VGG is slow on CPU).

  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_vgg16.py --workdir runs/chipnet_vgg16
  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_vgg16.py:quick --workdir runs/chipnet_vgg16_q

The dense VGG config trains one epoch only (XLA on CPU is slow for VGG);
pass --config.train.epochs=... on a faster machine. Schedule as in
chipnet_cifar10_subset_resnet20.py.
"""

from experiments.configs import chipnet_cifar10_subset_resnet20 as r20
from experiments.configs import defaults, dense_cifar10_subset_vgg16


def get_config(arg: str | None = None):
  c = dense_cifar10_subset_vgg16.get_config(arg)
  c.method = defaults.chipnet()
  r20.set_cpu_schedule(c.method, quick=arg == "quick")
  return c
