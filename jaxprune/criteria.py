"""Channel importance scores per group: `{group.name: array[group.size]}`.

A group's channels live in several leaves (a conv's output filters, its
BatchNorm, the next conv's input slices). Scores combine the members: each
member's per-channel score is divided by its mean (so no layer dominates by
scale) and the members are summed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxprune.graph import ChannelGraph, Member
from jaxprune.masked import masked

Scores = dict[str, jax.Array]


def _jit_per_graph(fn: Callable) -> Callable:
  """Jit `fn(variables, graph)` once per graph (the graph is static structure).

  Eagerly, the many small per-member ops would each compile a kernel; one
  program per graph compiles once and also runs inside a caller's jit.
  """

  @functools.lru_cache(maxsize=32)
  def compiled(graph: ChannelGraph):
    return jax.jit(lambda variables: fn(variables, graph))

  @functools.wraps(fn)
  def wrapper(variables: Any, graph: ChannelGraph) -> Scores:
    return compiled(graph)(variables)

  return wrapper


def _leaves(graph: ChannelGraph, variables) -> dict[str, jax.Array]:
  leaves = jax.tree_util.tree_leaves(variables)
  if len(leaves) != len(graph.leaf_names):
    raise ValueError("variables do not match the graph's structure")
  return dict(zip(graph.leaf_names, leaves))


def _is_weight(graph: ChannelGraph, name: str) -> bool:
  i = graph.leaf_names.index(name)
  return graph.is_param[i] and len(graph.leaf_shapes[i]) >= 2


def _per_channel(x: jax.Array, m: Member, reduce: Callable) -> jax.Array:
  moved = jnp.moveaxis(x, m.axis, 0)[m.index]
  return reduce(moved.reshape(moved.shape[0], -1))


def _combine(graph: ChannelGraph, variables, reduce: Callable, select: Callable) -> Scores:
  leaves = _leaves(graph, variables)
  out = {}
  for g in graph.groups:
    total = jnp.zeros(g.size)
    for m in g.members:
      if not select(graph, m):
        continue
      s = _per_channel(leaves[m.leaf], m, reduce)
      s = jax.ops.segment_sum(s, jnp.asarray(m.position), g.size)
      total = total + s / (jnp.mean(s) + 1e-12)
    out[g.name] = total
  return out


@_jit_per_graph
def l1(variables: Any, graph: ChannelGraph) -> Scores:
  """Sum of |w| of each channel's slices in the coupled conv/dense kernels.

  Example:
    >>> scores = jaxprune.criteria.l1(state, graph)
  """
  return _combine(graph, variables, lambda w: jnp.abs(w).sum(1), lambda gr, m: _is_weight(gr, m.leaf))


@_jit_per_graph
def l2(variables: Any, graph: ChannelGraph) -> Scores:
  """L2 norm of each channel's slices in the coupled conv/dense kernels."""
  return _combine(graph, variables, lambda w: jnp.sqrt((w**2).sum(1)), lambda gr, m: _is_weight(gr, m.leaf))


def _is_scale(graph: ChannelGraph, m: Member) -> bool:
  i = graph.leaf_names.index(m.leaf)
  return (
    graph.is_param[i] and len(graph.leaf_shapes[i]) == 1 and m.leaf.rsplit(".", 1)[-1] in ("scale", "gamma", "weight")
  )


@_jit_per_graph
def bn_scale(variables: Any, graph: ChannelGraph) -> Scores:
  """|gamma| of the BatchNorm scales in the group (network slimming).

  Groups with no BatchNorm scale fall back to l1.
  """
  scores = _combine(graph, variables, lambda w: jnp.abs(w).sum(1), _is_scale)
  fallback = None
  for g in graph.groups:
    if not any(_is_scale(graph, m) for m in g.members):
      fallback = fallback or l1(variables, graph)
      scores[g.name] = fallback[g.name]
  return scores


@_jit_per_graph
def fpgm(variables: Any, graph: ChannelGraph) -> Scores:
  """Distance of each channel's weights to the others' (geometric median).

  Channels close to the geometric median of their group are the most
  replaceable (He et al., 2019) and score lowest.
  """
  leaves = _leaves(graph, variables)
  out = {}
  for g in graph.groups:
    feats = []
    for m in g.members:
      if _is_weight(graph, m.leaf):
        moved = jnp.moveaxis(leaves[m.leaf], m.axis, 0)[m.index]
        f = jax.ops.segment_sum(moved.reshape(moved.shape[0], -1), jnp.asarray(m.position), g.size)
        feats.append(f / (jnp.linalg.norm(f) + 1e-12))
    if not feats:
      out[g.name] = jnp.ones(g.size)
      continue
    f = jnp.concatenate(feats, axis=1)
    d = jnp.sqrt(jnp.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0.0))
    out[g.name] = d.sum(1)
  return out


def random(key: jax.Array, graph: ChannelGraph) -> Scores:
  """Uniform random scores (the usual sanity baseline)."""
  keys = jax.random.split(key, max(len(graph.groups), 1))
  return {g.name: jax.random.uniform(k, (g.size,)) for g, k in zip(graph.groups, keys)}


def taylor(fn: Callable, variables: Any, graph: ChannelGraph, loss_fn: Callable, *args) -> Scores:
  """First-order Taylor importance |dL/dm| per channel, averaged over the batch.

  `loss_fn(outputs) -> per-sample losses [B]`. The derivative of the loss
  with respect to a channel's mask equals sum(activation * gradient) over the
  channel (Molchanov et al., 2017); per-sample masks give it per sample.

  Example:
    >>> ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y)
    >>> scores = jaxprune.criteria.taylor(fn, state, graph, ce, images)
  """
  batch = jax.tree_util.tree_leaves(args)[0].shape[0]
  g = masked(fn, graph)

  def total(masks):
    return loss_fn(g(variables, masks, *args)).sum()

  grads = jax.grad(total)(graph.ones((batch,)))
  return {k: jnp.abs(v).mean(0) for k, v in grads.items()}


__all__ = ["l1", "l2", "bn_scale", "fpgm", "random", "taylor", "Scores"]
