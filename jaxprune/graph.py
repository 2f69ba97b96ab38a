"""The channel graph: prunable groups, where their channels live, and what keeps them.

A `ChannelGraph` is plain data produced by `jaxprune.trace`. Masks are dicts
`{group.name: array[..., group.size]}`; internally every group's mask is laid
into one flat vector whose entry 0 is a constant 1 and entry 1 a constant 0,
so every place a channel lives (a leaf axis position, an activation channel, a
cost term's factor) is an `Expr` of index vectors into it. That makes `cost`,
`masked`, `expand` and `slim` gathers, products and sums: jit-able,
differentiable and vmap-able.

Groups come in two kinds. A *channel* group is a set of coupled channels
(a conv's outputs, its BatchNorm, its consumers' inputs; a residual stream).
A *branch* group (``trace(..., branches=True)``) belongs to one producer of a
residual sum (a block's last conv/BN, a projection shortcut, a stem that
starts a stream): its mask zeroes that producer's output channels before the
sum, the identity path is never masked, and a stream channel is alive for a
consumer when its channel mask keeps it and at least one producer reaching the
consumer keeps it (the union 1 - prod(1 - m)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Masks = Mapping[str, jax.Array]
ONE, ZERO = 0, 1  # flat indices of the constants
FIRST = 2  # flat index of the first group entry
KINDS = ("channel", "branch")


@dataclasses.dataclass(frozen=True, eq=False)
class Expr:
  """What keeps each of `n` places: prod_k m[prod[k]] * (1 - prod_l (1 - m[union[l]])).

  `prod` is (K, n), `union` (L, n) flat indices; L = 0 means no union factor.
  A channel group entry alone is `prod = [[entry]]`; a producer's output
  channel under a branch mask is `[[channel], [branch]]`; a stream channel read
  by a consumer is its channel entry times the union of the branch entries of
  the producers that reach it.
  """

  prod: np.ndarray
  union: np.ndarray

  @property
  def size(self) -> int:
    return int(self.prod.shape[1])

  def __getitem__(self, sl) -> "Expr":
    return Expr(self.prod[:, sl], self.union[:, sl])

  def value(self, flat: jax.Array) -> jax.Array:
    """Per-place keep values (`flat`: (..., N) from `ChannelGraph.flat`) -> (..., n)."""
    xp = np if isinstance(flat, np.ndarray) else jnp
    v = flat[..., self.prod[0]]
    for k in range(1, self.prod.shape[0]):
      v = v * flat[..., self.prod[k]]
    if self.union.shape[0]:
      miss = 1.0 - flat[..., self.union[0]]
      for k in range(1, self.union.shape[0]):
        miss = miss * (1.0 - flat[..., self.union[k]])
      v = v * (1.0 - miss)
    return v if xp is jnp else np.asarray(v)

  @property
  def channel(self) -> np.ndarray:
    """The channel-group entry of each place (row 0)."""
    return self.prod[0]

  @staticmethod
  def of(prod: Sequence[np.ndarray], union: Sequence[np.ndarray] = ()) -> "Expr":
    p = np.stack([np.asarray(a, np.int32) for a in prod]) if prod else np.zeros((1, 0), np.int32)
    n = p.shape[1]
    u = np.stack([np.asarray(a, np.int32) for a in union]) if len(union) else np.zeros((0, n), np.int32)
    return Expr(p, u)


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One place a group's channels live: `leaf` axis `axis` at `index`."""

  leaf: str
  axis: int
  index: np.ndarray  # indices along the axis
  position: np.ndarray  # the group position of each index


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """Channels kept or removed together; its mask has `size` entries.

  `kind` is "channel" or "branch" (see the module docstring).
  """

  name: str
  size: int
  members: tuple[Member, ...]
  kind: str = "channel"


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
  """A cost term: coef * sum_g prod_k sum(factor_k.value(flat) in block g)."""

  kind: str
  name: str
  coef: float
  factors: tuple[Expr, ...]
  groups: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class IndexLeaf:
  """An integer leaf holding channel positions (the bundled ResNets' gather and
  expand vectors). `slim` keeps the places `own` keeps and renumbers the values
  into the places `target` keeps (a value whose target is gone becomes the
  sentinel, the kept count)."""

  leaf: int
  axis: int
  own: Expr
  target: Expr
  kind: str  # "gather" (a consumer reads kept stream channels) | "expand" (a branch fills the stream)


