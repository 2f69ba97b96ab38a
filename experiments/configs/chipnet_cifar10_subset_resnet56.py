"""ChipNet on ResNet-56 and the shipped CIFAR-10 subset (CPU-sized, slow: ~3x ResNet-20).

  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_resnet56.py --workdir runs/chipnet_r56
  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_resnet56.py:quick --workdir runs/chipnet_r56_q

Same compressed schedule as chipnet_cifar10_subset_resnet20.py (see there).
"""

from experiments.configs import chipnet_cifar10_subset_resnet20 as r20
from experiments.configs import defaults, dense_cifar10_subset_resnet56


def get_config(arg: str | None = None):
  c = dense_cifar10_subset_resnet56.get_config(arg)
  c.method = defaults.chipnet()
  r20.set_cpu_schedule(c.method, quick=arg == "quick")
  if arg == "quick":
    c.train.max_steps_per_epoch = 10
  return c
