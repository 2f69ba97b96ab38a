"""The one training loop every method reuses: :func:`fit` and :func:`evaluate`.

A method runs one ``fit`` per phase (pretrain, search, finetune, ...), each
with its own ``workdir`` (checkpoints live in ``workdir/checkpoints``), its
own :class:`Hooks` (the jitted step from ``make_train_step`` and optional
evaluation, per-step hyper-parameters and an epoch-end hook) and a
:class:`Plan` (how long, how often to log, evaluate and save). Re-running a
phase with the same workdir resumes it from its latest checkpoint -- train
state, data-iterator position, metric sums, history -- or returns at once
when it had finished. A corrupt latest checkpoint is moved aside with a
warning and the one before is restored.

Every step is guarded (:mod:`jaxprune.training.guard`): a NaN or Inf loss
term or update raises :class:`~jaxprune.training.guard.NonFiniteError`
before anything non-finite is checkpointed, or (``Plan.on_nonfinite='skip'``)
drops that step's update, a bounded number of times.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxprune.training import guard
from jaxprune.training import sharding as sharding_lib
from jaxprune.training.checkpoint import Checkpointer
from jaxprune.training.metrics import Means, MetricsWriter, fmt, progress_bar
from jaxprune.training.state import TrainState

PyTree = Any


class Hooks(NamedTuple):
  """What the loop calls.

  Attributes:
    train_step: ``step(state, batch, mask, hparams) -> (state, metrics)``,
      e.g. from :func:`jaxprune.training.steps.make_train_step`.
    eval_fn: ``eval_fn(state) -> {'loss', 'accuracy', ...}``, run every
      ``Plan.eval_every_epochs`` epochs and at the end (logged as ``test``).
    hparams_fn: ``hparams_fn(step) -> pytree`` passed to every step (traced,
      so ramping a loss weight does not recompile).
    on_epoch_end: ``on_epoch_end(step, state) -> new state or None``, after
      each epoch's last step, before its eval and checkpoint (e.g. a method
      refreshing thresholds or keeping its best mask). Raising stops the loop
      without a checkpoint, as a kill would.
    stop_when: ``stop_when(state) -> bool``, after each epoch's checkpoint and
      after a restore: True ends the phase there, as finished (e.g. a method
      whose trigger fired; a resumed run stops at the same epoch).
  """

  train_step: Callable[..., tuple[TrainState, dict]]
  eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None
  hparams_fn: Callable[[int], PyTree] | None = None
  on_epoch_end: Callable[[int, TrainState], TrainState | None] | None = None
  stop_when: Callable[[TrainState], bool] | None = None


class Plan(NamedTuple):
  """How long a phase runs and how often it logs, evaluates and saves.

  Attributes:
    num_steps: steps to run in this phase (counted from ``state.step``).
    steps_per_epoch: steps per epoch (epoch ends: logs, eval, checkpoint).
    eval_every_epochs: evaluate every this many epochs (and at the end).
    log_every: log windowed train means every this many steps.
    checkpoint_every: also checkpoint every this many steps (epoch ends and
      the last step always are); None: only those.
    keep: checkpoints to keep.
    stop_after_steps: debug: return (as a kill would: no extra checkpoint)
      once the phase has done this many steps, to test resumption.
    on_nonfinite: 'stop': a step whose loss terms or update are NaN/Inf
      raises ``NonFiniteError`` (naming the step, the terms and the last good
      checkpoint); 'skip': its update is dropped (the step counter, schedule
      and data go on) and training continues.
    max_skipped_steps: with 'skip', the phase stops as with 'stop' at the
      non-finite step after this many were skipped.
  """

  num_steps: int
  steps_per_epoch: int
  eval_every_epochs: int = 1
  log_every: int = 100
  checkpoint_every: int | None = None
  keep: int = 2
  stop_after_steps: int | None = None
  on_nonfinite: str = 'stop'
  max_skipped_steps: int = 10


class FitResult(NamedTuple):
  state: TrainState
  history: list[dict[str, Any]]  # epoch-level records, as written to metrics.jsonl
  resumed_from: int | None  # step restored from a checkpoint, if any
  stopped_early: bool  # stop_after_steps or a preemption notice


@dataclasses.dataclass
class _Host:
  """The loop's host-side state; saved with every checkpoint (``meta``)."""

  begin: int  # state.step when the phase started
  step: int
  window: Means  # train metrics since the last train record
  epoch: Means  # train metrics since the epoch began
  history: list[dict[str, Any]]
  t0: float  # wall-clock start, shifted back by the time before a restart
  pending: list = dataclasses.field(default_factory=list)  # (step, device metrics) not yet fetched
  last: dict = dataclasses.field(default_factory=dict)  # the latest step's metrics
  speed_mark: tuple[float, int] = (0.0, 0)  # (time, step) for steps_per_s
  skipped: int = 0  # non-finite steps skipped in this phase
  screen: Callable[[int, dict], bool] | None = None  # False: leave the step out of the means

  def flush(self) -> None:
    # One device->host transfer for all steps since the last flush; sums are
    # added step by step so that they do not depend on where flushes fall.
    pending, self.pending = self.pending, []
    for step, m in jax.device_get(pending):
      if self.screen is not None and not self.screen(step, m):
        continue
      m.pop(guard.FINITE_UPDATE, None)
      self.window.add(m)
      self.epoch.add(m)
      self.last = m

  def meta(self, train_iter) -> dict[str, Any]:
    self.flush()
    return {
      'begin': self.begin,
      'window': self.window.to_json(),
      'epoch': self.epoch.to_json(),
      'history': self.history,
      'elapsed': time.time() - self.t0,
      'skipped': self.skipped,
      'data': train_iter.get_state() if hasattr(train_iter, 'get_state') else None,
    }


