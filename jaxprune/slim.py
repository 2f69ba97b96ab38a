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
    raise ValueError("variables do not have the structure the graph was traced with; "
                     "pass the same tree (e.g. the full nnx.split state) to trace and slim.")
  for x, shape, name in zip(leaves, graph.leaf_shapes, graph.leaf_names):
    if tuple(np.shape(x)) != shape:
      raise ValueError(f"leaf {name} has shape {np.shape(x)}, traced as {shape}; "
                       "slim the unslimmed variables the graph was traced from.")
  return leaves


def keep_indices(graph: ChannelGraph, masks: Masks) -> list[dict[int, np.ndarray]]:
  """Per leaf, {axis: indices to keep} for hard masks (checked)."""
  flat = np.asarray(graph.flat(masks))
  if flat.ndim != 1:
    raise ValueError("slim takes one mask per channel (no batch axis); for a per-sample "
                     "mask, slim once per sample: {k: v[i] for k, v in masks.items()}.")
  if not np.all((flat == 0) | (flat == 1)):
    raise ValueError("slim needs hard masks (0 or 1); threshold soft masks first, "
                     "e.g. jax.tree.map(lambda m: (m > 0.5).astype(float), masks).")
  for g, start in zip(graph.groups, graph.offsets.values()):
    if not flat[start:start + g.size].any():
      raise ValueError(
          f"every channel of group {g.name!r} is masked: removing the group would cut "
          "the network. Keep at least one channel (selection does, with min_channels).")
  return [{ax: np.nonzero(flat[f] > 0)[0] for ax, f in axes.items()} for axes in graph.leaf_axes]


def slim(variables: Any, graph: ChannelGraph, masks: Masks) -> Any:
  """Remove the masked channels from every variable that holds them.

  Runs outside jit (shapes change). With NNX, `nnx.merge(graphdef, small)`
  gives the smaller model; its outputs equal `masked(fn, graph)` at the same
  masks, and `cost(graph, masks).params` equals its parameter count.

  Example:
    >>> small = jaxprune.slim(state, graph, masks)
    >>> small_model = nnx.merge(graphdef, small)
  """
  leaves = _check_structure(graph, variables)
  out = []
  for x, keep in zip(leaves, keep_indices(graph, masks)):
    if keep:
      # numpy: one jnp.take per leaf shape would compile a kernel each.
      y = np.asarray(x)
      for ax, idx in keep.items():
        y = np.take(y, idx, axis=ax)
      x = jnp.asarray(y)
    out.append(x)
  return jax.tree_util.tree_unflatten(graph.treedef, out)


def expand(graph: ChannelGraph, masks: Masks) -> Any:
  """The mask pytree shaped like the variables (1 where no group applies).

  A leaf entry is the product of the masks of the channels it belongs to, so
  `params * expand(graph, masks)` zeroes every removed weight. Jit-able.
  """
  flat = graph.flat(masks)
  if flat.ndim != 1:
    raise ValueError("expand takes masks without a batch axis.")
  out = []
  for shape, axes in zip(graph.leaf_shapes, graph.leaf_axes):
    m = jnp.ones(shape, flat.dtype)
    for ax, f in axes.items():
      bshape = [1] * len(shape)
      bshape[ax] = shape[ax]
      m = m * flat[f].reshape(bshape)
    out.append(m)
  return jax.tree_util.tree_unflatten(graph.treedef, out)
