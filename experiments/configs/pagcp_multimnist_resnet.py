"""PAGCP on MultiMNIST (two digits per 36x36 image, tasks left and right) with the zoo's
multitask ResNet (a shared residual encoder, one head per task).

Dense: 12 epochs SGD Nesterov lr 0.05 cosine, batch 128, 500 training images held out
as PAGCP's validation set. PAGCP: 2 rounds (scan every encoder channel group, top-k
filter, 2 masked finetune epochs), then slim and finetune 4 epochs.

  python -m experiments.main --config experiments/configs/pagcp_multimnist_resnet.py --workdir runs/pagcp
  # one task's loss guides (the single-task ablation):
  python -m experiments.main --config experiments/configs/pagcp_multimnist_resnet.py \
      --workdir runs/pagcp_left --config.method.guide=left --config.method.pretrained=runs/pagcp
  # task-blind global L1 of the encoder to PAGCP's FLOPs (its ratios.flops):
  python -m experiments.main --config experiments/configs/pagcp_multimnist_resnet.py \
      --workdir runs/l1 --config.method.guide=l1 --config.method.target=0.45 --config.method.pretrained=runs/pagcp
  # three tasks (left, right, their sum):
  python -m experiments.main --config experiments/configs/pagcp_multimnist_resnet.py:sum --workdir runs/pagcp3
"""

from experiments.configs import common, defaults


def get_config(arg: str | None = None):
  c = common.base()
  c.model.name = 'multitask_resnet'
  c.model.kwargs.num_classes = {'left': 10, 'right': 10}
  c.data.name = 'multimnist'
  c.data.holdout = 500
  c.train.epochs = 12
  c.train.lr = 0.05
  c.method = defaults.pagcp()
  if arg == 'sum':
    c.data.name = 'multimnist3'
    c.model.kwargs.num_classes = {'left': 10, 'right': 10, 'sum': 19}
  elif arg == 'quick':  # a smoke run (tests)
    c.model.kwargs.widths = (8, 16)
    c.data.holdout = 64
    c.train.epochs = 1
    c.train.max_steps_per_epoch = 3
    c.method.rounds = 1
    c.method.round_finetune = {'epochs': 1, 'lr': 0.01}
    c.method.finetune = {'epochs': 1, 'lr': 0.01}
    c.method.oracle_batch = 32
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; expected 'sum', 'quick' or none.")
  return c
