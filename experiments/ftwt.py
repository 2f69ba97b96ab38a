"""FTWT: per-sample gates, trained predictors -> accuracy and per-image MACs (dynamic).

The method's phase, ``ftwt``: the backbone keeps training (SGD lr 0.01, x0.1 at
``method.decay_epochs``, by default 81/122/151 of 200 epochs scaled to
``method.epochs``) with the *predicted* per-sample masks applied; the
predictors train on the mask loss only (SGD lr 0.1 constant, no decay), whose
weight drops to 0 after ``cooldown`` of the epochs (official code, spec B4).
``method.units='branch'`` gates the official points (stem, both convs of every
block, the second before the residual add); ``'stream'`` one gate per channel
group. No slimming: the result is the gated network's test accuracy and
per-image cost (``per_sample.npz`` holds the per-image arrays).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from experiments import phases, pruning
from experiments.configs import defaults
from experiments.recipe import Dense, Experiment, Outcome, Recipe
from jaxprune import training as T
from jaxprune.methods import ftwt


def setup(graphdef, graph, v, x1, *, pool: str = 'avg', mode: str = 'decoupled'):
  """(eval gate points, train apply_fn, eval apply_fn, jitted eval gated fn).

  The units follow the graph (traced with branch groups: the official points).
  Predictors are shared by group name between the train- and eval-mode networks.
  """
  train_fn, eval_fn = pruning.core_fns(graphdef)
  pts_eval, pts_train = (ftwt.gate_points(f, graph, v, x1) for f in (eval_fn, train_fn))
  gated_train = ftwt.gated(train_fn, graph, pts_train, pool=pool, mode=mode)
  gated_eval = ftwt.gated(eval_fn, graph, pts_eval, pool=pool, mode=mode)
  apply_fn, eval_apply = pruning.gated_forward(
    gated_train, gated_eval, lambda v: (T.core_variables(v), v.extra['predictors'])
  )
  return pts_eval, apply_fn, eval_apply, jax.jit(gated_eval)


def evaluate(exp: Experiment, gated_eval, graph, points, state) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Accuracy and per-sample costs (the core's, and FTWT's legacy MACs) over the test
  split: a summary and the per-image arrays."""
  v, preds = T.core_variables(state), state.extra['predictors']
  forward = lambda images: (lambda logits, aux: (logits, aux.masks))(*gated_eval(v, preds, images))
  gates = lambda m: jnp.concatenate([m[q.name] for q in points], -1)
  extra = lambda m: {'macs_legacy': ftwt.legacy_macs(graph, m), 'gates': gates(m),
                     'gates_open': gates(m).mean(-1)}  # fmt: skip
  per, s = pruning.per_sample(exp, forward, graph, extra)
  pm, base = ftwt.predictor_macs(points), ftwt.legacy_base(graph)
  s.update({f'gates_open_{k}': float(getattr(per['gates_open'], k)()) for k in ('mean', 'std')})
  s.update(
    predictor_macs=pm, predictor_params=ftwt.predictor_params(points), macs_with_predictors_mean=s['macs_mean'] + pm
  )
  s['dense_macs'] = dense = float(jaxprune.cost(graph).macs)
  s.update(macs_ratio=s['macs_mean'] / dense, macs_ratio_with_predictors=(s['macs_mean'] + pm) / dense)
  # FTWT's own count (spec B6): what its "FLOPs red." means
  s.update(macs_legacy_mean=float(per['macs_legacy'].mean()), legacy_base=base)
  s['reduction_legacy'] = 1 - s['macs_legacy_mean'] / base
  return s, per


def run(exp: Experiment, dense: Dense) -> Outcome:
  m = exp.config.method
  graph = pruning.method_graph(exp, dense)
  v = T.core_variables(dense.state)
  points, apply_fn, eval_apply, gated_eval = setup(dense.graphdef, graph, v, exp.example, pool=m.pool, mode=m.mode)
  spe = phases.steps_per_epoch(exp.config)
  total = max(1, int(round(m.epochs * spe)))
  backbone_lr = ftwt.backbone_schedule(
    m.epochs, spe, m.backbone_lr, decay_epochs=m.decay_epochs, decay_factor=m.decay_factor
  )
  backbone = optax.chain(optax.add_decayed_weights(m.weight_decay), optax.sgd(backbone_lr, momentum=0.9))
  tx = T.partition({'params': backbone, 'predictors': optax.sgd(m.predictor_lr, momentum=0.9)})
  cool, r = int(m.cooldown * total), float(m.r)

  def extra_loss(v, batch, fwd, *, rng=None, hparams=None):
    loss = ftwt.mask_loss(fwd.aux.logits, ftwt.targets(fwd.aux.peaks, r))
    open_ = jnp.mean(jnp.stack([fwd.aux.masks[p.name].mean() for p in points]))
    return hparams * loss, {'mask_loss': loss, 'gates_open': open_}

  hparams_fn = lambda step: jnp.float32(1.0 if step < cool else 0.0)
  step = phases.Step(apply_fn, eval_apply, extra_loss, hparams_fn, tx=tx, schedule=backbone_lr)
  extra = {'predictors': ftwt.init_predictors(int(m.seed), points)}
  overrides = {'epochs': m.epochs, 'lr': m.backbone_lr}
  res = phases.train(
    exp, 'ftwt', (dense.graphdef, dense.state), overrides=overrides, step=step, extra=extra, seed_offset=1
  )
  ev, per = evaluate(exp, gated_eval, graph, points, res.state)
  details = {'r': r, 'mode': m.mode, 'pool': m.pool, 'gates': len(points), 'units': m.units}
  return pruning.dynamic_outcome(exp, per, ev, dense, details)  # predictors: dynamic.predictor_params


recipe = Recipe(defaults=defaults.ftwt, run=run, check=lambda exp: ftwt.check_r(exp.config.method.r))
