"""``train_and_evaluate(config, workdir)``: one experiment, the same sequence for every method.

  dense start -> the method's phase(s) -> slim -> finetune -> evaluate -> results.json

The method (``config.method.name``) fills in its part through its
:class:`~experiments.recipe.Recipe` (``experiments.registry``); everything
else is shared. Each training phase is resumable in ``workdir/<phase>``: a
run stopped early (``train.stop_after_steps``, a preemption notice or a kill)
resumes when run again with the same workdir, and a finished one returns its
results. The workdir must be writable and hold no run of another config
(``experiments.workdir``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from ml_collections import config_dict

from experiments import phases, pruning, registry, results
from experiments import workdir as workdir_lib
from experiments.configs import common
from experiments.phases import PhaseStopped, global_batch, make_eval_fn
from experiments.recipe import Dense, Experiment, Outcome, check_method_keys
from jaxprune import data as data_lib
from jaxprune import models as models_lib
from jaxprune import training as T

__all__ = ['make_eval_fn', 'train_and_evaluate', 'validate']


def validate(config: config_dict.ConfigDict) -> None:
  """Fails early, with the valid choices, on unknown names or keys."""
  ref = common.base()
  for section in ('model', 'data', 'train', 'checkpoint'):
    unknown = sorted(set(config[section]) - set(ref[section]))
    if unknown:
      raise ValueError(f'Unknown key(s) {unknown} in config.{section}; valid keys: {sorted(ref[section])}')
  unknown = sorted(set(config) - set(ref))
  if unknown:
    raise ValueError(f'Unknown top-level config key(s) {unknown}; valid: {sorted(ref)}')
  if config.model.name not in models_lib.available():
    raise ValueError(f'Unknown model {config.model.name!r}; valid models: {", ".join(models_lib.available())}')
  if config.data.name not in data_lib.available_datasets():
    raise ValueError(
      f'Unknown data set {config.data.name!r}; valid data sets: {", ".join(data_lib.available_datasets())}'
    )
  check_method_keys(config.method, registry.get(config.method.name).defaults())
  if config.train.optimizer not in T.optim.OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {config.train.optimizer!r}; valid: {", ".join(T.optim.OPTIMIZERS)}')
  if config.train.schedule not in T.optim.SCHEDULES:
    raise ValueError(f'Unknown schedule {config.train.schedule!r}; valid: {", ".join(T.optim.SCHEDULES)}')
  if config.train.on_nonfinite not in T.guard.MODES:
    raise ValueError(f'Unknown train.on_nonfinite {config.train.on_nonfinite!r}; valid: {", ".join(T.guard.MODES)}')
  n_dev = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    if global_batch(config, key) % n_dev:
      raise ValueError(f'config.data.{key}={global_batch(config, key)} is not divisible by the {n_dev} devices')


def train_and_evaluate(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the experiment ``config`` in ``workdir`` and writes ``workdir/results.json``
  (and, for a static method, its final network in ``workdir/final``: ``python -m
  experiments.export`` reads it).

  Returns the results (see ``experiments.results``), or ``{'stopped_early':
  True, 'reason': ...}`` when a phase stopped early (no results.json then;
  run again to resume).
  """
  validate(config)
  forced = workdir_lib.prepare(config, workdir)
  if not forced and os.path.exists(os.path.join(workdir, results.FILE)):
    workdir_lib.record(config, workdir, forced)  # neutral changes, if any
    return results.load(workdir)  # finished: nothing to redo
  recipe = registry.get(config.method.name)
  exp = phases.experiment(config, workdir)
  t0 = time.time()
  try:
    if recipe.check is not None:
      recipe.check(exp)  # bad method input fails before any training
    workdir_lib.record(config, workdir, forced)
    dense = phases.timed(exp, 'dense_start', recipe.start or pruning.dense_start, exp)
    out = phases.timed(exp, 'method', recipe.run, exp, dense) if recipe.run else Outcome()
    numbers = _static(exp, dense, out) if out.masks is not None else _final(dense, out)
  except PhaseStopped as e:
    return {'stopped_early': True, 'reason': str(e)}
  r = results.record(
    config,
    **numbers,
    budget=out.budget,
    unit=out.unit,
    dynamic=out.dynamic,
    source=out.source,
    details=out.details,
    phase_times_s=exp.times,
    wall_time_s=round(time.time() - t0, 2),
    devices=jax.device_count(),
    platform=jax.devices()[0].platform,
    cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
  )
  return results.write(workdir, r)


def _static(exp: Experiment, dense: Dense, out: Outcome) -> dict[str, Any]:
  """slim -> finetune: the numbers of a statically pruned network."""
  small = phases.timed(exp, 'slim', pruning.slim, exp, dense, out)
  ft = phases.timed(exp, 'finetune', pruning.finetune, exp, dense.graphdef, small.state, out.finetune)
  graph = dense.graph if out.graph is None else out.graph
  pruning.save_final(exp.workdir, ft.state, out.masks, graph, graph.leaf_shapes == dense.graph.leaf_shapes)
  return {
    'test_accuracy': ft.eval.get('accuracy'),
    'dense_accuracy': dense.metrics.get('accuracy'),
    'pruned_accuracy_before_finetune': small.accuracy,
    'dense': dense.cost,
    'pruned': small.cost,
    'speedup': small.speedup,
    'kept_per_group': pruning.kept_per_group(out.masks),
    'task_accuracy': per_task(ft.eval),
    'dense_task_accuracy': per_task(dense.metrics),
    'group_sizes': {g.name: g.size for g in dense.graph.groups},
  }


def per_task(metrics: dict[str, Any]) -> dict[str, float] | None:
  """A multitask network's test accuracy per task (None for one task)."""
  return {k.split('/', 1)[1]: v for k, v in metrics.items() if k.startswith('accuracy/')} or None


def _final(dense: Dense, out: Outcome) -> dict[str, Any]:
  """A dynamic method's own numbers, or the dense network's (no method)."""
  accuracy = dense.metrics.get('accuracy') if out.accuracy is None else out.accuracy
  return {
    'test_accuracy': accuracy,
    'dense_accuracy': dense.metrics.get('accuracy'),
    'dense': dense.cost,
    'pruned': dense.cost if out.cost is None else out.cost,
    'speedup': out.speedup,
  }


pipeline = train_and_evaluate  # every method's pipeline is this one
