"""Bridge from Flax NNX modules to the pure functions the core traces."""
from __future__ import annotations

from typing import Any, Callable

from flax import nnx


def functional(model: nnx.Module, method: str = "__call__") -> tuple[Callable, Any]:
  """`(fn, state)` with `fn(state, *args) == getattr(model, method)(*args)`.

  The model's current mode (`model.eval()` / `model.train()`) is kept: trace
  in eval mode. The state is the full `nnx.split` state, so `nnx.merge(graphdef,
  jaxprune.slim(state, graph, masks))` builds the slimmed model.

  Example:
    >>> model.eval()
    >>> fn, state = jaxprune.functional(model)
    >>> graph = jaxprune.trace(fn, state, jnp.zeros((1, 32, 32, 3)))
  """
  graphdef, state = nnx.split(model)

  def fn(state, *args):
    return getattr(nnx.merge(graphdef, state, copy=True), method)(*args)

  return fn, state