@dataclasses.dataclass(frozen=True, eq=False)
class Physical:
  """A place where the slimmed network's width is fixed by what the model computes:
  slim can realise `expr` there only where it equals the channel entry alone."""

  what: str
  expr: Expr


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGraph:
  """Result of `jaxprune.trace`.

  Attributes:
    groups: prunable groups in trace order (channel groups, then branch groups).
    leaf_names: dotted name of each variable leaf (flattening order).
    leaf_shapes: shape of each leaf at trace time.
    is_param: whether each leaf counts as a parameter.
    leaf_axes: per leaf, {axis: `Expr` per position} for the axes that hold
      prunable channels.
    terms: cost terms (per-sample) in trace order.
    treedef: tree structure of the variables.
    index_leaves: integer leaves holding channel positions, see `IndexLeaf`.
    physical: places the model's code fixes (see `Physical`); `slim` checks them.
    branches: per branch group, the producer's kernel leaf index.
    example_args: shapes and dtypes of the example inputs.
    has_branches: traced with `branches=True` (residual sums, if any, have
      branch groups).
  """

  groups: tuple[Group, ...]
  leaf_names: tuple[str, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  is_param: tuple[bool, ...]
  leaf_axes: tuple[dict[int, Expr], ...]
  terms: tuple[Term, ...]
  treedef: Any
  index_leaves: tuple[IndexLeaf, ...] = ()
  physical: tuple[Physical, ...] = ()
  branches: tuple[tuple[str, int], ...] = ()
  example_args: tuple[Any, ...] = ()
  has_branches: bool = False

  @property
  def offsets(self) -> dict[str, int]:
    """Flat index of each group's first entry."""
    out, o = {}, FIRST
    for g in self.groups:
      out[g.name] = o
      o += g.size
    return out

  @property
  def num_channels(self) -> int:
    return sum(g.size for g in self.groups)

  def group(self, name: str) -> Group:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups]}")

  def names(self, kind: str | None = None) -> list[str]:
    """Group names, optionally of one kind ("channel" or "branch")."""
    if kind is not None and kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [g.name for g in self.groups if kind is None or g.kind == kind]

  def streams(self) -> list[str]:
    """Channel groups that are residual streams: a branch group's channels are theirs.

    The seeds' methods prune the branches and leave these whole.
    """
    starts = np.array(list(self.offsets.values()) + [FIRST + self.num_channels])
    found: set[int] = set()
    for axes in self.leaf_axes:
      for e in axes.values():
        if e.prod.shape[0] < 2:
          continue
        both = (e.prod[0] >= FIRST) & (e.prod[1] >= FIRST)
        found.update(np.searchsorted(starts, np.unique(e.prod[0][both]), side="right") - 1)
    return [g.name for k, g in enumerate(self.groups) if k in found and g.kind == "channel"]

  def complete(self, masks: Masks, batch_shape: Sequence[int] = ()) -> dict[str, jax.Array]:
    """`masks` for some groups, all-keep masks for the others."""
    unknown = sorted(set(masks) - {g.name for g in self.groups})
    if unknown:
      raise ValueError(f"masks for unknown groups {unknown}")
    ones = self.ones(batch_shape)
    return {g.name: masks[g.name] if g.name in masks else ones[g.name] for g in self.groups}

  def ones(self, batch_shape: Sequence[int] = ()) -> dict[str, jax.Array]:
    """All-keep masks, optionally with leading per-sample axes."""
    return {g.name: jnp.ones((*batch_shape, g.size)) for g in self.groups}

  def flat(self, masks: Masks) -> jax.Array:
    """Concatenate checked masks into the flat vector (entries 0 and 1 are 1 and 0)."""
    check_masks(self, masks)
    batch = jnp.shape(next(iter(masks.values())))[:-1] if self.groups else ()
    parts = [jnp.ones((*batch, 1)), jnp.zeros((*batch, 1))]
    parts += [jnp.broadcast_to(jnp.asarray(masks[g.name], jnp.float32), (*batch, g.size)) for g in self.groups]
    return jnp.concatenate(parts, axis=-1)

  def __repr__(self) -> str:
    sizes = ", ".join(f"{g.name}:{g.size}" for g in self.groups[:6])
    more = f", ... ({len(self.groups)} groups)" if len(self.groups) > 6 else ""
    return f"ChannelGraph({sizes}{more})"


def check_masks(graph: ChannelGraph, masks: Masks) -> None:
  """Raise a clear error for missing, unknown or wrongly shaped masks."""
  if not isinstance(masks, Mapping):
    raise TypeError(f"masks must be a dict {{group name: array}}, got {type(masks).__name__}")
  names = [g.name for g in graph.groups]
  unknown = sorted(set(masks) - set(names))
  missing = [n for n in names if n not in masks]
  if unknown or missing:
    raise ValueError(
      f"masks do not match the graph: unknown {unknown}, missing {missing}. "
      "Start from graph.ones() and change values, not keys."
    )
  batch = None
  for g in graph.groups:
    m = masks[g.name]
    dtype = getattr(m, "dtype", None) or np.asarray(m).dtype
    if not (
      jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
    ):
      raise TypeError(
        f"mask for group {g.name!r} has dtype {dtype}; masks are real numbers in [0, 1] (float, int or bool arrays)."
      )
    if not isinstance(m, jax.core.Tracer):
      v = np.asarray(m, np.float64)
      if v.size and not (np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0):
        raise ValueError(
          f"mask for group {g.name!r} has values outside [0, 1] (min {np.nanmin(v):.4g}, "
          f"max {np.nanmax(v):.4g}{', non-finite' if not np.isfinite(v).all() else ''}); "
          "a mask is the kept fraction of each channel: 1 keeps it, 0 removes it."
        )
    shape = jnp.shape(m)
    if len(shape) == 0 or shape[-1] != g.size:
      raise ValueError(
        f"mask for group {g.name!r} has shape {shape}; expected (..., {g.size}): "
        "one entry per channel, with optional leading per-sample axes."
      )
    if batch is None:
      batch = shape[:-1]
    elif shape[:-1] != batch:
      raise ValueError(
        f"mask for group {g.name!r} has leading shape {shape[:-1]} but others have "
        f"{batch}; per-sample masks must share one batch shape."
      )


def pad_expr(e: Expr, k: int, l: int) -> Expr:
  """The same expr with k product rows and l union rows."""
  p = np.full((k, e.size), ONE, np.int32)
  p[: e.prod.shape[0]] = e.prod
  u = np.full((l, e.size), ZERO, np.int32)
  if l:
    if e.union.shape[0]:
      u[: e.union.shape[0]] = e.union
    else:
      u[0] = ONE
  return Expr(p, u)
