"""EPI's channel criteria: where each group's channels live among the params
(`channel_leaves`, built once per graph), the RMS magnitude of their filters,
and first-order Taylor scores of their BatchNorm parameters accumulated over an
epoch's gradients. `jaxprune.methods.epi` scores with them; they are exported
from there.

>>> spec = epi.channel_leaves(graph)
>>> sorted(epi.magnitude_rms(spec, variables["params"])) == sorted(g.name for g in graph.groups)
True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.graph import ChannelGraph

Pytree = Any


# ---------------------------------------------------------------------------
# Where each group's channels live among the params (built once per graph).


class Slices(NamedTuple):
  """A group's channels in one params leaf: `leaf` (params flattening order), axis, indices."""

  leaf: int
  axis: int
  index: np.ndarray
  position: np.ndarray


class GroupLeaves(NamedTuple):
  name: str
  size: int
  bn: tuple[tuple[Slices, Slices | None], ...]  # (scale, bias) per normalisation layer
  kernels: tuple[Slices, ...]  # output-channel slices of conv/dense kernels


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelLeaves:
  """Per group, its BatchNorm parameters and output filters; hashed by identity (jit-static)."""

  groups: tuple[GroupLeaves, ...]
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]

  @property
  def num_channels(self) -> int:
    return sum(g.size for g in self.groups)

  def leaves(self, params: Pytree, what: str = "params") -> list:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if treedef != self.treedef:
      raise ValueError(
        f"{what} do not have the structure of the params the graph was traced "
        "with; pass the params dict (variables['params'], or state.params)."
      )
    return leaves


def channel_leaves(graph: ChannelGraph, collection: str | None = "params") -> ChannelLeaves:
  """Index the graph's groups into the params pytree.

  A normalisation layer is a pair of 1-D params `<layer>.scale` and
  `<layer>.bias` in the group (flax's BatchNorm/LayerNorm/GroupNorm); an
  output filter is a >= 2-D params leaf whose group axis is its last (flax's
  HWIO conv and (in, out) dense kernels). `collection` names the params in
  the traced variables (None: the graph was traced on the params alone).

  >>> spec = epi.channel_leaves(graph)
  """
  n = len(graph.leaf_names)
  index_tree = jax.tree_util.tree_unflatten(graph.treedef, list(range(n)))
  if collection is not None:
    if not isinstance(index_tree, Mapping) or collection not in index_tree:
      raise ValueError(
        f"the graph was not traced on a dict with a {collection!r} collection; "
        "trace jaxprune.functional's variables or pass collection=None"
      )
    index_tree = index_tree[collection]
  order, treedef = jax.tree_util.tree_flatten(index_tree)
  to_param = {g: p for p, g in enumerate(order)}
  out = []
  for group in graph.groups:
    mine = [
      m
      for m in group.members
      if graph.is_param[graph.leaf_names.index(m.leaf)] and graph.leaf_names.index(m.leaf) in to_param
    ]

    def slices(m):
      li = graph.leaf_names.index(m.leaf)
      return Slices(to_param[li], m.axis, np.asarray(m.index, np.int32), np.asarray(m.position, np.int32))

    ndim = lambda m: len(graph.leaf_shapes[graph.leaf_names.index(m.leaf)])
    by_name = {m.leaf: m for m in mine if ndim(m) == 1}
    bn = []
    for name, m in by_name.items():
      if name.rsplit(".", 1)[-1] != "scale":
        continue
      bias = by_name.get(name[: -len("scale")] + "bias")
      same = bias is not None and np.array_equal(bias.index, m.index) and np.array_equal(bias.position, m.position)
      bn.append((slices(m), slices(bias) if same else None))
    kernels = tuple(slices(m) for m in mine if ndim(m) >= 2 and m.axis == ndim(m) - 1)
    out.append(GroupLeaves(group.name, group.size, tuple(bn), kernels))
  shapes = tuple(graph.leaf_shapes[g] for g in order)
  return ChannelLeaves(tuple(out), treedef, shapes)


def _per_channel(x: jax.Array, s: Slices, size: int, reduce) -> jax.Array:
  moved = jnp.moveaxis(x, s.axis, 0)[s.index]
  return jax.ops.segment_sum(reduce(moved.reshape(moved.shape[0], -1)), s.position, size)


# ---------------------------------------------------------------------------
# Criteria.


@functools.partial(jax.jit, static_argnums=0)
def magnitude_rms(spec: ChannelLeaves, params: Pytree) -> dict[str, jax.Array]:
  """Per channel, sqrt(sum of its output filters' squared weights / their count).

  The paper's Eq. (2) as cited, ||W_n||_2 / sqrt(P) [unverified], over the
  union of a coupled group's filters (`score_norm="rms"`). Meant to make
  layers compare; at He/LeCun init it falls as 1/sqrt(fan) (docs/epi.md).
  """
  leaves = spec.leaves(params)
  out = {}
  for g in spec.groups:
    if not g.kernels:
      raise ValueError(
        f"group {g.name!r} has no conv/dense output filter on a kernel's last "
        "axis; use score_norm='group_mean' (the core's l2) for this model"
      )
    sq = sum(_per_channel(leaves[s.leaf], s, g.size, lambda w: (w**2).sum(1)) for s in g.kernels)
    count = sum(_per_channel(jnp.ones(spec.shapes[s.leaf]), s, g.size, lambda w: w.sum(1)) for s in g.kernels)
    out[g.name] = jnp.sqrt(sq / count)
  return out


