"""The ``config.method`` block of every method, with its defaults.

Config files start from these (``c.method = defaults.magnitude()``) and the
pipeline checks a config's method keys against them, so a misspelled key is
an error listing the valid ones. Nothing here imports pipeline code.

Keys every pruning method shares:

  name         the method (``jaxprune.methods.available()``, or 'dense')
  pretrained   workdir of a finished run whose dense network to start from
               (its ``pretrain`` or dense ``train`` phase) instead of pretraining
  finetune     ``config.train`` overrides of the finetune after slimming
"""

from ml_collections import config_dict

from jaxprune.methods import chipnet as chipnet_lib


def dense() -> config_dict.ConfigDict:
  """Plain training: no method."""
  return config_dict.ConfigDict({'name': 'dense'})


def magnitude() -> config_dict.ConfigDict:
  """Score channels -> keep a budget -> slim -> finetune (one-shot or iterative)."""
  return config_dict.ConfigDict(
    {
      'name': 'magnitude',
      'criterion': 'l1',  # l1 | l2 | bn_scale | fpgm | random
      'budget': 0.5,  # fraction of the dense cost kept, in `unit`
      'unit': 'macs',  # macs | flops | params | channels | volume
      'scope': 'global',  # global (scores normalized per group) | local (same ratio per group)
      'steps': 1,  # 1: one-shot; n: n geometric stages with finetuning between
      'iter_finetune_epochs': 1,
      'min_channels': 1,
      'round_to': 1,  # kept channels per group rounded down to a multiple
      'finetune': {'epochs': 4, 'lr': 0.02},
      'pretrained': config_dict.placeholder(str),
    }
  )


def chipnet() -> config_dict.ConfigDict:
  """ChipNet soft pruning -> best hard mask -> slim -> finetune; or mask transfer."""
  return config_dict.ConfigDict(
    {
      'name': 'chipnet',
      'budget': 0.5,  # fraction of the dense network kept, in (0, 1]
      'budget_type': 'volume',  # channels | volume | params | flops (= MACs)
      'min_channels': 1,  # every group keeps this many: no layer/stage vanishes
      'w_budget': chipnet_lib.W_BUDGET,
      'w_crisp': chipnet_lib.W_CRISP,
      'zeta_init': chipnet_lib.ZETA_INIT_HIGH,  # ζ ~ U(0, zeta_init)
      # Steps per "epoch" of the β/γ/s schedules: the paper's 45k images / batch 32.
      # Smaller values compress the schedule (with a larger soft.zeta_lr to match).
      'schedule_steps_per_epoch': chipnet_lib.PAPER_STEPS_PER_EPOCH,
      'soft': {'epochs': 20, 'batch_size': 32, 'lr': 1e-3, 'weight_decay': 1e-3, 'zeta_lr': 1e-3},
      'select_on': 'train',  # train (a fixed slice, no augmentation) | test | last
      'select_size': 1000,  # images of the train slice used for selection
      'finetune': {'epochs': 4, 'lr': 0.02, 'optimizer': 'sgd', 'weight_decay': 5e-4},
      'pretrained': config_dict.placeholder(str),
      # Workdir of a ChipNet run whose masks to apply to a fresh network of this
      # config, trained from scratch (config.train) instead of soft pruning.
      'transfer_from': config_dict.placeholder(str),
    }
  )


def ftwt() -> config_dict.ConfigDict:
  """FTWT per-sample gates: predictors + backbone trained with the gates on."""
  return config_dict.ConfigDict(
    {
      'name': 'ftwt',
      'r': 0.9,  # share of activation mass kept per sample and layer, in (0, 1]
      'mode': 'decoupled',  # decoupled | joint
      'pool': 'avg',  # avg (official code) | max (paper figure)
      'pretrained': config_dict.placeholder(str),
      'epochs': 4,  # predictor training epochs (backbone trains too)
      'backbone_lr': 0.01,
      'predictor_lr': 0.1,
      'weight_decay': 5e-4,  # backbone only
      'cooldown': 0.5,  # mask-loss weight 1 before this fraction of the epochs, 0 after
      'seed': 0,  # predictor init
    }
  )
