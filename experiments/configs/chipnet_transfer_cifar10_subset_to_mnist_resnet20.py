"""Mask transfer: ChipNet masks learned on the CIFAR-10 subset, applied to a fresh ResNet-20
trained from scratch on the MNIST subset (32x32x3), as the official code does.

  # 1. learn masks on CIFAR-10 (writes runs/chipnet_r20/chipnet_masks.json)
  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_resnet20.py --workdir runs/chipnet_r20
  # 2. apply them to a fresh model on MNIST and train it
  python -m experiments.main \
      --config experiments/configs/chipnet_transfer_cifar10_subset_to_mnist_resnet20.py \
      --workdir runs/transfer_c10_to_mnist --config.method.transfer_from=runs/chipnet_r20
  # add --config.method.pretrained=<a dense MNIST run> to report its accuracy too

The pruned network trains for config.train.epochs (6, as the dense config).
"""

from experiments.configs import chipnet_cifar10_subset_resnet20 as r20


def get_config(arg: str | None = None):
  c = r20.get_config(arg)
  c.data.name = "mnist_subset_32x3"
  c.method.transfer_from = "runs/chipnet_r20"
  return c
