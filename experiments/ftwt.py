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

import os
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

  def apply_fn(v, images, *, train, rng=None, hparams=None):
    if train:
      (logits, stats), aux = gated_train(T.core_variables(v), v.extra['predictors'], images)
      return T.Forward(logits, stats, aux)
    logits, aux = gated_eval(T.core_variables(v), v.extra['predictors'], images)
    return T.Forward(logits, v.batch_stats, aux)

  eval_apply = lambda v, images, *, train=False, rng=None, hparams=None: apply_fn(v, images, train=False)
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
  # Distinct gate patterns over the test set: really per sample, or a few static masks?
  patterns, counts = np.unique(per.pop('gates') > 0.5, axis=0, return_counts=True)
  s.update(patterns=int(len(patterns)), top_pattern_share=float(counts.max() / counts.sum()))
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


def backbone_schedule(m, steps_per_epoch: int) -> optax.Schedule:
  """The backbone's lr: x ``decay_factor`` at ``decay_epochs`` (default: the official
  MultiStep at epochs 81/122/151 of 200, as fractions of the run)."""
  total = max(1, int(round(m.epochs * steps_per_epoch)))
  epochs = tuple(m.decay_epochs) or tuple(m.epochs * f for f in (81 / 200, 122 / 200, 151 / 200))
  drops = {int(round(e * steps_per_epoch)): float(m.decay_factor) for e in epochs if 0 < e < m.epochs}
  return optax.piecewise_constant_schedule(m.backbone_lr, drops or {total + 1: 1.0})


def run(exp: Experiment, dense: Dense) -> Outcome:
  m = exp.config.method
  graph = pruning.trace(exp, dense.graphdef, dense.state, branches=True) if pruning.branch_units(m) else dense.graph
  v = T.core_variables(dense.state)
  points, apply_fn, eval_apply, gated_eval = setup(dense.graphdef, graph, v, exp.example, pool=m.pool, mode=m.mode)
  spe = phases.steps_per_epoch(exp.config)
  total = max(1, int(round(m.epochs * spe)))
  backbone_lr = backbone_schedule(m, spe)
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
  if jax.process_index() == 0:  # per test image, for histograms (experiments.summarize reads the summary)
    np.savez(os.path.join(exp.workdir, 'per_sample.tmp.npz'), **per)
    os.replace(os.path.join(exp.workdir, 'per_sample.tmp.npz'), os.path.join(exp.workdir, 'per_sample.npz'))
  cost = {k: float(per[k].mean()) for k in ('macs', 'flops', 'flops_paper', 'channels', 'volume')}
  cost['params'] = dense.cost['params']  # every weight is stored; predictors: dynamic.predictor_params
  details = {'r': r, 'mode': m.mode, 'pool': m.pool, 'gates': len(points), 'units': m.units}
  return Outcome(accuracy=ev['accuracy'], cost=cost, dynamic=ev, details=details)


def oracle_curve(config, graphdef, state: T.TrainState, rs=(0.8, 0.9, 0.95, 1.0)) -> list[dict[str, float]]:
  """Before training (spec B6): per r, the test accuracy and mean per-sample MACs of the
  network run with FTWT's targets as masks (`ftwt.oracle_masks`, ungated upstream).

  Example (no training; forward passes only):
    >>> graphdef, state = pruning.load_dense(config, "runs/dense_r20")
    >>> oracle_curve(config, graphdef, state)
  """
  _, eval_fn = pruning.core_fns(graphdef)
  v = T.core_variables(state)
  x1 = np.zeros((1, *phases.data_lib.get_info(config.data.name).image_shape), np.float32)
  graph = jaxprune.trace(eval_fn, v, x1)
  points = ftwt.gate_points(eval_fn, graph, v, x1)
  gated_fn, run_masked = jax.jit(ftwt.gated(eval_fn, graph, points)), jax.jit(jaxprune.masked(eval_fn, graph))
  macs_fn, dense = jax.jit(lambda m: ftwt.per_sample_cost(graph, m).macs), float(jaxprune.cost(graph).macs)
  rows = []
  for r in rs:
    correct, macs = 0, []
    for b in phases.eval_slice(config, 'test'):
      x = jnp.asarray(b['image'])
      m = ftwt.oracle_masks(gated_fn, points, v, x, r)
      correct += int((np.asarray(run_masked(v, m, x)).argmax(-1) == b['label']).sum())
      macs.append(np.asarray(macs_fn(m)))
    macs = np.concatenate(macs)
    rows.append({'r': float(r), 'accuracy': correct / macs.size, 'macs_mean': float(macs.mean()),
                 'macs_std': float(macs.std()), 'macs_reduction': 1 - float(macs.mean()) / dense})  # fmt: skip
  return rows


recipe = Recipe(defaults=defaults.ftwt, run=run, check=lambda exp: ftwt.check_r(exp.config.method.r))
