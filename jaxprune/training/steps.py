"""jit-compiled train and eval steps with three hooks for pruning methods.

A step is built once per phase with :func:`make_train_step` and then called as
``state, metrics = step(state, batch, mask=None, hparams=None)``:

* ``apply_fn(variables, images, *, train, rng, hparams) -> Forward`` runs the
  network (default: the NNX model itself, :func:`nnx_apply`). A method passes
  its own to run a modified forward (activation masks, gates, returning
  intermediate features in ``Forward.aux``) without copying the loop.
* ``extra_loss(variables, batch, forward, *, rng, hparams)`` returns a scalar
  added to the cross-entropy (budget losses, sparsity terms, predictor
  losses...), or ``(scalar, {name: scalar})`` to also log its parts, or
  ``(scalar, parts, sets)`` where ``sets`` replaces entries of ``state.extra``
  after the update (running statistics a method keeps, e.g. epoch sums; give
  those entries no optimizer: ``partition({...: None})``).
* ``mask``: a pytree shaped like ``state.params`` (or a sub-dict of it; leaves
  broadcast, so a vector of output channels masks a conv kernel), 0/1 or soft.
  Params are multiplied by it in the forward pass, and after each update every
  param whose mask is exactly 0 is set to 0 again (multiplying again would
  shrink the soft-masked ones geometrically), so pruned weights stay 0 even
  under momentum and weight decay.

``mask`` and ``hparams`` are traced arguments: new values (a new mask, a
ramped loss weight) reuse the compiled step; only a new structure compiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprune import nnx_bridge
from jaxprune.training import sharding as sharding_lib
from jaxprune.training.state import TrainState, Variables, core_variables, trainables

PyTree = Any
Batch = Mapping[str, jax.Array]


class Forward(NamedTuple):
  """What ``apply_fn`` returns: logits, the updated batch stats (unchanged in
  eval mode) and any auxiliary outputs a method's loss needs."""

  logits: jax.Array
  batch_stats: PyTree
  aux: PyTree = None


ApplyFn = Callable[..., Forward]
ExtraLoss = Callable[..., jax.Array | tuple]


def nnx_apply(graphdef: nnx.GraphDef) -> ApplyFn:
  """The default ``apply_fn``: the NNX model itself, through :mod:`jaxprune.nnx_bridge`.

  >>> apply_fn = nnx_apply(graphdef)  # doctest: +SKIP
  >>> fwd = apply_fn(variables(state), images, train=False, rng=None, hparams=None)  # doctest: +SKIP
  """
  train_fn = nnx_bridge.apply_fn(graphdef, train=True)
  eval_fn = nnx_bridge.apply_fn(graphdef)

  def apply_fn(v: Variables, images: jax.Array, *, train: bool, rng=None, hparams=None) -> Forward:
    del rng, hparams
    if train:
      return Forward(*train_fn(core_variables(v), images))
    return Forward(eval_fn(core_variables(v), images), v.batch_stats)

  return apply_fn


def apply_mask(params: PyTree, mask: PyTree | None) -> PyTree:
  """``params * mask`` where ``mask`` has an entry; ``mask`` may be a sub-dict.

  >>> apply_mask({'a': jnp.ones(2), 'b': jnp.ones(2)}, {'a': jnp.array([1., 0.])})
  {'a': Array([1., 0.], dtype=float32), 'b': Array([1., 1.], dtype=float32)}
  """
  return _zip_mask(params, mask, lambda p, m: p * m.astype(p.dtype))


def zero_masked(params: PyTree, mask: PyTree | None) -> PyTree:
  """Sets params whose (broadcast) mask is exactly 0 to 0; leaves others alone."""
  return _zip_mask(params, mask, lambda p, m: jnp.where(m == 0, jnp.zeros_like(p), p))


