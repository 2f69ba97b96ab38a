"""FTWT on ResNet-20 and the shipped CIFAR-10 subset with the official recipe, scaled.

Dense: `dense_official_cifar10_subset_resnet20.py` (30 epochs). FTWT (job_dynamic.sh):
20 epochs from that dense network, gates at the official points (units="branch");
backbone SGD momentum 0.9, lr 0.01, x0.1 at epochs 10 and 15, weight decay 5e-4;
predictors SGD momentum 0.9, lr 0.1 constant, no decay; mask loss off after half
the steps.

  python -m experiments.main \
      --config experiments/configs/ftwt_official_cifar10_subset_resnet20.py --workdir runs/ftwt_r08 \
      --config.method.pretrained=runs/dense_off --config.method.r=0.8
  # joint mode, today's stream units:
  ... --config.method.mode=joint   |   --config.method.units=stream
"""

from experiments.configs import defaults
from experiments.configs import dense_official_cifar10_subset_resnet20 as dense


def get_config(arg: str | None = None):
  c = dense.get_config(arg)
  c.method = defaults.ftwt()
  c.method.epochs = 20 if arg != 'quick' else 1
  c.method.backbone_lr = 0.01
  c.method.decay_epochs = (10, 15) if arg != 'quick' else ()
  c.method.weight_decay = 5e-4
  c.method.predictor_lr = 0.1
  c.method.cooldown = 0.5
  return c
