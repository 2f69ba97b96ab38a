"""Dense ResNet-50 on ImageNet (ILSVRC-2012 via tfds in data_dir), 90 epochs.

Batch 256 per device, lr 0.1 per 256 images (linear scaling: lr = 0.1 x
global_batch / 256), 5 warmup epochs, cosine, wd 1e-4, SGD Nesterov.
For accelerators; on a multi-host TPU pod add ``--config.distributed``:

  python -m experiments.main --config experiments/configs/dense_imagenet_resnet50.py \
      --workdir gs://bucket/runs/dense_in_r50 --config.data.data_dir=gs://bucket/tfds
  # the classic step schedule (decay x0.1 at 30, 60, 80):
  python -m experiments.main --config experiments/configs/dense_imagenet_resnet50.py:step ...
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base()
  c.model.name = 'resnet50'
  c.data.name = 'imagenet2012'
  c.data.batch_size = 256  # per device (scale_batch_with_devices)
  c.data.eval_batch_size = 256  # per device
  c.data.scale_batch_with_devices = True
  c.train.epochs = 90
  c.train.lr = 0.1
  c.train.lr_reference_batch = 256
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 1e-4
  c.train.schedule = 'cosine'
  c.train.warmup_epochs = 5.0
  c.train.log_every = 100
  c.checkpoint.every_steps = 5000
  c.checkpoint.keep = 3
  if arg == 'step':
    c.train.schedule = 'step'
    c.train.warmup_epochs = 0.0
    c.train.decay_epochs = (30, 60, 80)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; expected 'step' or none.")
  return c
