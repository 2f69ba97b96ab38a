"""``train_and_evaluate(config, workdir)``: validate, dispatch to a method's pipeline.

A pipeline is ``pipeline(config, workdir) -> dict`` registered in
:data:`METHODS` (a callable or a lazy ``'module:function'`` string). It is
built from the helpers here, so methods share one loop:

* :func:`build_model` -- the model from ``config.model`` / ``config.data``;
* :func:`run_phase` -- one resumable training phase (pretrain, search,
  finetune, ...) in ``workdir/<phase>``, with the method's ``apply_fn``,
  ``extra_loss``, ``mask``, ``hparams_fn``, optimizer or config overrides;
* :func:`make_eval_fn`, :func:`cost_summary`, :func:`write_results` -- the
  final numbers.

Every phase appends to ``workdir/metrics.jsonl`` (records carry ``phase``).
A pipeline that returns a phase stopped early (``train.stop_after_steps`` or
a preemption notice) stops; running the same command again resumes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import importlib
import json
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from jaxprune import data as data_lib
from jaxprune import models as models_lib
from jaxprune import training as T
from experiments.configs import common

Pipeline = Callable[[config_dict.ConfigDict, str], dict[str, Any]]

# method name -> pipeline, or 'module:function' imported when used (so that
# validating a config imports no method code).
METHODS: dict[str, Pipeline | str] = {
    'magnitude': 'experiments.magnitude:pipeline',
    'chipnet': 'experiments.chipnet:pipeline',
    'ftwt': 'experiments.ftwt:pipeline',
}


def register_method(name: str) -> Callable[[Pipeline], Pipeline]:
  """Decorator: ``@register_method('magnitude') def pipeline(config, workdir)``."""
  def deco(fn):
    METHODS[name] = fn
    return fn
  return deco


class PhaseStopped(Exception):
  """A phase stopped before its last step (debug stop or preemption)."""


class PhaseResult(NamedTuple):
  graphdef: nnx.GraphDef
  state: T.TrainState
  history: list[dict[str, Any]]
  eval: dict[str, float]          # last eval record of the phase ({} if none)
  steps_per_epoch: int


# ----------------------------------------------------------------- validation

def validate(config: config_dict.ConfigDict) -> None:
  """Fails early, with the valid choices, on unknown names or keys."""
  ref = common.base()
  for section in ('model', 'data', 'train', 'checkpoint'):
    unknown = sorted(set(config[section]) - set(ref[section]))
    if unknown:
      raise ValueError(f'Unknown key(s) {unknown} in config.{section}; valid keys: '
                       f'{sorted(ref[section])}')
  unknown = sorted(set(config) - set(ref))
  if unknown:
    raise ValueError(f'Unknown top-level config key(s) {unknown}; valid: {sorted(ref)}')
  if config.model.name not in models_lib.available():
    raise ValueError(f'Unknown model {config.model.name!r}; valid models: '
                     f'{", ".join(models_lib.available())}')
  if config.data.name not in data_lib.available_datasets():
    raise ValueError(f'Unknown data set {config.data.name!r}; valid data sets: '
                     f'{", ".join(data_lib.available_datasets())}')
  if config.method.name not in METHODS:
    raise ValueError(f'Unknown method {config.method.name!r}; valid methods: '
                     f'{", ".join(sorted(METHODS))}')
  if config.train.optimizer not in T.optim.OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {config.train.optimizer!r}; valid: '
                     f'{", ".join(T.optim.OPTIMIZERS)}')
  if config.train.schedule not in T.optim.SCHEDULES:
    raise ValueError(f'Unknown schedule {config.train.schedule!r}; valid: '
                     f'{", ".join(T.optim.SCHEDULES)}')
  n_dev = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    if global_batch(config, key) % n_dev:
      raise ValueError(f'config.data.{key}={global_batch(config, key)} is not divisible '
                       f'by the {n_dev} devices')


def global_batch(config: config_dict.ConfigDict, key: str = 'batch_size') -> int:
  b = int(config.data[key])
  return b * jax.device_count() if config.data.scale_batch_with_devices else b


def _pipeline(name: str) -> Pipeline:
  fn = METHODS[name]
  if isinstance(fn, str):
    module, attr = fn.split(':')
    fn = getattr(importlib.import_module(module), attr)
  return fn


# ------------------------------------------------------------------- building

def build_model(config: config_dict.ConfigDict, *, seed: int | None = None) -> nnx.Module:
  """The model named in ``config.model`` for ``config.data``'s classes/channels."""
  info = data_lib.get_info(config.data.name)
  kwargs = dict(config.model.kwargs)
  if info.image_shape[-1] != 3:
    kwargs.setdefault('in_channels', info.image_shape[-1])
  seed = config.seed if seed is None else seed
  return models_lib.create(config.model.name, num_classes=info.num_classes,
                           rngs=nnx.Rngs(seed), **kwargs)


