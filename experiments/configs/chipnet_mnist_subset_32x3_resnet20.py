"""ChipNet on ResNet-20 and the shipped MNIST subset (padded to 32x32x3): the mask source
for transfer to CIFAR-10 (chipnet_transfer_mnist_to_cifar10_subset_resnet20.py).

  python -m experiments.main \
      --config experiments/configs/chipnet_mnist_subset_32x3_resnet20.py --workdir runs/chipnet_mnist_r20

4,000 training images; same compressed schedule as chipnet_cifar10_subset_resnet20.py.
"""

from experiments.configs import chipnet_cifar10_subset_resnet20 as r20


def get_config(arg: str | None = None):
  c = r20.get_config(arg)
  c.data.name = "mnist_subset_32x3"
  return c
