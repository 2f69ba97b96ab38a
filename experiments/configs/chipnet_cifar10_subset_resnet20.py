"""ChipNet on ResNet-20 and the shipped CIFAR-10 subset, sized for 2 CPU cores.

Pretrain (6 epochs, as the dense config) -> ChipNet soft pruning to 50% of the
activation volume -> best hard mask -> slim -> finetune (4 epochs).

  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_resnet20.py --workdir runs/chipnet_r20
  # other budgets / types; reuse one dense network for all of them:
  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_resnet20.py --workdir runs/chipnet_r20_v25 \
      --config.method.budget=0.25 --config.method.pretrained=runs/chipnet_r20
  # side by side with magnitude pruning (same dense start, same finetune):
  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_resnet20.py --workdir runs/cmp_f50 \
      --config.method.budget_type=flops --config.method.compare_magnitude=True \
      --config.method.pretrained=runs/chipnet_r20
  # CPU smoke run (about a minute):
  python -m experiments.main \
      --config experiments/configs/chipnet_cifar10_subset_resnet20.py:quick --workdir runs/chipnet_quick

The subset has 5,085 training images: at batch 32 that is 158 steps per
epoch, against the paper's 1,406 on 45k images. The β/γ/s schedules run per
optimizer step; to fit a CPU they are compressed 11.25x here
(schedule_steps_per_epoch = 1406.25 / 11.25 = 125), so the 16 soft epochs
(2,528 steps) span 20 schedule epochs as in the paper (γ reaches its cap of
256 after 14 of them), and ζ's learning rate is raised by the same factor
(Adam moves ζ by about lr per step, so ζ covers the same distance per
schedule epoch). The paper's setting is schedule_steps_per_epoch=1406.25,
soft.zeta_lr=1e-3 (see chipnet_cifar10_resnet56.py).
"""

from experiments.configs import defaults, dense_cifar10_subset_resnet20

COMPRESS = 11.25


def set_cpu_schedule(method, quick: bool = False):
  """The CPU-sized soft-pruning schedule (shared by the subset configs)."""
  method.schedule_steps_per_epoch = defaults.chipnet().schedule_steps_per_epoch / COMPRESS
  method.soft.zeta_lr = 1e-3 * COMPRESS
  method.soft.epochs = 16
  method.finetune.epochs = 4
  if quick:  # a smoke run: everything squeezed into a few steps
    method.soft.epochs = 2
    method.schedule_steps_per_epoch = 5.0
    method.soft.zeta_lr = 0.05
    method.select_size = 256
    method.finetune.epochs = 1


def get_config(arg: str | None = None):
  c = dense_cifar10_subset_resnet20.get_config(arg)
  c.method = defaults.chipnet()
  c.method.budget = 0.5
  c.method.budget_type = "volume"
  set_cpu_schedule(c.method, quick=arg == "quick")
  if arg == "quick":
    c.train.epochs = 1
    c.train.max_steps_per_epoch = 10
  return c