def steps_per_epoch(config: config_dict.ConfigDict, train_cfg: Mapping[str, Any] | None = None
                    ) -> int:
  train_cfg = config.train if train_cfg is None else train_cfg
  spe = data_lib.steps_per_epoch(config.data.name, global_batch(config) // jax.process_count(),
                                 data_dir=config.data.data_dir)
  cap = train_cfg.get('max_steps_per_epoch')
  return min(spe, cap) if cap else spe


def make_eval_fn(config: config_dict.ConfigDict, apply_fn: T.steps.ApplyFn, *,
                 mesh: jax.sharding.Mesh, split: str = 'test', mask=None, hparams=None
                 ) -> Callable[[T.TrainState], dict[str, float]]:
  """``eval_fn(state) -> {'loss', 'accuracy', 'count'}`` over a whole split."""
  eval_step = T.make_eval_step(apply_fn, mesh=mesh)
  bs = global_batch(config, 'eval_batch_size')

  def eval_fn(state):
    batches = data_lib.eval_batches(config.data.name, split, batch_size=bs,
                                    data_dir=config.data.data_dir)
    return T.evaluate(eval_step, state, batches, batch_size=bs, mesh=mesh, mask=mask,
                      hparams=hparams)
  return eval_fn


def run_phase(config: config_dict.ConfigDict, workdir: str, *, phase: str,
              model: nnx.Module | None = None,
              init: tuple[nnx.GraphDef, T.TrainState] | None = None,
              train_overrides: Mapping[str, Any] | None = None,
              tx: optax.GradientTransformation | None = None,
              schedule: optax.Schedule | None = None,
              apply_fn: T.steps.ApplyFn | None = None,
              eval_apply_fn: T.steps.ApplyFn | None = None,
              extra_loss: T.steps.ExtraLoss | None = None,
              extra: Any = None, mask: Any = None,
              hparams_fn: Callable[[int], Any] | None = None,
              callbacks=(), mesh: jax.sharding.Mesh | None = None,
              seed_offset: int = 0) -> PhaseResult:
  """Trains one phase in ``workdir/<phase>``; resumes it if it was cut short.

  Start from ``model`` (split here, fresh optimizer state) or from ``init =
  (graphdef, state)`` (e.g. the previous phase's result; its optimizer state
  is re-initialised for this phase's optimizer and its step reset to 0, so
  schedules start over). ``train_overrides`` replaces ``config.train`` keys
  for this phase (e.g. ``{'epochs': 5, 'lr': 0.01}`` for a finetune).
  ``tx``/``schedule`` replace the optimizer built from the config (e.g. a
  :func:`jaxprune.training.partition` optimizer for ``extra`` params).

  Raises:
    PhaseStopped: when ``train.stop_after_steps`` (or a preemption) stopped it.
  """
  train_cfg = dict(config.train)
  train_cfg.update(train_overrides or {})
  mesh = T.make_mesh() if mesh is None else mesh
  spe = steps_per_epoch(config, train_cfg)
  num_steps = int(round(train_cfg['epochs'] * spe))
  if tx is None:
    lr = train_cfg['lr']
    if train_cfg.get('lr_reference_batch'):
      lr = lr * global_batch(config) / train_cfg['lr_reference_batch']
    tx, default_schedule = T.optim_from_config({**train_cfg, 'lr': lr}, spe,
                                               total_steps=num_steps)
    schedule = schedule or default_schedule
  rng = jax.random.PRNGKey(config.seed + seed_offset)
  if init is None:
    if model is None:
      model = build_model(config)
    graphdef, state = T.create_train_state(model, tx, rng, extra=extra)
  else:
    graphdef, prev = init
    # A copy: the train step donates its input, and the caller may still need
    # the previous phase's state (to compare, score or restart from).
    prev = jax.tree.map(jax.numpy.copy, prev)
    extra = prev.extra if extra is None else extra
    state = prev._replace(step=jax.numpy.zeros((), jax.numpy.int32), extra=extra, rng=rng,
                          opt_state=tx.init({'params': prev.params, 'extra': extra}))
  apply_fn = T.nnx_apply(graphdef) if apply_fn is None else apply_fn
  eval_apply_fn = apply_fn if eval_apply_fn is None else eval_apply_fn
  step_fn = T.make_train_step(apply_fn, tx, extra_loss=extra_loss, schedule=schedule, mesh=mesh)
  eval_fn = make_eval_fn(config, eval_apply_fn, mesh=mesh, mask=mask)
  train_iter = data_lib.train_iterator(
      config.data.name, batch_size=global_batch(config) // jax.process_count(),
      seed=config.seed + seed_offset, data_dir=config.data.data_dir,
      augment=config.data.augment)
  result = T.fit(
      state, step_fn, train_iter, num_steps=num_steps, steps_per_epoch=spe,
      workdir=os.path.join(workdir, phase), eval_fn=eval_fn,
      eval_every_epochs=train_cfg.get('eval_every_epochs', 1), mask=mask,
      hparams_fn=hparams_fn, mesh=mesh, log_every=train_cfg.get('log_every', 10),
      checkpoint_every=config.checkpoint.every_steps, keep=config.checkpoint.keep,
      progress=config.progress, callbacks=callbacks,
      stop_after_steps=train_cfg.get('stop_after_steps'), phase=phase,
      metrics_path=os.path.join(workdir, 'metrics.jsonl'))
  if result.stopped_early:
    raise PhaseStopped(f'phase {phase!r} stopped at step {int(result.state.step)}')
  evals = [r for r in result.history if r['split'] == 'test']
  return PhaseResult(graphdef, result.state, result.history, evals[-1] if evals else {}, spe)