def _zip_mask(params, mask, fn):
  if mask is None:
    return params
  if isinstance(mask, nnx.State):
    mask = nnx.to_pure_dict(mask)
  if isinstance(params, Mapping):
    if not isinstance(mask, Mapping):
      raise ValueError(f'mask leaf {type(mask).__name__} where params have a dict')
    unknown = set(mask) - set(params)
    if unknown:
      raise ValueError(f'mask has keys {sorted(map(str, unknown))} not in params')
    return {k: _zip_mask(v, mask.get(k), fn) for k, v in params.items()}
  return fn(params, jnp.asarray(mask))


def task_outputs(logits: Any, labels: jax.Array) -> list[tuple[str | None, jax.Array, jax.Array]]:
  """``(task, logits, labels)`` per task.

  A single-task network returns one logits array for labels ``[B]`` (task None).
  A multitask one returns ``{task: logits}`` for labels ``[B, T]``: column t is the
  t-th task in sorted name order (the order the shipped MultiMNIST columns have;
  jit returns dicts sorted by key).
  """
  if not isinstance(logits, Mapping):
    return [(None, logits, labels)]
  tasks = sorted(logits)
  if labels.ndim != 2 or labels.shape[-1] != len(tasks):
    raise ValueError(
      f'a multitask network with tasks {tasks} needs labels of shape [batch, {len(tasks)}] (column t for the '
      f't-th task in sorted order), got labels of shape {labels.shape}'
    )
  return [(t, logits[t], labels[:, i]) for i, t in enumerate(tasks)]


