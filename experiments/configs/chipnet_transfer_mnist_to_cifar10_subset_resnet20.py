"""Mask transfer the other way: masks learned on the MNIST subset, applied to a fresh
ResNet-20 trained from scratch on the CIFAR-10 subset.

  python -m experiments.main \
      --config experiments/configs/chipnet_mnist_subset_32x3_resnet20.py --workdir runs/chipnet_mnist_r20
  python -m experiments.main \
      --config experiments/configs/chipnet_transfer_mnist_to_cifar10_subset_resnet20.py \
      --workdir runs/transfer_mnist_to_c10 --config.method.transfer_from=runs/chipnet_mnist_r20
"""

from experiments.configs import chipnet_cifar10_subset_resnet20 as r20


def get_config(arg: str | None = None):
  c = r20.get_config(arg)
  c.method.transfer_from = "runs/chipnet_mnist_r20"
  return c