# -------------------------------------------------------------------- results

def cost_summary(graphdef: nnx.GraphDef, state: T.TrainState,
                 image_shape: tuple[int, ...]) -> dict[str, float]:
  """The core's cost of the model for one image (macs, flops, params, ...),
  the same numbers the pruning pipelines report."""
  import jaxprune  # the core; imported here so validation stays light
  from experiments import pruning
  fn, v = pruning.core_view(graphdef, state)
  graph = jaxprune.trace(fn, v, np.zeros((1, *image_shape), np.float32))
  return pruning.count(graph)


def write_results(workdir: str, config: config_dict.ConfigDict,
                  results: Mapping[str, Any]) -> dict[str, Any]:
  """Writes ``workdir/results.json`` (process 0), atomically; returns it."""
  out = {**results, 'config': config.to_dict()}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, 'results.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(out, f, indent=2, default=str)
    os.replace(tmp, os.path.join(workdir, 'results.json'))
  return out


# ------------------------------------------------------------------ pipelines

@register_method('dense')
def dense_pipeline(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """Plain training: one phase, 'train'."""
  r = run_phase(config, workdir, phase='train')
  info = data_lib.get_info(config.data.name)
  cost = cost_summary(r.graphdef, r.state, info.image_shape)
  return {
      'test_accuracy': r.eval.get('accuracy'),
      'test_loss': r.eval.get('loss'),
      'params': T.num_params(r.state.params),
      'macs': int(cost['macs']),
      'cost': cost,
      'steps': int(r.state.step),
      'steps_per_epoch': r.steps_per_epoch,
  }


def train_and_evaluate(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """Validates ``config``, runs its method's pipeline, writes ``results.json``.

  Returns the results (or ``{'stopped_early': True}`` when a phase stopped
  early; no results.json then -- rerun to resume).
  """
  validate(config)
  pipeline = _pipeline(config.method.name)
  t0 = time.time()
  try:
    results = pipeline(config, workdir)
  except PhaseStopped as e:
    return {'stopped_early': True, 'reason': str(e)}
  results = {**results, 'wall_time_s': round(time.time() - t0, 2),
             'devices': jax.device_count(), 'platform': jax.devices()[0].platform}
  return write_results(workdir, config, results)
