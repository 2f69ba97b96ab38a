"""ChipNet on ResNet-56 and full CIFAR-10 with the paper's settings (accelerator-sized).

Needs CIFAR-10 in data_dir (see dense_cifar10_resnet56.py). Official recipe
(transmuteAI/ChipNet): pretrain SGD lr 0.05, x0.5 every 30 epochs, wd 1e-3,
batch 128, 200 epochs; soft pruning 20 epochs, AdamW lr 1e-3, wd 1e-3
(0 on ζ), batch 32, β/γ/s schedules in full-data epochs (1,406 steps);
finetune SGD lr 0.05, x0.5 every 30 epochs, wd 1e-3, 300 epochs.

  python -m experiments.main --config experiments/configs/chipnet_cifar10_resnet56.py \
      --workdir runs/chipnet_c10_r56 --config.data.data_dir=/data
  # other budgets from the same dense network:
  python -m experiments.main --config experiments/configs/chipnet_cifar10_resnet56.py \
      --workdir runs/chipnet_c10_r56_f40 --config.data.data_dir=/data \
      --config.method.budget_type=flops --config.method.budget=0.4 \
      --config.method.pretrained=runs/chipnet_c10_r56

Differences from the paper: model selection uses a fixed 5,000-image slice
of the training set (the data layer has no held-out split; the paper holds
out 10%), and the zoo's ResNet-56 has option-A (zero-pad) shortcuts where
the official code uses projections.
"""

from ml_collections import config_dict

from experiments.configs import defaults, dense_cifar10_resnet56

HALVE_EVERY_30 = tuple(range(30, 300, 30))


def paper_recipe(c):
  """The official ChipNet recipe on a config whose data is a full CIFAR set."""
  c.train.epochs = 200
  c.train.lr = 0.05
  c.train.nesterov = False
  c.train.weight_decay = 1e-3
  c.train.schedule = "step"
  c.train.decay_epochs = tuple(e for e in HALVE_EVERY_30 if e < 200)
  c.train.decay_factor = 0.5
  c.method = defaults.chipnet()
  c.method.budget_type = "volume"
  c.method.budget = 0.5
  c.method.soft.epochs = 20
  c.method.select_size = 5000
  c.method.finetune = config_dict.ConfigDict(
    {
      "epochs": 300,
      "lr": 0.05,
      "optimizer": "sgd",
      "weight_decay": 1e-3,
      "nesterov": False,
      "schedule": "step",
      "decay_epochs": HALVE_EVERY_30,
      "decay_factor": 0.5,
    }
  )
  return c


def get_config(arg: str | None = None):
  return paper_recipe(dense_cifar10_resnet56.get_config(arg))
