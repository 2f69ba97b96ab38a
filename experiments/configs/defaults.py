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
      # stream: channel groups (a residual stream is one group); branch: residual
      # branches (the seed methods' units, residual streams kept whole)
      'units': 'stream',
      'finetune': {'epochs': 4, 'lr': 0.02},
      'pretrained': config_dict.placeholder(str),
    }
  )


def chipnet() -> config_dict.ConfigDict:
  """ChipNet soft pruning -> best hard mask -> slim -> finetune; or mask transfer."""
  return config_dict.ConfigDict(
    {
      'name': 'chipnet',
      # branch: the official units (stem, inner convs, the last BN of every residual branch,
      # projections; streams never masked); stream: every channel group
      'units': 'branch',
      'budget': 0.5,  # fraction of the dense network kept, in (0, 1]
      # channels | volume | params | flops (= MACs) | volume_paper (the official volume count)
      'budget_type': 'volume',
      'min_channels': 1,  # every group keeps this many: no layer/stage vanishes
      'w_budget': chipnet_lib.W_BUDGET,
      'w_crisp': chipnet_lib.W_CRISP,
      'zeta_init': chipnet_lib.ZETA_INIT_HIGH,  # ζ ~ U(0, zeta_init)
      # Steps per "epoch" of the β/γ/s schedules: the paper's 45k images / batch 32.
      # Smaller values compress the schedule (with a larger soft.zeta_lr to match).
      'schedule_steps_per_epoch': chipnet_lib.PAPER_STEPS_PER_EPOCH,
      'soft': {'epochs': 20, 'batch_size': 32, 'lr': 1e-3, 'weight_decay': 1e-3, 'zeta_lr': 1e-3},
      # train (a fixed slice, no augmentation) | holdout (config.data.holdout) | test | last
      'select_on': 'train',
      'select_size': 1000,  # images of the train slice used for selection
      # > 0: re-estimate each hard candidate's BatchNorm statistics on this many training
      # batches (data.batch_size) before selecting; 0: the official code's selection
      'select_bn_batches': 0,
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
      # branch: the official gate points (stem, both convs of every block, the second
      # before the residual add); stream: one gate per channel group (a stream gated once)
      'units': 'branch',
      'r': 0.9,  # share of activation mass kept per sample and layer, in (0, 1]
      'mode': 'decoupled',  # decoupled | joint
      'pool': 'avg',  # avg (official code) | max (paper figure)
      'pretrained': config_dict.placeholder(str),
      'epochs': 4,  # predictor training epochs (backbone trains too)
      'backbone_lr': 0.01,
      # backbone lr x decay_factor at these epochs of the FTWT phase; () = the official
      # 81/122/151 of 200 epochs, scaled to `epochs`
      'decay_epochs': (),
      'decay_factor': 0.1,
      'predictor_lr': 0.1,
      'weight_decay': 5e-4,  # backbone only
      'cooldown': 0.5,  # mask-loss weight 1 before this fraction of the epochs, 0 after
      'seed': 0,  # predictor init
    }
  )


def manidp() -> config_dict.ConfigDict:
  """ManiDP per-sample saliency gates with sparsity and similarity terms."""
  return config_dict.ConfigDict(
    {
      'name': 'manidp',
      'target_rate': 0.65,  # kept rate rho* the thresholds reach at the last epoch, in (0, 1]
      'lambda_sparse': 5e-3,  # the official README's CIFAR example
      'lambda_sim': 1.0,
      'thre_cls': 0.5,  # C = thre_cls x the previous epoch's mean CE
      'gamma': 1.0,  # complexity-weight exponent
      # w_b treated as a constant (the paper); False reproduces the official code's gradient
      'detach_weights': True,
      'clamp_max': 1000.0,
      'squeeze_rate': 2,  # gate hidden width C/q (q halved for layers of < 80 channels)
      'epochs': 20,
      'lr': 0.05,  # cosine per step, SGD Nesterov 0.9
      'weight_decay': 5e-4,  # backbone only; none on the gates
      'grad_clip_norm': 0.0,  # 0: off (official); else clip the backbone's and the gates' gradients
      'gate_init_scale': 1.0,  # 1: official Kaiming init of the gate FCs; < 1 starts the gates nearer 1
      'c_ref': 0.0,  # C before the first epoch; 0: the dense network's mean training CE
      'seed': 0,  # gate init
      'pretrained': config_dict.placeholder(str),
    }
  )


def epi() -> config_dict.ConfigDict:
  """EPI: train from scratch, prune once when the dominant sub-network is stable, keep training."""
  return config_dict.ConfigDict(
    {
      'name': 'epi',
      'criterion': 'magnitude',  # magnitude (per-group-normalised L2) | taylor (BN, first order): triggers
      'prune_ratio': 0.5,  # fraction of `unit` removed at the prune
      'unit': 'macs',  # the cost unit of the prune ratio
      'min_keep': 1,
      'r': 5,  # sub-networks EPI averages over
      'window': 5,  # the trigger: EPI not lower than any of the last `window` values
      'indicator': 'epi',  # epi | early_bird
      # tau per criterion; 0: the paper's ImageNet defaults (0.983 magnitude, 0.944 Taylor)
      'tau_magnitude': 0.0,
      'tau_taylor': 0.0,
      # -1: when EPI fires; -2: never (the dense run, recording both EPI curves); e >= 0: at epoch e
      'prune_epoch': -1,
      'dense_from': config_dict.placeholder(str),  # a recorded dense run to start the dense phase from
      'finetune_epochs': 30,  # of the train -> prune -> finetune schedule in the compute comparison
      'units': 'stream',  # stream: channel groups (a residual stream is one group) | branch
    }
  )


def pagcp() -> config_dict.ConfigDict:
  """PAGCP: per-task-loss-aware greedy channel pruning of a multitask network, in rounds."""
  return config_dict.ConfigDict(
    {
      'name': 'pagcp',
      # all: every task's loss guides (PAGCP); a task name: that task's loss alone (the
      # single-task ablation); l1: task-blind global L1 of the encoder to `target`
      'guide': 'all',
      'delta0': 0.05,  # the first unit's tolerated relative loss rise
      'total': 1.5,  # T: the product of a round's (1 + delta_i); 1.2-2 for a net of few units
      'topk': 0.8,  # fraction of the pruned units whose ratio survives the top-k filter
      'criterion': 'l1',  # per-filter norm: l1 | l2
      'target': 0.0,  # 0: tolerance-driven; else the fraction of target_unit to keep (stop when met)
      'target_unit': 'flops',  # flops | macs | params (paper mode: 2 x MACs, the official count)
      'rounds': 2,  # prune -> finetune rounds
      'round_finetune': {'epochs': 2, 'lr': 0.01},  # config.train overrides, masked, after each round
      'oracle_batch': 50,  # images per oracle step (x the candidate ratios of a unit)
      'official_quirks': False,  # the official handling where no ratio breaks the tolerance
      'finetune': {'epochs': 4, 'lr': 0.01},
      'pretrained': config_dict.placeholder(str),
    }
  )
