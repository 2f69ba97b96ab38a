"""Dense ResNet-56 on full CIFAR-10 (50k/10k), the usual baseline (~93.5-94%).

Needs CIFAR-10 in ``data_dir`` (official binary ``cifar-10-batches-bin`` or tfds):

  python -m experiments.main --config experiments/configs/dense_cifar10_resnet56.py \
      --workdir runs/dense_cifar10_r56 --config.data.data_dir=/data
  # He et al. (2016) recipe: 160 epochs, step decay at 80/120, wd 1e-4:
  python -m experiments.main --config experiments/configs/dense_cifar10_resnet56.py:he2016 \
      --workdir runs/dense_cifar10_r56_he --config.data.data_dir=/data
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base()
  c.model.name = 'resnet56'
  c.data.name = 'cifar10'
  c.data.batch_size = 128
  c.data.eval_batch_size = 1000
  c.train.epochs = 200
  c.train.lr = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.schedule = 'cosine'
  c.train.log_every = 100
  c.checkpoint.every_steps = 2000
  c.checkpoint.keep = 3
  if arg == 'he2016':
    c.train.epochs = 160
    c.train.nesterov = False
    c.train.weight_decay = 1e-4
    c.train.schedule = 'step'
    c.train.decay_epochs = (80, 120)
    c.train.decay_factor = 0.1
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; expected 'he2016' or none.")
  return c
