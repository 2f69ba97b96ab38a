"""The shared config layout; every experiment config starts from ``base()``.

Layout (methods add their own keys under ``config.method``)::

  seed                 int
  model.name           see jaxprune.models.available()
  model.kwargs         extra model constructor arguments
  data.name            see jaxprune.data.available_datasets()
  data.data_dir        where non-shipped data sets live (None: shipped/default)
  data.batch_size      GLOBAL train batch (split over devices and hosts)
  data.eval_batch_size GLOBAL eval batch (last batch padded)
  data.augment         train augmentation on/off
  data.drop_last       drop each epoch's last partial batch
  data.holdout         training records kept out (validation; eval_slice(config, 'holdout'))
  data.scale_batch_with_devices  batch sizes are per device (x device count)
  train.epochs, optimizer ('sgd'|'adamw'), lr, momentum, nesterov,
  train.weight_decay, schedule ('cosine'|'step'|'constant'), warmup_epochs,
  train.decay_epochs, decay_factor (step schedule), end_lr, grad_clip_norm,
  train.lr_reference_batch  if set, lr *= global_batch / lr_reference_batch
  train.log_every      steps between train-metric records
  train.eval_every_epochs
  train.max_steps_per_epoch  debug: cap the steps of an epoch (CPU smoke runs)
  train.stop_after_steps     debug: stop a phase after this many steps
                             without a final checkpoint (tests resumption)
  train.on_nonfinite   'stop': a NaN/Inf loss term or update stops the run naming the
                       step, the term and the last good checkpoint; 'skip': drop that
                       step's update and go on
  train.max_skipped_steps    with 'skip': stop anyway after this many per phase
  checkpoint.every_steps, checkpoint.keep
  checkpoint.force_resume    resume a workdir whose run had another config
                             (experiments/workdir.py lists what may change freely)
  method.name          'dense' or a method of jaxprune.methods.available(); its keys: configs/defaults.py
  progress             tqdm progress bar (only on a TTY)
  distributed          call jax.distributed.initialize() (multi-host)
"""

from ml_collections import config_dict


def base() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0
  c.model = config_dict.ConfigDict({'name': 'resnet20', 'kwargs': config_dict.ConfigDict()})
  c.data = config_dict.ConfigDict(
    {
      'name': 'cifar10_subset',
      'data_dir': config_dict.placeholder(str),
      'batch_size': 128,
      'eval_batch_size': 256,
      'augment': True,
      'drop_last': True,  # drop each epoch's last partial batch (False: keep it, as PyTorch)
      'holdout': 0,  # training records kept out of training (a validation split for selection)
      'holdout_seed': 0,
      'scale_batch_with_devices': False,
    }
  )
  c.train = config_dict.ConfigDict(
    {
      'epochs': 10,
      'optimizer': 'sgd',
      'lr': 0.1,
      'momentum': 0.9,
      'nesterov': True,
      'weight_decay': 5e-4,
      'schedule': 'cosine',
      'warmup_epochs': 0.0,
      'decay_epochs': (),
      'decay_factor': 0.1,
      'end_lr': 0.0,
      'grad_clip_norm': config_dict.placeholder(float),
      'lr_reference_batch': config_dict.placeholder(int),
      'log_every': 10,
      'eval_every_epochs': 1,
      'max_steps_per_epoch': config_dict.placeholder(int),
      'stop_after_steps': config_dict.placeholder(int),
      'on_nonfinite': 'stop',
      'max_skipped_steps': 10,
    }
  )
  c.checkpoint = config_dict.ConfigDict({'every_steps': 200, 'keep': 2, 'force_resume': False})
  c.method = config_dict.ConfigDict({'name': 'dense'})
  c.progress = True
  c.distributed = False
  return c
