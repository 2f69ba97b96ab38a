"""`slim` and `expand`: masks onto the variables, and physically smaller arrays."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import ChannelGraph, Masks


def _check_structure(graph: ChannelGraph, variables) -> list:
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  if treedef != graph.treedef:
    raise ValueError(
      "variables do not have the structure the graph was traced with; "
      "pass the same tree (e.g. jaxprune.functional's variables) to trace and slim."
    )
  for x, shape, name in zip(leaves, graph.leaf_shapes, graph.leaf_names):
    if tuple(np.shape(x)) != shape:
      raise ValueError(
        f"leaf {name} has shape {np.shape(x)}, traced as {shape}; "
        "slim the unslimmed variables the graph was traced from."
      )
  return leaves


def hard_flat(graph: ChannelGraph, masks: Masks) -> np.ndarray:
  """The flat mask vector of hard masks without a batch axis (checked)."""
  flat = np.asarray(graph.flat(masks))
  if flat.ndim != 1:
    raise ValueError(
      "slim takes one mask per channel (no batch axis); for a per-sample "
      "mask, slim once per sample: {k: v[i] for k, v in masks.items()}."
    )
  if not np.all((flat == 0) | (flat == 1)):
    raise ValueError(
      "slim needs hard masks (0 or 1); threshold soft masks first, "
      "e.g. jax.tree.map(lambda m: (m > 0.5).astype(float), masks)."
    )
  for g, start in zip(graph.groups, graph.offsets.values()):
    if not flat[start : start + g.size].any():
      raise ValueError(
        f"every channel of {g.kind} group {g.name!r} is masked: removing the group would cut "
        "the network. Keep at least one channel (selection does, with min_channels)."
      )
  return flat


def keep_indices(graph: ChannelGraph, masks: Masks) -> list[dict[int, np.ndarray]]:
  """Per leaf, {axis: indices to keep} for hard masks (checked, also that the
  model's code can run at those widths)."""
  flat = hard_flat(graph, masks)
  for p in graph.physical:
    v, ch = p.expr.value(flat), flat[p.expr.channel]
    if not np.array_equal(v > 0.5, ch > 0.5):
      raise ValueError(
        f"slim: {p.what}, so it cannot drop a channel that its residual stream keeps "
        f"({int(((ch > 0.5) & (v < 0.5)).sum())} such channels here). Use masks whose branch "
        "entries equal the channel entries there, or build the block as the bundled ResNets "
        "do (gather/expand index vectors, jaxprune.models.layers)."
      )
  return [{ax: np.nonzero(e.value(flat) > 0.5)[0] for ax, e in axes.items()} for axes in graph.leaf_axes]


def slim(variables: Any, graph: ChannelGraph, masks: Masks) -> Any:
  """Remove the masked channels from every variable that holds them.

  Runs outside jit (shapes change). Index vectors (integer leaves holding
  channel positions) are sliced and renumbered into the kept positions. With
  NNX, `jaxprune.module(model, small)` gives the smaller model; its outputs
  equal `masked(fn, graph)` at the same masks, and `cost(graph, masks).params`
  equals its parameter count.

  Example:
    >>> small = jaxprune.slim(variables, graph, masks)
    >>> small_model = jaxprune.module(model, small)
  """
  leaves = _check_structure(graph, variables)
  keep = keep_indices(graph, masks)
  flat = hard_flat(graph, masks)
  index = {il.leaf: il for il in graph.index_leaves}
  out = []
  for li, (x, k) in enumerate(zip(leaves, keep)):
    if li in index:
      x = _renumber(index[li], flat)
    elif k:
      # numpy: one jnp.take per leaf shape would compile a kernel each.
      y = np.asarray(x)
      for ax, idx in k.items():
        y = np.take(y, idx, axis=ax)
      x = jnp.asarray(y)
    out.append(x)
  return jax.tree_util.tree_unflatten(graph.treedef, out)


def _renumber(il, flat: np.ndarray) -> jax.Array:
  """The kept positions of an index vector, as positions among the target's kept ones
  (the sentinel, the kept count, where the target is gone)."""
  own = il.own.value(flat) > 0.5
  target = il.target.value(flat) > 0.5
  rank = np.cumsum(target) - 1
  old = np.nonzero(own)[0]  # traced values are 0..n-1: a position's value is itself
  new = np.where(target[old], rank[old], int(target.sum()))
  return jnp.asarray(new, jnp.int32)


def expand(graph: ChannelGraph, masks: Masks) -> Any:
  """The mask pytree shaped like the variables (1 where no group applies).

  A leaf entry is the product of what keeps it along each axis, so
  `params * expand(graph, masks)` zeroes every removed weight. Jit-able.
  """
  flat = graph.flat(masks)
  if flat.ndim != 1:
    raise ValueError("expand takes masks without a batch axis.")
  out = []
  for shape, axes in zip(graph.leaf_shapes, graph.leaf_axes):
    m = jnp.ones(shape, flat.dtype)
    for ax, e in axes.items():
      bshape = [1] * len(shape)
      bshape[ax] = shape[ax]
      m = m * e.value(flat).reshape(bshape)
    out.append(m)
  return jax.tree_util.tree_unflatten(graph.treedef, out)