def _to_device(batch, mesh):
  if mesh is not None:
    return sharding_lib.shard_batch(batch, mesh)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _pad(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a batch to ``size`` rows; padded rows get ``weight`` 0."""
  n = len(batch['label'])
  out = {k: np.asarray(v) for k, v in batch.items()}
  out['weight'] = np.asarray(out.get('weight', np.ones(n, np.float32)), np.float32)
  if n < size:
    out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in out.items()}
  return out


def evaluate(
  eval_step: Callable[..., dict],
  state: TrainState,
  batches: Iterable[Mapping[str, np.ndarray]],
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  hparams: PyTree | None = None,
) -> dict[str, float]:
  """Mean loss and accuracy over ``batches`` (global batches, same on every host).

  Every batch is padded to ``batch_size`` (one compilation; padding has
  weight 0), and with a mesh each host feeds its slice of it.

  >>> evaluate(make_eval_step(apply_fn), state, eval_batches(...), batch_size=256)  # doctest: +SKIP
  {'loss': 0.61, 'accuracy': 0.79, 'count': 1017.0}
  """
  sums = []
  for b in batches:
    b = _pad(b, batch_size)
    if mesh is not None:
      b = {k: v[sharding_lib.process_slice(batch_size)] for k, v in b.items()}
    sums.append(eval_step(state, _to_device(b, mesh), None, hparams))
  sums = jax.device_get(sums)
  tot = {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) for k in sums[0]} if sums else {}
  n = max(tot.get('count', 0.0), 1.0)
  out = {'loss': tot.get('loss_sum', 0.0) / n, 'accuracy': tot.get('correct', 0.0) / n, 'count': tot.get('count', 0.0)}
  out.update({f'accuracy/{k[8:]}': v / n for k, v in tot.items() if k.startswith('correct/')})
  return out


def _restore(ckpt, state, train_iter, writer, phase) -> tuple[TrainState, _Host, int | None]:
  """The latest checkpoint of the phase, or a fresh start."""
  host = _Host(begin=int(state.step), step=int(state.step), window=Means(), epoch=Means(), history=[], t0=time.time())
  if ckpt is None or ckpt.latest_step() is None:
    return state, host, None
  state, meta = ckpt.restore(state, fallback=True)
  resumed_from = int(state.step)
  if meta.get('data') is not None and hasattr(train_iter, 'set_state'):
    train_iter.set_state(meta['data'])
  host = _Host(
    begin=meta.get('begin', host.begin),
    step=resumed_from,
    window=Means.from_json(meta.get('window')),
    epoch=Means.from_json(meta.get('epoch')),
    history=list(meta.get('history', [])),
    t0=time.time() - meta.get('elapsed', 0.0),
    skipped=meta.get('skipped', 0),
  )
  writer.truncate_after(resumed_from, phase)
  return state, host, resumed_from


class _Log:
  """Writes the phase's records (metrics.jsonl, absl log, progress bar)."""

  def __init__(self, writer: MetricsWriter, phase: str, plan: Plan, host: _Host, progress: bool):
    self.writer, self.phase, self.plan, self.host, self.progress = writer, phase, plan, host, progress
    self.bar = None

  def record(self, split: str, values: Mapping[str, Any]) -> dict[str, Any]:
    h = self.host
    r = {
      'phase': self.phase,
      'step': h.step,
      'epoch': round((h.step - h.begin) / self.plan.steps_per_epoch, 4),
      'split': split,
      **values,
      'time': round(time.time() - h.t0, 3),
    }
    self.writer.write(r)
    return r

  def open_bar(self, target: int) -> None:
    h, spe = self.host, self.plan.steps_per_epoch
    if self.bar is None:
      in_epoch = (h.step - h.begin) % spe
      epoch_idx = (h.step - h.begin) // spe + 1
      self.bar = progress_bar(
        min(spe, target - h.step + in_epoch), f'{self.phase} epoch {epoch_idx}', enabled=self.progress, initial=in_epoch
      )

  def train_window(self) -> None:
    """A ``train`` record: means over the steps since the last one."""
    h = self.host
    h.flush()
    vals = h.window.means()
    if 'lr' in h.last:
      vals['lr'] = float(h.last['lr'])  # the current lr, not a window mean
    now = time.time()
    vals['steps_per_s'] = round((h.step - h.speed_mark[1]) / max(now - h.speed_mark[0], 1e-9), 3)
    h.speed_mark = (now, h.step)
    self.record('train', vals)
    self.bar.set_postfix(fmt(vals))
    h.window = Means()

  def close_bar(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _screen(step: int, metrics: dict, *, host: _Host, plan: Plan, phase: str, writer: MetricsWriter, ckpt) -> bool:
  """False for a skipped non-finite step; raises when the run must stop."""
  terms = guard.nonfinite_terms(metrics)
  if terms is None:
    return True
  where = guard.describe(phase, step, metrics, terms)
  if plan.on_nonfinite == 'skip' and host.skipped < plan.max_skipped_steps:
    host.skipped += 1
    logging.warning('Skipped non-finite %s (%d of at most %d)', where, host.skipped, plan.max_skipped_steps)
    writer.write({'phase': phase, 'step': step, 'split': 'skipped', 'terms': terms})
    return False
  last = ckpt.latest_step() if ckpt is not None else None
  if last is None:
    good = 'There is no checkpoint of this phase yet; running again starts it over.'
  else:
    good = f'The last good checkpoint is step {last} ({ckpt.step_path(last)}); running again resumes from it.'
  skipped = f' after {host.skipped} skipped step(s)' if plan.on_nonfinite == 'skip' else ''
  raise guard.NonFiniteError(
    f'Non-finite training loss at {where}{skipped}. {good} To get past it: lower the learning rate or the '
    "weight of that term, clip gradients (train.grad_clip_norm), or drop such steps with Plan.on_nonfinite='skip' "
    '(config: train.on_nonfinite, train.max_skipped_steps).',
    step=step,
    terms=terms,
    checkpoint=None if last is None else ckpt.step_path(last),
  )


def _end_epoch(state: TrainState, hooks: Hooks, log: _Log, target: int) -> TrainState:
  """Epoch-end hook, the epoch's train means and (when due) its eval."""
  h, plan = log.host, log.plan
  h.flush()  # a non-finite step stops the run before the hook sees its state
  if hooks.on_epoch_end is not None:
    new = hooks.on_epoch_end(h.step, state)
    state = state if new is None else new
  log.train_window()
  vals = h.epoch.means()
  vals.pop('lr', None)
  h.history.append(log.record('train_epoch', vals))
  h.epoch = Means()
  n_epoch = -(-(h.step - h.begin) // plan.steps_per_epoch)
  postfix = fmt(vals)
  if hooks.eval_fn is not None and (n_epoch % plan.eval_every_epochs == 0 or h.step == target):
    ev = log.record('test', dict(hooks.eval_fn(state)))
    h.history.append(ev)
    postfix.update({f'test_{k}': v for k, v in fmt(ev).items()})
  log.bar.set_postfix(postfix)  # the closed bar stays as the epoch's summary line
  logging.info(
    '%s epoch %d (step %d): %s', log.phase, n_epoch, h.step, ', '.join(f'{k} {v}' for k, v in postfix.items())
  )
  log.close_bar()
  return state


def fit(
  state: TrainState,
  train_iter: Iterator[Mapping[str, np.ndarray]],
  hooks: Hooks,
  plan: Plan,
  *,
  workdir: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  phase: str = 'train',
  metrics_path: str | None = None,
  progress: bool = True,
) -> FitResult:
  """Runs ``plan.num_steps`` steps of ``hooks.train_step`` from ``state``; resumable.

  Args:
    state: the initial state (also the template for restoring a checkpoint).
      Replicated over ``mesh`` when one is given. Consumed: the step donates
      its buffers, so pass a copy (``jax.tree.map(jnp.copy, state)``) if you
      still need it.
    train_iter: yields this host's slice of each global batch, forever; when
      it has ``get_state``/``set_state`` its position is checkpointed.
    hooks: the step and the optional eval, hparams and epoch-end hooks.
    plan: steps, epoch length, log/eval/checkpoint cadence.
    workdir: the phase's directory: ``checkpoints/`` and (by default)
      ``metrics.jsonl``. None: no checkpoints, no files.
    mesh: data-parallel mesh (see ``sharding``); None: one device.
    phase: written into every record.
    metrics_path: where to append records (default ``workdir/metrics.jsonl``).
    progress: show a tqdm bar per epoch (only on a TTY).

  Returns:
    :class:`FitResult`; ``history`` holds the epoch-level records
    (``split='train_epoch'`` and ``'test'``) of the whole phase, also those
    from before a restart.

  Example:
    >>> hooks = Hooks(make_train_step(apply_fn, tx), eval_fn=lambda s: ...)  # doctest: +SKIP
    >>> fit(state, it, hooks, Plan(num_steps=100, steps_per_epoch=10), workdir='/tmp/run')  # doctest: +SKIP
  """
  if plan.on_nonfinite not in guard.MODES:
    raise ValueError(f'Plan.on_nonfinite must be one of {guard.MODES}, got {plan.on_nonfinite!r}')
  if metrics_path is None and workdir is not None:
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
  writer = MetricsWriter(metrics_path)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=plan.keep) if workdir else None
  if mesh is not None:
    state = sharding_lib.replicate(state, mesh)
  state, host, resumed_from = _restore(ckpt, state, train_iter, writer, phase)
  target = host.begin + plan.num_steps
  host.speed_mark = (time.time(), host.step)
  log = _Log(writer, phase, plan, host, progress)
  train_step = guard.guard_step(hooks.train_step, skip=plan.on_nonfinite == 'skip', mesh=mesh)
  host.screen = functools.partial(_screen, host=host, plan=plan, phase=phase, writer=writer, ckpt=ckpt)

  def save():
    ckpt.save(host.step, state, host.meta(train_iter))

  stop = lambda: hooks.stop_when is not None and bool(hooks.stop_when(state))
  try:
    if resumed_from is not None and stop():
      return FitResult(state, host.history, resumed_from, False)
    while host.step < target:
      log.open_bar(target)
      batch = _to_device(next(train_iter), mesh)
      hp = hooks.hparams_fn(host.step) if hooks.hparams_fn is not None else None
      state, metrics = train_step(state, batch, None, hp)
      host.step += 1
      host.pending.append((host.step, metrics))
      log.bar.update(1)
      epoch_end = (host.step - host.begin) % plan.steps_per_epoch == 0 or host.step == target
      if epoch_end:
        state = _end_epoch(state, hooks, log, target)
      elif host.step % plan.log_every == 0:
        log.train_window()
      due = ckpt is not None and (epoch_end or bool(plan.checkpoint_every and host.step % plan.checkpoint_every == 0))
      if due:
        save()
      if due or epoch_end:
        host.speed_mark = (time.time(), host.step)  # steps_per_s counts training only
      if epoch_end and stop():
        break
      if ckpt is not None and ckpt.reached_preemption(host.step):
        save()
        return FitResult(state, host.history, resumed_from, True)
      if plan.stop_after_steps is not None and host.step - host.begin >= plan.stop_after_steps and host.step < target:
        return FitResult(state, host.history, resumed_from, True)
  finally:
    log.close_bar()
    if ckpt is not None:
      ckpt.close()
  return FitResult(state, host.history, resumed_from, False)
