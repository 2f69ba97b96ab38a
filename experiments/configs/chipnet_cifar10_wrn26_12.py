"""ChipNet on WRN-26-12 and full CIFAR-10 (or CIFAR-100): the paper's main CIFAR network.

WRN-26-12 as in the official code (`ResNetCifar(BasicBlock, [4, 4, 4], width=12)`):
a 16-channel stem, stages of 192/384/768 channels, projection shortcuts; 52.5M
parameters, so an accelerator job. The paper compares it with magnitude
pruning at volume budgets of about 50/25/12.5/6.25%; the official recipe is
the one of chipnet_cifar10_resnet56.py (200 + 20 + 300 epochs). Needs CIFAR
in data_dir:

  python -m experiments.main --config experiments/configs/chipnet_cifar10_wrn26_12.py \
      --workdir runs/chipnet_c10_wrn --config.data.data_dir=/data
  # the other budgets from the same dense network, with the magnitude baseline:
  python -m experiments.main --config experiments/configs/chipnet_cifar10_wrn26_12.py \
      --workdir runs/chipnet_c10_wrn_v25 --config.data.data_dir=/data \
      --config.method.budget=0.25 --config.method.compare_magnitude=True \
      --config.method.pretrained=runs/chipnet_c10_wrn
  # CIFAR-100: add --config.data.name=cifar100
"""

from experiments.configs import chipnet_cifar10_resnet56, dense_cifar10_resnet56


def get_config(arg: str | None = None):
  c = chipnet_cifar10_resnet56.paper_recipe(dense_cifar10_resnet56.get_config(arg))
  c.model.name = "wrn26_12"
  return c
