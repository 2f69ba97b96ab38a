"""ChipNet: soft pruning of per-group masks to a budget -> best hard mask; or mask transfer.

``soft_prune`` (``jaxprune.methods.chipnet``): AdamW on the weights, Adam without
decay on ζ, batch ``method.soft.batch_size``, per-step β/γ/s schedules. At each
epoch end ζ is thresholded to the budget and the hard-pruned network evaluated on
the selection split; the best is kept (``soft_prune/best.msgpack``, across a resume)
and the pipeline slims and finetunes it. ``method.select_bn_batches > 0`` re-estimates each
candidate's BatchNorm statistics on that many training batches before it is evaluated
(not in the official code). Mask transfer (``method.transfer_from=<a
ChipNet run>``): its ``chipnet_masks.json`` slims a fresh network of this config,
trained from scratch with ``config.train``, as the official code does.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from experiments import phases, pruning
from experiments.configs import defaults
from experiments.magnitude import volumes
from experiments.pruning import trace_state  # noqa: F401 (used by ChipNet's tests and colab)
from experiments.recipe import Dense, Experiment, Outcome, Recipe
from jaxprune import training as T
from jaxprune.methods import chipnet

MASKS_FILE = 'chipnet_masks.json'
SELECT_ON = ('train', 'holdout', 'test', 'last')


def make_apply_fns(graphdef, graph: jaxprune.ChannelGraph):
  """(soft_apply, hard_apply): every masked group scaled by its soft mask z(ζ; β, γ) (β, γ
  from the traced ``hparams``; residual streams on branch units whole), or by the binary
  mask ``extra['hard']``."""
  soft_masks = lambda v, hp: graph.complete(chipnet.project(v.extra['zeta'], hp.beta, hp.gamma)[1])
  soft = pruning.masked_apply(graphdef, graph, soft_masks)
  return soft, pruning.masked_apply(graphdef, graph, lambda v, hp: v.extra['hard'])


def soft_prune(exp: Experiment, dense: Dense, graph: jaxprune.ChannelGraph, unit: str) -> dict:
  """The soft-pruning phase; returns the best record (step, accuracy, hard, zeta, variables)."""
  config, m, d = exp.config, exp.config.method, os.path.join(exp.workdir, 'soft_prune')
  sched = chipnet.Schedule(steps_per_epoch=float(m.schedule_steps_per_epoch))
  hparams_fn = lambda step: chipnet.hparams(step, sched)
  soft_apply, hard_apply = make_apply_fns(dense.graphdef, graph)
  weights = dict(w_budget=float(m.w_budget), w_crisp=float(m.w_crisp), min_channels=int(m.min_channels))

  def extra_loss(v, batch, fwd, *, rng=None, hparams=None):
    return chipnet.penalty(graph, v.extra['zeta'], hparams, budget=float(m.budget), unit=unit, **weights)

  if m.select_on in ('test', 'holdout'):
    batches = phases.eval_slice(config, m.select_on)
  else:
    batches = phases.eval_slice(config, 'train', int(m.select_size), seed=config.seed)
  evaluate = phases.make_eval_fn(config, hard_apply, mesh=exp.mesh, batches=batches)
  evaluate_soft = phases.make_eval_fn(config, soft_apply, mesh=exp.mesh, batches=batches)
  bn_batches = phases.train_batches(config, int(m.select_bn_batches), seed=config.seed + 2)
  recalibrate = phases.bn_recalibration(hard_apply)
  units = chipnet.unit_groups(graph)
  cost = jax.jit(lambda h: chipnet.budget_ratio(graph, {n: h[n] for n in units}, unit))
  log = T.MetricsWriter(os.path.join(d, 'selection.jsonl'))

  def keep_best(step, state):  # at epoch ends; with select_on='last' the latest is the best
    zeta = pruning.host_copy(state.extra['zeta'])
    hard = chipnet.threshold(zeta, graph, float(m.budget), unit, min_channels=int(m.min_channels))
    state = state._replace(extra={**state.extra, 'hard': hard})
    # The candidate as selected and finetuned; soft pruning goes on from `state`.
    cand = recalibrate(state, bn_batches)
    acc = float('nan') if m.select_on == 'last' else evaluate(cand)['accuracy']
    best = phases.load_tree(os.path.join(d, 'best.msgpack'))
    better = best is None or m.select_on == 'last' or acc > float(best['accuracy'])
    # The soft network on the same split: a gap to the hard one means the masks are not crisp yet.
    soft_acc = evaluate_soft(state, hparams_fn(step))['accuracy']
    kept = int(sum(np.asarray(h).sum() for h in hard.values()))
    rec = {'step': step, 'select_accuracy': acc, 'soft_accuracy': soft_acc, 'hard_ratio': float(cost(hard))}
    log.write({**rec, 'kept_channels': kept, 'best': better})
    if better:
      best = {'step': step, 'accuracy': acc, 'hard': hard, 'zeta': zeta, 'variables': T.core_variables(cand)}
      phases.save_tree(os.path.join(d, 'best.msgpack'), pruning.host_copy(best))
    return state

  # No decay on ζ (official); `hard` is set at epoch ends, not trained.
  tx = T.partition({'params': optax.adamw(m.soft.lr, weight_decay=m.soft.weight_decay),
                    'zeta': optax.adam(m.soft.zeta_lr), 'hard': None})  # fmt: skip
  step = phases.Step(soft_apply, hard_apply, extra_loss, hparams_fn, keep_best, tx, optax.constant_schedule(m.soft.lr))
  soft_cfg = config.copy_and_resolve_references()
  soft_cfg.data.batch_size = int(m.soft.batch_size)  # ChipNet prunes at batch 32
  overrides = dict(epochs=m.soft.epochs, optimizer='adamw', lr=m.soft.lr, weight_decay=m.soft.weight_decay)
  overrides.update(schedule='constant', warmup_epochs=0.0)
  zeta = chipnet.init(jax.random.PRNGKey(config.seed + 1), graph, float(m.zeta_init))
  extra, start = {'zeta': zeta, 'hard': graph.ones()}, (dense.graphdef, dense.state)
  phases.train(exp._replace(config=soft_cfg), 'soft_prune', start, overrides=overrides, step=step, extra=extra,
               seed_offset=1)  # fmt: skip
  return phases.load_tree(os.path.join(d, 'best.msgpack'))


def check(exp: Experiment) -> None:
  m = exp.config.method
  if m.select_on not in SELECT_ON:
    raise ValueError(f'method.select_on must be one of {SELECT_ON}, got {m.select_on!r}')
  if not m.transfer_from:  # a bad budget fails before any training
    graphdef, state = T.create_train_state(phases.build_model(exp.config), optax.identity(), 0)
    graph = pruning.trace(exp, graphdef, state, branches=pruning.branch_units(m))
    chipnet.check_budget(graph, m.budget, m.budget_type, min_channels=m.min_channels)


def start(exp: Experiment) -> Dense:
  """The dense start; for a transfer a fresh network (and, with ``method.pretrained``,
  that dense run's accuracy on this data set, for reference)."""
  m = exp.config.method
  if not m.transfer_from:
    return pruning.dense_start(exp)
  graphdef, fresh = T.create_train_state(phases.build_model(exp.config), optax.identity(), exp.config.seed)
  return pruning.counted(exp, graphdef, fresh, pruning.dense_start(exp).metrics if m.pretrained else {})


def run(exp: Experiment, dense: Dense) -> Outcome:
  m = exp.config.method
  graph = pruning.method_graph(exp, dense)
  if m.transfer_from:
    path = os.path.join(m.transfer_from, MASKS_FILE) if os.path.isdir(m.transfer_from) else m.transfer_from
    masks, source = pruning.load_masks(path, graph)
    return Outcome(masks=masks, graph=graph, finetune={}, source=source)  # from scratch: config.train
  unit = chipnet.check_budget(graph, m.budget, m.budget_type, min_channels=m.min_channels)
  best = soft_prune(exp, dense, graph, unit)
  hard = {k: jnp.asarray(v) for k, v in best['hard'].items()}
  meta = dict(budget=float(m.budget), budget_type=m.budget_type, unit=unit, model=exp.config.model.name)
  pruning.save_masks(os.path.join(exp.workdir, MASKS_FILE), hard, **meta, data=exp.config.data.name)
  last = T.read_jsonl(os.path.join(exp.workdir, 'soft_prune', 'selection.jsonl'))[-1]
  details = dict(hard_pruned_select_accuracy=float(best['accuracy']), best_step=int(best['step']))
  details.update(budget_type=m.budget_type, soft_accuracy_last=last['soft_accuracy'], units=m.units)
  details.update(volumes(graph, hard))
  variables = jax.tree.map(jnp.asarray, best['variables'])
  return Outcome(masks=hard, variables=variables, graph=graph, budget=float(m.budget), unit=unit, details=details)


recipe = Recipe(defaults=defaults.chipnet, run=run, check=check, start=start)
