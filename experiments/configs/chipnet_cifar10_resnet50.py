"""ChipNet on ResNet-50 and full CIFAR-10, volume budget 12.5% (the paper's Table 2 setting).

The paper reports, for this setting, 2.8% of the parameters and 5.1% of the
FLOPs kept (maintainers' numbers, issue #14 of transmuteAI/ChipNet). For
accelerators; needs CIFAR-10 in data_dir:

  python -m experiments.main --config experiments/configs/chipnet_cifar10_resnet50.py \
      --workdir runs/chipnet_c10_r50 --config.data.data_dir=/data
  # budgets 50/25/6.25% from the same dense network:
  python -m experiments.main --config experiments/configs/chipnet_cifar10_resnet50.py \
      --workdir runs/chipnet_c10_r50_v25 --config.data.data_dir=/data \
      --config.method.budget=0.25 --config.method.pretrained=runs/chipnet_c10_r50

Caveat: the zoo's ResNet-50 is torchvision's (7x7/2 stem + max-pool, so a
32x32 image is 8x8 at layer1); the official CIFAR ResNet-50 has a 3x3
stride-1 stem (16x16 at layer1). Accuracies and the MAC split differ from
the paper's accordingly; the pruning procedure is the same. WRN-26-12 (the
paper's main CIFAR network): chipnet_cifar10_wrn26_12.py.
"""

from experiments.configs import chipnet_cifar10_resnet56, dense_cifar10_resnet56


def get_config(arg: str | None = None):
  c = chipnet_cifar10_resnet56.paper_recipe(dense_cifar10_resnet56.get_config(arg))
  c.model.name = "resnet50"
  c.method.budget = 0.125
  return c