class TaylorState(NamedTuple):
  """Sum of per-step Taylor scores (flat, groups in graph order) and the steps counted."""

  total: jax.Array
  count: jax.Array


def taylor_init(spec: ChannelLeaves) -> TaylorState:
  return TaylorState(jnp.zeros(spec.num_channels, jnp.float32), jnp.zeros((), jnp.int32))


def taylor_step(spec: ChannelLeaves, params: Pytree, grads: Pytree, *, square: bool = False) -> jax.Array:
  """One step's Taylor score per channel (flat): |sum_bn gamma g_gamma + beta g_beta|.

  Summed over the group's normalisation layers before the abs (HALP); a
  group without one uses its kernels' output filters, |sum w g|. `square`
  squares instead of the abs (Molchanov et al. 2019) [unverified which EPI used].
  """
  p, g = spec.leaves(params), spec.leaves(grads, "grads")
  parts = []
  for grp in spec.groups:
    if grp.bn:
      total = 0.0
      for scale, bias in grp.bn:
        for s in (scale, bias) if bias is not None else (scale,):
          total = total + jax.ops.segment_sum(p[s.leaf][s.index] * g[s.leaf][s.index], s.position, grp.size)
    elif grp.kernels:
      total = sum(_per_channel(p[s.leaf] * g[s.leaf], s, grp.size, lambda w: w.sum(1)) for s in grp.kernels)
    else:
      raise ValueError(
        f"group {grp.name!r} has neither a normalisation layer nor an output "
        "filter among the params; Taylor cannot score it"
      )
    parts.append(jnp.broadcast_to(total, (grp.size,)))
  c = jnp.concatenate(parts)
  return c**2 if square else jnp.abs(c)


def taylor_accumulate(
  acc: TaylorState, spec: ChannelLeaves, params: Pytree, grads: Pytree, *, square: bool = False
) -> TaylorState:
  """Add one step's scores (call it in the train step on the gradients it has).

  Steps with a non-finite score are skipped, as HALP does. Jit-able.

  >>> spec = epi.channel_leaves(graph)
  >>> acc = epi.taylor_init(spec)
  >>> grads = jax.tree.map(jnp.ones_like, variables)   # the train step's gradients
  >>> acc = epi.taylor_accumulate(acc, spec, variables["params"], grads["params"])
  >>> int(acc.count)
  1
  """
  c = taylor_step(spec, params, grads, square=square)
  ok = jnp.all(jnp.isfinite(c))
  return TaylorState(acc.total + jnp.where(ok, c, 0.0), acc.count + ok.astype(jnp.int32))


def taylor_scores(acc: TaylorState, spec: ChannelLeaves) -> dict[str, jax.Array]:
  """The mean score per channel over the accumulated steps, per group."""
  if int(acc.count) == 0:
    raise ValueError(
      "no Taylor steps accumulated: call taylor_accumulate in the train step "
      "(or chain taylor_transform in front of the optimizer) before scoring"
    )
  mean = np.asarray(acc.total) / int(acc.count)
  offsets = np.cumsum([0] + [g.size for g in spec.groups])
  return {g.name: jnp.asarray(mean[a:b]) for g, a, b in zip(spec.groups, offsets, offsets[1:])}


def taylor_transform(
  spec: ChannelLeaves, *, square: bool = False, select_params=lambda tree: tree["params"]
) -> optax.GradientTransformation:
  """An optax stage that accumulates Taylor scores and passes the gradients on.

  Chain it first, `optax.chain(epi.taylor_transform(spec), tx)`, so that the
  existing train step feeds it raw gradients; its state (`opt_state[0]`, a
  `TaylorState`) is checkpointed with the train state. `select_params` picks
  the model params out of what the optimizer updates (jaxprune.training
  updates `{'params': ..., 'extra': ...}`). After pruning, keep the inner
  optimizer and its state, `opt_state[1]`.
  """

  def init(params):
    del params
    return taylor_init(spec)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("taylor_transform needs params: call tx.update(grads, state, params)")
    return updates, taylor_accumulate(state, spec, select_params(params), select_params(updates), square=square)

  return optax.GradientTransformation(init, update)


def find_taylor(opt_state: Pytree) -> TaylorState:
  """The `taylor_transform` stage's accumulator inside an optimizer state."""
  found = [
    x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TaylorState)) if isinstance(x, TaylorState)
  ]
  if len(found) != 1:
    raise ValueError(f"expected one epi.taylor_transform stage in the optimizer state, found {len(found)}")
  return found[0]


def replace_taylor(opt_state: Pytree, acc: TaylorState) -> Pytree:
  """The optimizer state with its `taylor_transform` accumulator replaced by `acc`."""
  is_t = lambda x: isinstance(x, TaylorState)
  return jax.tree.map(lambda x: acc if is_t(x) else x, opt_state, is_leaf=is_t)