def per_example_ce(logits: Any, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example; a multitask network's is the sum over its tasks
  (equal weights, as multitask detectors sum their task losses)."""
  return sum(
    optax.softmax_cross_entropy_with_integer_labels(y.astype(jnp.float32), t)
    for _, y, t in task_outputs(logits, labels)
  )


def per_example_correct(logits: Any, labels: jax.Array) -> dict[str | None, jax.Array]:
  """1.0 where the argmax is the label, per task (key None: single task)."""
  return {k: (jnp.argmax(y, -1) == t).astype(jnp.float32) for k, y, t in task_outputs(logits, labels)}


def _mean_correct(logits: Any, labels: jax.Array) -> jax.Array:
  """Per example, the fraction of its tasks predicted right (the single task's hit)."""
  hits = per_example_correct(logits, labels)
  return sum(hits.values()) / len(hits)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy over the (weighted) batch; labels are ints (summed over
  the tasks of a multitask network, see :func:`task_outputs`)."""
  per_example = per_example_ce(logits, labels)
  if weights is None:
    return per_example.mean()
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _as_forward(out) -> Forward:
  if isinstance(out, Forward):
    return out
  return Forward(*out)


def train_step(
  state: TrainState,
  batch: Batch,
  mask: PyTree | None = None,
  hparams: PyTree | None = None,
  *,
  apply_fn: ApplyFn,
  tx: optax.GradientTransformation,
  extra_loss: ExtraLoss | None = None,
  schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step (unjitted; :func:`make_train_step` jits it).

  Returns the new state and scalar metrics: ``loss`` (total), ``ce``,
  ``accuracy``, ``lr`` (when ``schedule`` is given), ``extra_loss`` and the
  parts an ``extra_loss`` returns.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  fwd_rng, loss_rng = jax.random.split(rng)

  def loss_fn(train_vars):
    params = apply_mask(train_vars['params'], mask)
    v = Variables(params, state.batch_stats, state.other, train_vars['extra'])
    fwd = _as_forward(apply_fn(v, batch['image'], train=True, rng=fwd_rng, hparams=hparams))
    ce = cross_entropy(fwd.logits, batch['label'], batch.get('weight'))
    loss, parts, sets = ce, {}, None
    if extra_loss is not None:
      out = extra_loss(v, batch, fwd, rng=loss_rng, hparams=hparams)
      term, parts, *rest = out if isinstance(out, tuple) else (out, {})
      sets = rest[0] if rest else None
      parts = {'extra_loss': term, **parts}
      loss = loss + term
    return loss, (fwd, ce, parts, sets)

  # allow_int: a method may keep integer state in extra (counters, records); it gets zero grads.
  grads, (fwd, ce, parts, sets) = jax.grad(loss_fn, has_aux=True, allow_int=True)(trainables(state))
  grads = jax.tree.map(lambda g, x: jnp.zeros_like(x) if g.dtype == jax.dtypes.float0 else g, grads, trainables(state))
  loss = ce + parts.get('extra_loss', 0.0)
  updates, opt_state = tx.update(grads, state.opt_state, trainables(state))
  new = optax.apply_updates(trainables(state), updates)
  new_params = zero_masked(new['params'], mask)
  extra = new['extra'] if sets is None else {**new['extra'], **jax.lax.stop_gradient(sets)}
  new_state = state._replace(
    step=state.step + 1, params=new_params, extra=extra, batch_stats=fwd.batch_stats, opt_state=opt_state
  )
  metrics = {'loss': loss, 'ce': ce, 'accuracy': _accuracy(fwd.logits, batch['label'], batch.get('weight')), **parts}
  if schedule is not None:
    metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
  return new_state, metrics


def eval_step(
  state: TrainState, batch: Batch, mask: PyTree | None = None, hparams: PyTree | None = None, *, apply_fn: ApplyFn
) -> dict[str, jax.Array]:
  """Sums over a (padded) batch: ``loss_sum``, ``correct``, ``count`` (and per task of
  a multitask network ``correct/<task>``; ``correct`` then counts the mean over tasks).

  Examples with ``batch['weight'] == 0`` (padding) do not count.
  """
  params = apply_mask(state.params, mask)
  v = Variables(params, state.batch_stats, state.other, state.extra)
  fwd = _as_forward(apply_fn(v, batch['image'], train=False, rng=state.rng, hparams=hparams))
  labels = batch['label']
  w = batch.get('weight')
  w = jnp.ones(labels.shape[:1], jnp.float32) if w is None else w.astype(jnp.float32)
  hits = per_example_correct(fwd.logits, labels)
  out = {'loss_sum': (per_example_ce(fwd.logits, labels) * w).sum(), 'count': w.sum()}
  out['correct'] = (sum(hits.values()) / len(hits) * w).sum()
  out.update({f'correct/{k}': (h * w).sum() for k, h in hits.items() if k is not None})
  return out


def _accuracy(logits, labels, weights=None):
  correct = _mean_correct(logits, labels)
  if weights is None:
    return correct.mean()
  return (correct * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_train_step(
  apply_fn: ApplyFn,
  tx: optax.GradientTransformation,
  *,
  extra_loss: ExtraLoss | None = None,
  schedule: optax.Schedule | None = None,
  mesh: jax.sharding.Mesh | None = None,
  donate: bool = True,
  jit: bool = True,
) -> Callable[..., tuple[TrainState, dict]]:
  """``step(state, batch, mask=None, hparams=None) -> (state, metrics)``, jitted.

  The state is donated (its buffers are reused for the new state; do not use
  the old one after the call). With ``mesh``, the new state and metrics are
  replicated over it; the batch should be sharded with
  :func:`jaxprune.training.sharding.shard_batch`.

  >>> step = make_train_step(nnx_apply(graphdef), tx, schedule=schedule)  # doctest: +SKIP
  >>> state, metrics = step(state, batch)  # doctest: +SKIP
  """
  fn = functools.partial(train_step, apply_fn=apply_fn, tx=tx, extra_loss=extra_loss, schedule=schedule)
  if not jit:
    return fn
  kw = {}
  if mesh is not None:
    kw['out_shardings'] = sharding_lib.replicated(mesh)
  return jax.jit(fn, donate_argnums=(0,) if donate else (), **kw)


def make_eval_step(
  apply_fn: ApplyFn, *, mesh: jax.sharding.Mesh | None = None, jit: bool = True
) -> Callable[..., dict[str, jax.Array]]:
  """``eval_step(state, batch, mask=None, hparams=None) -> sums``, jitted (no donation)."""
  fn = functools.partial(eval_step, apply_fn=apply_fn)
  if not jit:
    return fn
  kw = {}
  if mesh is not None:
    kw['out_shardings'] = sharding_lib.replicated(mesh)
  return jax.jit(fn, **kw)
