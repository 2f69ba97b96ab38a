"""Training phases from a config: the model, the data, one resumable phase, evaluation.

:func:`train` runs one phase (pretrain, a method's search, finetune, ...) in
``workdir/<phase>``; every phase appends to ``workdir/metrics.jsonl``
(records carry ``phase``). A phase cut short (``train.stop_after_steps`` or
a preemption notice) raises :class:`PhaseStopped`; running the same command
again resumes it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization
from ml_collections import config_dict

from experiments.recipe import Experiment
from jaxprune import data as data_lib
from jaxprune import models as models_lib
from jaxprune import training as T


class PhaseStopped(Exception):
  """A phase stopped before its last step (debug stop or preemption)."""


class PhaseResult(NamedTuple):
  graphdef: nnx.GraphDef
  state: T.TrainState
  history: list[dict[str, Any]]
  eval: dict[str, float]  # last eval record of the phase ({} if none)
  steps_per_epoch: int


class Step(NamedTuple):
  """How a phase's training differs from plain training (every field optional).

  Attributes:
    apply_fn: the forward, ``apply_fn(variables, images, *, train, rng,
      hparams) -> T.Forward`` (default: the model, ``T.nnx_apply``).
    eval_apply_fn: the forward of the phase's evaluations (default: apply_fn).
    extra_loss: added to the cross-entropy (see ``T.make_train_step``).
    hparams_fn: ``step -> pytree`` passed (traced) to every step.
    on_epoch_end: ``(step, state) -> state or None`` after each epoch.
    stop_when: ``state -> bool`` after each epoch (and a restore): True ends
      the phase there.
    tx: the optimizer (default: from the phase's train config).
    schedule: the learning rate logged with ``tx`` (default: the config's).
  """

  apply_fn: T.steps.ApplyFn | None = None
  eval_apply_fn: T.steps.ApplyFn | None = None
  extra_loss: T.steps.ExtraLoss | None = None
  hparams_fn: Callable[[int], Any] | None = None
  on_epoch_end: Callable[[int, T.TrainState], T.TrainState | None] | None = None
  tx: optax.GradientTransformation | None = None
  schedule: optax.Schedule | None = None
  stop_when: Callable[[T.TrainState], bool] | None = None


def experiment(config: config_dict.ConfigDict, workdir: str) -> Experiment:
  return Experiment(config, workdir, T.make_mesh(), {})


def seed_checkpoint(exp: Experiment, source: str, phase: str, step: int) -> None:
  """Start ``phase`` from another run's checkpoint at ``step`` (copied into this run's
  workdir unless the phase already has checkpoints of its own: a resume wins)."""
  src = os.path.join(source, phase, 'checkpoints', str(step))
  dst = os.path.join(exp.workdir, phase, 'checkpoints')
  if not os.path.isdir(src):
    raise FileNotFoundError(
      f'no checkpoint of phase {phase!r} at step {step} in {source} ({src} is missing): record that run '
      'with a larger checkpoint.keep, or pick a step it kept'
    )
  if not os.path.isdir(dst) and jax.process_index() == 0:
    shutil.copytree(src, os.path.join(dst, str(step)))


def timed(exp: Experiment, name: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)``, its wall seconds added to ``exp.times[name]``."""
  t0 = time.time()
  try:
    return fn(*args, **kwargs)
  finally:
    exp.times[name] = round(exp.times.get(name, 0.0) + time.time() - t0, 2)


def global_batch(config: config_dict.ConfigDict, key: str = 'batch_size') -> int:
  b = int(config.data[key])
  return b * jax.device_count() if config.data.scale_batch_with_devices else b


def build_model(config: config_dict.ConfigDict, *, seed: int | None = None) -> nnx.Module:
  """The model named in ``config.model`` for ``config.data``'s classes/channels
  (``config.model.kwargs.num_classes``, if set, wins: e.g. a multitask model's
  ``{task: classes}``)."""
  info = data_lib.get_info(config.data.name)
  kwargs = config.model.kwargs.to_dict()
  if info.image_shape[-1] != 3:
    kwargs.setdefault('in_channels', info.image_shape[-1])
  kwargs.setdefault('num_classes', info.num_classes)  # a multitask model: {task: classes}
  seed = config.seed if seed is None else seed
  return models_lib.create(config.model.name, rngs=nnx.Rngs(seed), **kwargs)


def steps_per_epoch(config: config_dict.ConfigDict, train_cfg: Mapping[str, Any] | None = None) -> int:
  train_cfg = config.train if train_cfg is None else train_cfg
  spe = data_lib.steps_per_epoch(
    config.data.name,
    global_batch(config) // jax.process_count(),
    data_dir=config.data.data_dir,
    drop_last=config.data.drop_last,
    holdout=config.data.holdout,
  )
  cap = train_cfg.get('max_steps_per_epoch')
  return min(spe, cap) if cap else spe


def make_eval_fn(
  config: config_dict.ConfigDict, apply_fn: T.steps.ApplyFn, *, mesh: jax.sharding.Mesh, batches: list | None = None
) -> Callable[..., dict[str, float]]:
  """``eval_fn(state, hparams=None) -> {'loss', 'accuracy', 'count'}`` over ``batches``
  (default: the whole test split)."""
  eval_step = T.make_eval_step(apply_fn, mesh=mesh)
  bs, data = global_batch(config, 'eval_batch_size'), config.data

  def eval_fn(state, hparams=None):
    split = batches or data_lib.eval_batches(data.name, 'test', batch_size=bs, data_dir=data.data_dir)
    return T.evaluate(eval_step, state, split, batch_size=bs, mesh=mesh, hparams=hparams)

  return eval_fn


def eval_slice(config: config_dict.ConfigDict, split: str, size: int | None = None, seed: int = 0) -> list:
  """Unaugmented eval batches of a split (e.g. for model selection): all of it in file
  order, a fixed random slice of ``size`` images, or (``split='holdout'``) the
  training records ``config.data.holdout`` keeps out of training."""
  bs, data = global_batch(config, 'eval_batch_size'), config.data
  if split == 'holdout':
    if not data.holdout:
      raise ValueError('no holdout split: set config.data.holdout to the number of training records to keep out')
    x, y = data_lib.load_arrays(data.name, 'train', data_dir=data.data_dir)
    idx = data_lib.holdout_indices(len(y), int(data.holdout), int(data.holdout_seed))
  elif size is None:
    return list(data_lib.eval_batches(data.name, split, batch_size=bs, data_dir=data.data_dir))
  else:
    x, y = data_lib.load_arrays(data.name, split, data_dir=data.data_dir)
    pool = np.arange(len(y))
    if split == 'train' and data.holdout:  # the records training sees, never the held-out ones
      pool = np.setdiff1d(pool, data_lib.holdout_indices(len(y), int(data.holdout), int(data.holdout_seed)))
    idx = np.sort(np.random.default_rng(seed).permutation(pool)[:size])
  info = data_lib.get_info(data.name)
  x, y = data_lib.normalize(x[idx], info.mean, info.std), np.asarray(y[idx], np.int32)
  return [{'image': x[i : i + bs], 'label': y[i : i + bs]} for i in range(0, len(idx), bs)]


def train_batches(config: config_dict.ConfigDict, num: int, seed: int = 0) -> list:
  """``num`` unaugmented batches of ``data.batch_size`` training images (holdout
  excluded), drawn without replacement and cycled when the split is smaller."""
  if num <= 0:
    return []
  bs = global_batch(config)
  x = np.concatenate([b['image'] for b in eval_slice(config, 'train', num * bs, seed=seed)])
  x = np.resize(x, (num * bs, *x.shape[1:]))
  return [{'image': x[i * bs : (i + 1) * bs]} for i in range(num)]


def bn_recalibration(apply_fn: T.steps.ApplyFn, hparams: Any = None) -> Callable[[T.TrainState, list], T.TrainState]:
  """``recalibrate(state, batches)``: ``state`` with its BatchNorm running statistics
  re-estimated by train-mode forwards of ``apply_fn`` over ``batches`` (no gradient,
  weights untouched). Compiled once, for every state and batch list of one shape.

  A hard-pruned network keeps the running statistics of the network it was cut from,
  which no longer match its activations; its accuracy before any training then says
  little about the mask (the "adaptive BN" of EagleEye, Li et al. 2020). With
  running-average momentum m the old statistics keep a weight m ** len(batches).
  """
  fwd = jax.jit(lambda s, images: apply_fn(T.variables(s), images, train=True, hparams=hparams).batch_stats)

  def recalibrate(state: T.TrainState, batches: list) -> T.TrainState:
    for batch in batches:
      state = state._replace(batch_stats=fwd(state, batch['image']))
    return state

  return recalibrate


def evaluate(exp: Experiment, graphdef: nnx.GraphDef, state: T.TrainState) -> dict[str, float]:
  """Test loss and accuracy of the plain network ``(graphdef, state)``."""
  return make_eval_fn(exp.config, T.nnx_apply(graphdef), mesh=exp.mesh)(state)


def train(
  exp: Experiment,
  phase: str,
  start: nnx.Module | tuple[nnx.GraphDef, T.TrainState],
  *,
  overrides: Mapping[str, Any] | None = None,
  step: Step = Step(),
  extra: Any = None,
  seed_offset: int = 0,
  continue_schedule: bool = False,
  stop_at: int | None = None,
) -> PhaseResult:
  """Trains one phase in ``workdir/<phase>``; resumes it if it was cut short.

  Starts from a model (split here, fresh optimizer state) or from
  ``(graphdef, state)``, e.g. the previous phase's result: by default its
  optimizer state is re-initialised for this phase's optimizer and its step
  reset to 0, so schedules start over. With ``continue_schedule`` the state's
  optimizer state, step and rng are kept and the phase runs the rest of the
  train config's schedule, reading the data from where a single phase would
  be at that step (e.g. after slimming the network and its optimizer state
  in the middle of training).

  ``stop_at`` ends the phase (as finished) after that many steps of its
  schedule, e.g. to prune at an epoch and continue with ``continue_schedule``.

  ``overrides`` replace ``config.train`` keys for this phase (e.g. ``{'epochs':
  5, 'lr': 0.01}`` for a finetune); ``extra`` is the method's trainable pytree
  next to the model (``state.extra``; default: the start state's).

  Raises:
    PhaseStopped: when ``train.stop_after_steps`` (or a preemption) stopped it.
  """
  config, mesh = exp.config, exp.mesh
  train_cfg = dict(config.train)
  train_cfg.update(dict(overrides or {}))
  spe = steps_per_epoch(config, train_cfg)
  total = int(round(train_cfg['epochs'] * spe))
  tx, schedule = step.tx, step.schedule
  if tx is None:
    lr = train_cfg['lr']
    if train_cfg.get('lr_reference_batch'):
      lr = lr * global_batch(config) / train_cfg['lr_reference_batch']
    tx, config_schedule = T.optim_from_config({**train_cfg, 'lr': lr}, spe, total_steps=total)
    schedule = schedule or config_schedule
  rng = jax.random.PRNGKey(config.seed + seed_offset)
  if isinstance(start, nnx.Module):
    graphdef, state = T.create_train_state(start, tx, rng, extra=extra)
  else:
    graphdef, prev = start
    # A copy: the train step donates its input, and the caller may still need
    # the previous phase's state (to compare, score or restart from).
    prev = jax.tree.map(jnp.copy, prev)
    extra = prev.extra if extra is None else extra
    if continue_schedule:
      state = prev._replace(extra=extra)
    else:
      opt_state = tx.init({'params': prev.params, 'extra': extra})
      state = prev._replace(step=jnp.zeros((), jnp.int32), extra=extra, rng=rng, opt_state=opt_state)
  apply_fn = step.apply_fn or T.nnx_apply(graphdef)
  train_iter = data_lib.train_iterator(
    config.data.name,
    batch_size=global_batch(config) // jax.process_count(),
    seed=config.seed + seed_offset,
    data_dir=config.data.data_dir,
    augment=config.data.augment,
    drop_last=config.data.drop_last,
    holdout=config.data.holdout,
    holdout_seed=config.data.holdout_seed,
  )
  begin = int(state.step)
  if begin:  # continue_schedule: the data from where one uninterrupted phase would be
    train_iter.set_state({'next_index': begin})
  hooks = T.Hooks(
    T.make_train_step(apply_fn, tx, extra_loss=step.extra_loss, schedule=schedule, mesh=mesh),
    eval_fn=make_eval_fn(config, step.eval_apply_fn or apply_fn, mesh=mesh),
    hparams_fn=step.hparams_fn,
    on_epoch_end=step.on_epoch_end,
    stop_when=step.stop_when,
  )
  plan = T.Plan(
    num_steps=max((total if stop_at is None else min(stop_at, total)) - begin, 0),
    steps_per_epoch=spe,
    eval_every_epochs=train_cfg.get('eval_every_epochs', 1),
    log_every=train_cfg.get('log_every', 10),
    checkpoint_every=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    stop_after_steps=train_cfg.get('stop_after_steps'),
    on_nonfinite=train_cfg.get('on_nonfinite', 'stop'),
    max_skipped_steps=train_cfg.get('max_skipped_steps', 10),
  )
  result = T.fit(
    state,
    train_iter,
    hooks,
    plan,
    workdir=os.path.join(exp.workdir, phase),
    mesh=mesh,
    phase=phase,
    metrics_path=os.path.join(exp.workdir, 'metrics.jsonl'),
    progress=config.progress,
  )
  if result.stopped_early:
    raise PhaseStopped(f'phase {phase!r} stopped at step {int(result.state.step)}')
  evals = [r for r in result.history if r['split'] == 'test']
  return PhaseResult(graphdef, result.state, result.history, evals[-1] if evals else {}, spe)


def save_tree(path: str, tree: Any) -> None:
  """A pytree of arrays as msgpack, written atomically (e.g. a method's best-so-far,
  kept across a resume)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    f.write(serialization.msgpack_serialize(tree))
  os.replace(path + '.tmp', path)


def load_tree(path: str) -> Any:
  """What :func:`save_tree` wrote, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    return serialization.msgpack_restore(f.read())


def mean_train_loss(exp: Experiment, graphdef: nnx.GraphDef, state: T.TrainState) -> float:
  """Mean cross-entropy of a network over one epoch of the (augmented) training data, in
  eval mode (e.g. ManiDP's reference loss before its first epoch)."""
  fwd = jax.jit(lambda v, x: T.nnx_apply(graphdef)(v, x, train=False).logits)
  c = exp.config
  it = data_lib.train_iterator(c.data.name, batch_size=global_batch(c), seed=c.seed, data_dir=c.data.data_dir,
                               holdout=c.data.holdout)  # fmt: skip
  total, n = 0.0, 0
  for _ in range(steps_per_epoch(c)):
    b = next(it)
    logits = fwd(T.variables(state), jnp.asarray(b['image']))
    total += float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(b['label'])).sum())
    n += len(b['label'])
  return total / n
