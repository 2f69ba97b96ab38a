"""The one training loop every method reuses: :func:`fit` and :func:`evaluate`.

A method runs one ``fit`` per phase (pretrain, search, finetune, ...), each
with its own ``workdir`` (checkpoints live in ``workdir/checkpoints``) and its
own step function (built with ``make_train_step`` from its ``apply_fn``,
``extra_loss`` and optimizer). Re-running a phase with the same workdir
resumes it from its latest checkpoint -- train state, data-iterator position,
metric sums, history -- or returns at once when it had finished.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import os
import time
from typing import Any, NamedTuple, Protocol

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.training import sharding as sharding_lib
from jaxprune.training.checkpoint import Checkpointer
from jaxprune.training.metrics import Means, MetricsWriter, fmt, progress_bar
from jaxprune.training.state import TrainState

PyTree = Any


class ResumableIterator(Protocol):
  """A batch iterator whose position can be saved and restored (grain-style)."""

  def __next__(self) -> Mapping[str, np.ndarray]: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


# callback(step, state, metrics, epoch_end=...) -> new state or None. Called
# after every step with the step's (device) metrics; raising stops the loop
# without a checkpoint, exactly as a kill would.
Callback = Callable[..., TrainState | None]


class FitResult(NamedTuple):
  state: TrainState
  history: list[dict[str, Any]]  # epoch-level records, as written to metrics.jsonl
  resumed_from: int | None       # step restored from a checkpoint, if any
  stopped_early: bool            # stop_after_steps or a preemption notice


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
    out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
           for k, v in out.items()}
  return out


def evaluate(eval_step: Callable[..., dict], state: TrainState,
             batches: Iterable[Mapping[str, np.ndarray]], *, batch_size: int,
             mesh: jax.sharding.Mesh | None = None, mask: PyTree | None = None,
             hparams: PyTree | None = None) -> dict[str, float]:
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
    sums.append(eval_step(state, _to_device(b, mesh), mask, hparams))
  sums = jax.device_get(sums)
  tot = {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) for k in
         ('loss_sum', 'correct', 'count')}
  n = max(tot['count'], 1.0)
  return {'loss': tot['loss_sum'] / n, 'accuracy': tot['correct'] / n, 'count': tot['count']}


def fit(state: TrainState, train_step: Callable[..., tuple[TrainState, dict]],
        train_iter: Iterator[Mapping[str, np.ndarray]], *, num_steps: int,
        steps_per_epoch: int, workdir: str | None = None,
        eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
        eval_split: str = 'test', eval_every_epochs: int = 1,
        mask: PyTree | None = None,
        hparams_fn: Callable[[int], PyTree] | None = None,
        mesh: jax.sharding.Mesh | None = None, log_every: int = 100,
        checkpoint_every: int | None = None, keep: int = 2,
        progress: bool = True, callbacks: Sequence[Callback] = (),
        stop_after_steps: int | None = None, phase: str = 'train',
        metrics_path: str | None = None) -> FitResult:
  """Runs ``num_steps`` steps of ``train_step`` from ``state``; resumable.

  Args:
    state: the initial state (also the template for restoring a checkpoint).
      Replicated over ``mesh`` when one is given. Consumed: the step donates
      its buffers, so pass a copy (``jax.tree.map(jnp.copy, state)``) if you
      still need it.
    train_step: ``step(state, batch, mask, hparams) -> (state, metrics)``,
      e.g. from :func:`jaxprune.training.steps.make_train_step`.
    train_iter: yields this host's slice of each global batch, forever; when
      it has ``get_state``/``set_state`` its position is checkpointed.
    num_steps: steps to run in this phase (counted from ``state.step``).
    steps_per_epoch: steps per epoch (epoch ends: logs, eval, checkpoint).
    workdir: the phase's directory: ``checkpoints/`` and (by default)
      ``metrics.jsonl``. None: no checkpoints, no files.
    eval_fn: ``eval_fn(state) -> {'loss':..., 'accuracy':...}``, run every
      ``eval_every_epochs`` epochs and at the end; logged as ``eval_split``.
    mask: params mask passed to every step (see ``steps``).
    hparams_fn: ``hparams_fn(step) -> pytree`` passed to every step (traced,
      so ramping a loss weight does not recompile).
    log_every: log windowed train means every this many steps.
    checkpoint_every: also checkpoint every this many steps (epoch ends and
      the last step always are); None: only those.
    keep: checkpoints to keep.
    progress: show a tqdm bar per epoch (only on a TTY).
    callbacks: see :data:`Callback`.
    stop_after_steps: debug: return (as a kill would: no extra checkpoint)
      once the phase has done this many steps, to test resumption.
    phase: written into every record.
    metrics_path: where to append records (default ``workdir/metrics.jsonl``).

  Returns:
    :class:`FitResult`; ``history`` holds the epoch-level records
    (``split='train_epoch'`` and ``eval_split``) of the whole phase, also
    those from before a restart.
  """
  if metrics_path is None and workdir is not None:
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
  writer = MetricsWriter(metrics_path)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=keep) if workdir else None
  if mesh is not None:
    state = sharding_lib.replicate(state, mesh)
  begin = int(state.step)
  window, epoch_means, history, elapsed0 = Means(), Means(), [], 0.0
  resumed_from = None
  if ckpt is not None and ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    resumed_from = int(state.step)
    begin = meta.get('begin', begin)
    if meta.get('data') is not None and hasattr(train_iter, 'set_state'):
      train_iter.set_state(meta['data'])
    window = Means.from_json(meta.get('window'))
    epoch_means = Means.from_json(meta.get('epoch'))
    history = list(meta.get('history', []))
    elapsed0 = meta.get('elapsed', 0.0)
    writer.truncate_after(resumed_from, phase)
  target = begin + num_steps
  step = int(state.step)
  t0 = time.time() - elapsed0
  pending: list[dict] = []
  last = {}
  speed_mark = (time.time(), step)  # for steps_per_s of the train records

  def flush():
    # One device->host transfer for all steps since the last flush; sums are
    # added step by step so that they do not depend on where flushes fall.
    nonlocal pending, last
    for m in jax.device_get(pending):
      window.add(m)
      epoch_means.add(m)
      last = m
    pending = []

  def record(split, values, **kw):
    r = {'phase': phase, 'step': step, 'epoch': round((step - begin) / steps_per_epoch, 4),
         'split': split, **values, **kw, 'time': round(time.time() - t0, 3)}
    writer.write(r)
    return r

  def save():
    if ckpt is None:
      return
    flush()
    meta = {'begin': begin, 'window': window.to_json(), 'epoch': epoch_means.to_json(),
            'history': history, 'elapsed': time.time() - t0,
            'data': train_iter.get_state() if hasattr(train_iter, 'get_state') else None}
    ckpt.save(step, state, meta)

  bar = None
  try:
    while step < target:
      in_epoch = (step - begin) % steps_per_epoch
      if bar is None:
        epoch_idx = (step - begin) // steps_per_epoch + 1
        bar = progress_bar(min(steps_per_epoch, target - step + in_epoch),
                           f'{phase} epoch {epoch_idx}', enabled=progress, initial=in_epoch)
      batch = _to_device(next(train_iter), mesh)
      hp = hparams_fn(step) if hparams_fn is not None else None
      state, metrics = train_step(state, batch, mask, hp)
      step += 1
      pending.append(metrics)
      bar.update(1)
      epoch_end = (step - begin) % steps_per_epoch == 0 or step == target
      for cb in callbacks:
        new = cb(step, state, metrics, epoch_end=epoch_end)
        state = state if new is None else new

      if step % log_every == 0 or epoch_end:
        flush()
        vals = window.means()
        if 'lr' in last:
          vals['lr'] = float(last['lr'])  # the current lr, not a window mean
        now = time.time()
        vals['steps_per_s'] = round((step - speed_mark[1]) / max(now - speed_mark[0], 1e-9), 3)
        speed_mark = (now, step)
        record('train', vals)
        bar.set_postfix(fmt(vals))
        window = Means()
      if epoch_end:
        vals = epoch_means.means()
        vals.pop('lr', None)
        history.append(record('train_epoch', vals))
        epoch_means = Means()
        n_epoch = -(-(step - begin) // steps_per_epoch)
        postfix = fmt(vals)
        if eval_fn is not None and (n_epoch % eval_every_epochs == 0 or step == target):
          ev = record(eval_split, dict(eval_fn(state)))
          history.append(ev)
          postfix.update({f'{eval_split}_{k}': v for k, v in fmt(ev).items()})
        bar.set_postfix(postfix)  # the closed bar stays as the epoch's summary line
        logging.info('%s epoch %d (step %d): %s', phase, n_epoch, step,
                     ', '.join(f'{k} {v}' for k, v in postfix.items()))
        bar.close()
        bar = None
      if ckpt is not None and (epoch_end or (checkpoint_every and step % checkpoint_every == 0)):
        save()
        speed_mark = (time.time(), step)  # steps_per_s counts training only
      elif epoch_end:
        speed_mark = (time.time(), step)
      if ckpt is not None and ckpt.reached_preemption(step):
        save()
        return FitResult(state, history, resumed_from, True)
      if stop_after_steps is not None and step - begin >= stop_after_steps and step < target:
        return FitResult(state, history, resumed_from, True)
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.close()
  return FitResult(state, history, resumed_from, False)
