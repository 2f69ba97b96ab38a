"""`masked`: run a network with channels removed from its computation."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from jaxprune.graph import ChannelGraph, Masks
from jaxprune.trace import analyze, components

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
          "remat2": "jaxpr"}


def _site_indices(graph: ChannelGraph, fl, leaf_vals) -> dict:
  """{(path, operand): (axis, flat mask index per position)} for this call."""
  if len(leaf_vals) != len(graph.leaf_shapes):
    raise ValueError(
        f"variables have {len(leaf_vals)} leaves but the graph was traced with "
        f"{len(graph.leaf_shapes)}; pass the same variables structure to masked().")
  label = components(fl)
  flat_of_comp = np.zeros(int(label.max()) + 2 if label.size else 1, np.int64)
  for v, axes, shape, name in zip(leaf_vals, graph.leaf_axes, graph.leaf_shapes, graph.leaf_names):
    for ax, f in axes.items():
      ids = v.ids[ax]
      if ids.size != f.size:
        raise ValueError(
            f"leaf {name} axis {ax} has size {ids.size}, traced as {f.size}; "
            "masked() runs the unslimmed network (trace the slimmed one anew).")
      flat_of_comp[label[ids]] = f
  sites = {}
  for s in fl.sites:
    lab = np.where(s.ids >= 0, label[np.maximum(s.ids, 0)], -1)
    f = flat_of_comp[lab]
    if (f > 0).any():
      sites[(s.path, s.operand)] = (s.axis, f.astype(np.int32))
  return sites


def _apply_mask(x: jax.Array, axis: int, index: np.ndarray, flat: jax.Array) -> jax.Array:
  m = flat[..., index].astype(x.dtype)
  if flat.ndim == 1:
    shape = [1] * x.ndim
    shape[axis] = index.size
    return x * m.reshape(shape)
  batch = flat.shape[0]
  if x.shape[0] != batch or axis == 0:
    raise ValueError(
        f"per-sample masks have batch {batch} but the masked activation has shape "
        f"{x.shape} (batch first expected); pass masks with one row per input sample.")
  shape = [1] * x.ndim
  shape[0], shape[axis] = batch, index.size
  return x * m.reshape(shape)


def _eval(jaxpr, consts, args, sites, flat, path=()):
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  _write(env, jaxpr.constvars, consts)
  _write(env, jaxpr.invars, args)
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    invals = [read(v) for v in eqn.invars]
    key = _CALLS.get(eqn.primitive.name)
    if key is not None and any(p[:len(here)] == here for p, _ in sites):
      closed = eqn.params[key]
      inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
      inner_consts = list(getattr(closed, "consts", ()))
      outs = _eval(inner, inner_consts, invals[len(invals) - len(inner.invars):], sites, flat, here)
    else:
      for (p, k), (axis, index) in sites.items():
        if p == here:
          invals[k] = _apply_mask(invals[k], axis, index, flat)
      if any(p[:len(here)] == here and len(p) > len(here) for p, _ in sites):
        raise NotImplementedError(
            f"masked: channels inside '{eqn.primitive.name}' at "
            f"{source_info_util.summarize(eqn.source_info)} cannot be masked yet.")
      outs = _bind(eqn, invals)
    _write(env, eqn.outvars, outs)
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals) -> list:
  """Runs one equation on new inputs, keeping its source location for errors."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with source_info_util.user_context(eqn.source_info.traceback):
    outs = eqn.primitive.bind(*invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _write(env: dict, outvars, outs) -> None:
  for v, o in zip(outvars, outs):
    if not isinstance(v, jcore.DropVar):
      env[v] = o


def masked(fn: Callable, graph: ChannelGraph) -> Callable:
  """`g(variables, masks, *args)`: `fn` with masked channels removed.

  Every channel-mixing op (conv, dense) sees its input channels multiplied by
  their mask, so a channel at 0 contributes nothing anywhere: the result
  equals the slimmed network's. Masks may be soft, hard, or per sample with a
  leading batch axis matching the inputs'. `fn` may differ from the traced
  function in mode (e.g. training BatchNorm) as long as it uses the same
  variables: channels are matched through the variables they touch.

  Example:
    >>> g = jaxprune.masked(fn, graph)
    >>> logits = jax.jit(g)(state, masks, images)
  """
  def g(variables, masks: Masks, *args):
    flat = graph.flat(masks)
    if flat.ndim > 2:
      raise ValueError(f"masks may have at most one batch axis, got {flat.shape[:-1]}")
    fl, leaf_vals, _, closed, out_tree = analyze(fn, variables, args)
    sites = _site_indices(graph, fl, leaf_vals)
    leaves = jax.tree_util.tree_leaves((variables, *args))
    outs = _eval(closed.jaxpr, closed.consts, leaves, sites, flat)
    return jax.tree_util.tree_unflatten(out_tree, outs)
  return g
