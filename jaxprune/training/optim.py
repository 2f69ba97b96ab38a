"""optax optimizers and learning-rate schedules from a config.

Schedules are in optimizer steps, derived from epochs x steps_per_epoch. The
optimizer updates the pytree ``{'params': ..., 'extra': ...}`` (see
:func:`jaxprune.training.state.trainables`); :func:`partition` gives each part
(or each named sub-tree of ``extra``) its own optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

SCHEDULES = ('cosine', 'step', 'constant')
OPTIMIZERS = ('sgd', 'adamw')


def make_schedule(
  name: str,
  *,
  lr: float,
  total_steps: int,
  steps_per_epoch: int,
  warmup_epochs: float = 0.0,
  decay_epochs: Sequence[float] = (),
  decay_factor: float = 0.1,
  end_lr: float = 0.0,
) -> optax.Schedule:
  """A learning-rate schedule in steps.

  ``cosine``: linear warmup 0 -> ``lr`` over ``warmup_epochs``, then cosine
  decay to ``end_lr`` at ``total_steps``. ``step``: (optional warmup, then)
  ``lr`` multiplied by ``decay_factor`` at each of ``decay_epochs``.
  ``constant``: (optional warmup, then) ``lr``.

  >>> s = make_schedule('cosine', lr=0.1, total_steps=100, steps_per_epoch=10)
  >>> [round(float(s(t)), 6) for t in (0, 50, 100)]
  [0.1, 0.05, 0.0]
  >>> s = make_schedule('step', lr=0.1, total_steps=100, steps_per_epoch=10,
  ...                   decay_epochs=(5, 8))
  >>> [round(float(s(t)), 6) for t in (49, 50, 80)]
  [0.1, 0.01, 0.001]
  """
  if name not in SCHEDULES:
    raise ValueError(f'Unknown schedule {name!r}; choose one of {SCHEDULES}.')
  warmup = int(round(warmup_epochs * steps_per_epoch))
  if name == 'cosine':
    if warmup > 0:
      return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=end_lr
      )
    return optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=end_lr / lr if lr else 0.0)
  if name == 'step':
    # Boundaries are absolute steps; optax's piecewise schedule counts from 0.
    boundaries = {int(round(e * steps_per_epoch)) - warmup: decay_factor for e in decay_epochs}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    main = optax.constant_schedule(lr)
  if warmup > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make_optimizer(
  name: str,
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  grad_clip_norm: float | None = None,
) -> optax.GradientTransformation:
  """SGD (momentum/Nesterov, *coupled* L2 weight decay) or AdamW (decoupled).

  For SGD the decay term ``wd * w`` is added to the gradient before momentum,
  as in the usual CIFAR recipe (PyTorch ``SGD(weight_decay=...)``); it applies
  to every leaf it is given (BN scales and biases included, as there).

  >>> tx = make_optimizer('sgd', 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.')
  parts = []
  if grad_clip_norm:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  if name == 'sgd':
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
  else:
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def from_config(
  train: Mapping[str, Any], steps_per_epoch: int, *, total_steps: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(tx, schedule)`` from a ``config.train`` block (see experiments/configs).

  ``total_steps`` defaults to ``train.epochs * steps_per_epoch``.
  """
  total = total_steps if total_steps is not None else int(train['epochs'] * steps_per_epoch)
  schedule = make_schedule(
    train.get('schedule', 'cosine'),
    lr=train['lr'],
    total_steps=total,
    steps_per_epoch=steps_per_epoch,
    warmup_epochs=train.get('warmup_epochs', 0.0),
    decay_epochs=tuple(train.get('decay_epochs', ()) or ()),
    decay_factor=train.get('decay_factor', 0.1),
    end_lr=train.get('end_lr', 0.0),
  )
  tx = make_optimizer(
    train.get('optimizer', 'sgd'),
    schedule,
    momentum=train.get('momentum', 0.9),
    nesterov=train.get('nesterov', False),
    weight_decay=train.get('weight_decay', 0.0),
    grad_clip_norm=train.get('grad_clip_norm', None),
  )
  return tx, schedule


def trainable_labels(trainables: Mapping[str, Any]) -> dict[str, Any]:
  """Labels for :func:`partition`: ``'params'`` for every model param; an
  ``extra`` leaf is labelled by its top-level key in ``extra`` (so
  ``extra={'gates': ..., 'predictors': ...}`` gives labels ``'gates'`` and
  ``'predictors'``), or ``'extra'`` when ``extra`` is not a dict."""
  labels = {'params': jax.tree.map(lambda _: 'params', trainables['params'])}
  extra = trainables['extra']
  if isinstance(extra, Mapping):
    labels['extra'] = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in extra.items()}
  else:
    labels['extra'] = jax.tree.map(lambda _: 'extra', extra)
  return labels


def partition(transforms: Mapping[str, optax.GradientTransformation | None]) -> optax.GradientTransformation:
  """One optimizer per part of the trainables; ``None`` freezes that part.

  Keys are the labels of :func:`trainable_labels`: ``'params'`` and the
  top-level keys of ``state.extra``.

  >>> tx = partition({'params': optax.sgd(0.01), 'gates': optax.adam(1e-3)})
  >>> frozen_model = partition({'params': None, 'gates': optax.adam(1e-3)})
  """
  txs = {k: (optax.set_to_zero() if v is None else v) for k, v in transforms.items()}

  def labels(trainables):
    lab = trainable_labels(trainables)
    missing = set(jax.tree.leaves(lab)) - set(txs)
    if missing:
      raise ValueError(f'No optimizer for trainable part(s) {sorted(missing)}; got transforms for {sorted(txs)}.')
    return lab

  return optax.multi_transform(txs, labels)


def cosine_reference(t: int, *, lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0) -> float:
  """The cosine-with-warmup formula by hand (for tests and docs)."""
  if t < warmup_steps:
    return lr * t / warmup_steps
  frac = min(1.0, (t - warmup_steps) / max(1, total_steps - warmup_steps))
  return end_lr + (lr - end_lr) * 0.5 * (1 + math.cos(math.pi * frac))
