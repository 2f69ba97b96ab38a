"""The train state: a small NamedTuple of plain pytrees, and the way back to NNX.

An NNX model is split once, outside jit, into a static ``graphdef`` and four
collections of arrays held as *pure dicts* (nested ``dict`` of arrays, as
``nnx.to_pure_dict`` gives): trainable ``params`` (``nnx.Param``),
``batch_stats`` (``nnx.BatchStat``) and ``other`` (every remaining variable,
e.g. the zero-pad vectors of option-A ResNets; kept so that ``nnx.merge`` gets
the whole model back). Pure dicts, rather than ``nnx.State``, because masks,
optax, orbax and the pruning core all take plain nested dicts; ``nnx.merge``
accepts them as they are.

``extra`` holds trainable pytrees a method adds next to the model (mask
logits, gate predictors, ...); the optimizer sees ``{'params': ..., 'extra':
...}`` (see :func:`trainables`), so a method can give ``extra`` its own
optimizer with :func:`jaxprune.training.optim.partition`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprune import nnx_bridge

PyTree = Any


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree, so it jits and saves.

  Attributes:
    step: int32 scalar, number of optimizer updates done.
    params: pure dict of the model's ``nnx.Param`` arrays.
    batch_stats: pure dict of ``nnx.BatchStat`` arrays (running mean/var).
    other: pure dict of every other model variable (not trained, not updated).
    extra: method-owned trainable pytree ({} for plain training).
    opt_state: optax state of ``tx.init(trainables(state))``.
    rng: raw uint32 PRNG key; each step uses ``fold_in(rng, step)``, so the
      key never changes and a resumed run draws the same numbers.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  other: PyTree
  extra: PyTree
  opt_state: PyTree
  rng: jax.Array


class Variables(NamedTuple):
  """What a forward pass reads: the model collections plus the method's extras."""

  params: PyTree
  batch_stats: PyTree
  other: PyTree
  extra: PyTree


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree, PyTree, PyTree]:
  """Splits an NNX model into ``(graphdef, params, batch_stats, other)`` pure dicts
  (:func:`jaxprune.nnx_bridge.split`).

  >>> graphdef, params, batch_stats, other = split_model(model)  # doctest: +SKIP
  """
  graphdef, v = nnx_bridge.split(model)
  return graphdef, v['params'], v['batch_stats'], v['other']


def core_variables(state: TrainState | Variables) -> dict[str, PyTree]:
  """The core's view of a state's model variables: ``{'params', 'batch_stats', 'other'}``
  (what :mod:`jaxprune.nnx_bridge` functions and ``jaxprune.trace`` take)."""
  return {'params': state.params, 'batch_stats': state.batch_stats, 'other': state.other}


def trainables(state: TrainState) -> dict[str, PyTree]:
  """The pytree the optimizer updates: ``{'params': ..., 'extra': ...}``."""
  return {'params': state.params, 'extra': state.extra}


def variables(state: TrainState) -> Variables:
  return Variables(state.params, state.batch_stats, state.other, state.extra)


def create_train_state(
  model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array | int, *, extra: PyTree | None = None
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` and initialises the optimizer; returns ``(graphdef, state)``.

  ``graphdef`` is static (hashable) and stays outside the state; pass it to
  :func:`merge` or :func:`jaxprune.training.steps.nnx_apply`.

  >>> model = jaxprune.models.create('resnet20', num_classes=10, rngs=nnx.Rngs(0))  # doctest: +SKIP
  >>> graphdef, state = create_train_state(model, optax.sgd(0.1), rng=0)  # doctest: +SKIP
  >>> int(state.step)  # doctest: +SKIP
  0
  """
  graphdef, params, batch_stats, other = split_model(model)
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  elif jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)  # raw keys save and restore with orbax as is
  extra = {} if extra is None else extra
  opt_state = tx.init({'params': params, 'extra': extra})
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    other=other,
    extra=extra,
    opt_state=opt_state,
    rng=rng,
  )
  return graphdef, state


def merge(graphdef: nnx.GraphDef, state: TrainState | Variables, *, copy: bool = False) -> nnx.Module:
  """An NNX model with the state's params, batch stats and other variables.

  Inside ``jit`` pass ``copy=True`` (NNX otherwise raises a TraceContextError
  on BatchStat updates). The returned model is in whatever train/eval mode it
  was split in; call ``.eval()`` before inference.

  >>> model = merge(graphdef, state); model.eval()  # doctest: +SKIP
  """
  return nnx_bridge.merge(graphdef, core_variables(state), copy=copy)


def num_params(params: PyTree) -> int:
  """Number of scalars in a params pytree (e.g. ``state.params``)."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
