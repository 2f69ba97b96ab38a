"""Why a ChipNet run's hard-pruned network is far below its soft one.

  python results/chipnet/hard_gap.py RUN [RUN ...]     (ChipNet workdirs; from the repo root)

For the last soft-pruning checkpoint of each run: accuracy on the selection split
(the held-out images) of the soft network, of the hard-thresholded one, and of
the hard one after re-estimating its BatchNorm statistics on 10 and 30 training
batches; then, per unit, the channels kept and the soft masks z of the removed
ones. A removed channel whose z is not ~0 still carried signal in the soft
network. Prints one JSON record per run.
"""

from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from ml_collections import config_dict

from experiments import chipnet as recipe
from experiments import phases, pruning
from jaxprune import training as T
from jaxprune.methods import chipnet


def _int_keys(tree):
  """Orbax restores list indices of a template-free tree as strings ('0', '1', ...)."""
  if not isinstance(tree, dict):
    return tree
  return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}


def hard_gap(workdir: str) -> dict:
  config = config_dict.ConfigDict(json.load(open(os.path.join(workdir, 'config.json'))))
  m, ckpts = config.method, os.path.join(workdir, 'soft_prune', 'checkpoints')
  step = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  raw = _int_keys(ocp.PyTreeCheckpointer().restore(os.path.join(ckpts, str(step), 'state')))
  exp = phases.experiment(config, workdir)
  graphdef, state = T.create_train_state(phases.build_model(config), optax.identity(), 0)
  graph = pruning.trace(exp, graphdef, state, branches=m.units == 'branch')
  soft_apply, hard_apply = recipe.make_apply_fns(graphdef, graph)
  zeta = {k: jnp.asarray(v) for k, v in raw['extra']['zeta'].items()}
  hp = chipnet.hparams(step, chipnet.Schedule(steps_per_epoch=float(m.schedule_steps_per_epoch)))
  hard = chipnet.threshold(zeta, graph, float(m.budget), chipnet.unit_of(m.budget_type), min_channels=m.min_channels)
  state = state._replace(params=raw['params'], batch_stats=raw['batch_stats'], other=raw['other'])
  state = state._replace(extra={'zeta': zeta, 'hard': hard})
  split = 'holdout' if config.data.holdout else 'test'
  batches = phases.eval_slice(config, split)
  hard_acc = phases.make_eval_fn(config, hard_apply, mesh=exp.mesh, batches=batches)
  out = {'run': os.path.basename(os.path.normpath(workdir)), 'step': step, 'gamma': float(hp.gamma), 'split': split}
  out['soft'] = phases.make_eval_fn(config, soft_apply, mesh=exp.mesh, batches=batches)(state, hp)['accuracy']
  out['hard'] = hard_acc(state)['accuracy']
  recalibrate = phases.bn_recalibration(hard_apply)
  for n in (10, 30):
    recal = recalibrate(state, phases.train_batches(config, n, seed=2))
    out[f'hard_bn{n}'] = hard_acc(recal)['accuracy']
  z = chipnet.project(zeta, hp.beta, hp.gamma)[1]
  units = {}
  for name in z:
    zz, keep = np.asarray(z[name]), np.asarray(hard[name]) > 0
    gone = zz[~keep]
    units[name] = {
      'kept': int(keep.sum()),
      'size': int(keep.size),
      'removed_z_mean': round(float(gone.mean()), 3) if gone.size else None,
      'removed_z_max': round(float(gone.max()), 3) if gone.size else None,
    }
  out['units'] = units
  return out


if __name__ == '__main__':
  for run in sys.argv[1:]:
    print(json.dumps(hard_gap(run)), flush=True)
