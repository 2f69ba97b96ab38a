"""`masked`: run a network with channels removed from its computation."""

from __future__ import annotations

from typing import Callable

import jax

from jaxprune import interpret
from jaxprune.channel_exprs import site_exprs
from jaxprune.graph import ChannelGraph, Masks
from jaxprune.trace import analyze


def masked(fn: Callable, graph: ChannelGraph) -> Callable:
  """`g(variables, masks, *args)`: `fn` with masked channels removed.

  Every channel-mixing op (conv, dense) sees its input channels multiplied by
  what keeps them (their channel mask; with branch groups also the union of
  the branch masks of the producers that reach it), and every residual-sum
  operand that a branch group owns by its branch mask. So a channel at 0
  contributes nothing anywhere: the result equals the slimmed network's.
  Masks may be soft, hard, or per sample with a leading batch axis matching
  the inputs'. `fn` may differ from the traced function in mode (e.g.
  training BatchNorm) as long as it uses the same variables: channels are
  matched through the variables they touch.

  Example:
    >>> g = jaxprune.masked(fn, graph)
    >>> logits = jax.jit(g)(variables, masks, images)
  """

  def g(variables, masks: Masks, *args):
    flat = graph.flat(masks)
    if flat.ndim > 2:
      raise ValueError(f"masks may have at most one batch axis, got {flat.shape[:-1]}")
    fl, leaf_vals, _, closed, out_tree = analyze(fn, variables, args)
    sites = site_exprs(graph, fl, leaf_vals)
    leaves = jax.tree_util.tree_leaves((variables, *args))
    outs = interpret.evaluate(closed, leaves, sites, interpret.State(flat))
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return g
