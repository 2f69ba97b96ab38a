"""The channel graph: prunable channel groups and where their channels live.

A `ChannelGraph` is plain data produced by `jaxprune.trace`. Masks are dicts
`{group.name: array[..., group.size]}`; internally every group's mask is laid
into one flat vector whose entry 0 is a constant 1 (channels no group owns),
so each leaf axis, activation axis and cost term is just an index vector into
it. That makes `cost`, `masked` and `expand` gathers and sums: jit-able,
differentiable and vmap-able.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Masks = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One place a group's channels live: `leaf` axis `axis` at `index`."""
  leaf: str
  axis: int
  index: np.ndarray     # indices along the axis
  position: np.ndarray  # the group position of each index


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """Channels that are kept or removed together; its mask has `size` entries."""
  name: str
  size: int
  members: tuple[Member, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
  """A cost term: coef * sum_g prod_k sum(flat_mask[factor_k] in block g)."""
  kind: str
  name: str
  coef: float
  factors: tuple[np.ndarray, ...]
  groups: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGraph:
  """Result of `jaxprune.trace`.

  Attributes:
    groups: prunable channel groups in trace order.
    leaf_names: dotted name of each variable leaf (flattening order).
    leaf_shapes: shape of each leaf at trace time.
    is_param: whether each leaf counts as a parameter.
    leaf_axes: per leaf, {axis: flat mask index per position} for the axes
      that hold prunable channels.
    terms: cost terms (per-sample) in trace order.
    treedef: tree structure of the variables.
  """
  groups: tuple[Group, ...]
  leaf_names: tuple[str, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  is_param: tuple[bool, ...]
  leaf_axes: tuple[dict[int, np.ndarray], ...]
  terms: tuple[Term, ...]
  treedef: Any

  @property
  def offsets(self) -> dict[str, int]:
    out, o = {}, 1
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

  def ones(self, batch_shape: Sequence[int] = ()) -> dict[str, jax.Array]:
    """All-keep masks, optionally with leading per-sample axes."""
    return {g.name: jnp.ones((*batch_shape, g.size)) for g in self.groups}

  def flat(self, masks: Masks) -> jax.Array:
    """Concatenate checked masks into the flat vector (entry 0 is 1)."""
    check_masks(self, masks)
    batch = jnp.shape(next(iter(masks.values())))[:-1] if self.groups else ()
    parts = [jnp.ones((*batch, 1))]
    parts += [jnp.broadcast_to(jnp.asarray(masks[g.name], jnp.float32), (*batch, g.size))
              for g in self.groups]
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
        "Start from graph.ones() and change values, not keys.")
  batch = None
  for g in graph.groups:
    shape = jnp.shape(masks[g.name])
    if len(shape) == 0 or shape[-1] != g.size:
      raise ValueError(
          f"mask for group {g.name!r} has shape {shape}; expected (..., {g.size}): "
          "one entry per channel, with optional leading per-sample axes.")
    if batch is None:
      batch = shape[:-1]
    elif shape[:-1] != batch:
      raise ValueError(
          f"mask for group {g.name!r} has leading shape {shape[:-1]} but others have "
          f"{batch}; per-sample masks must share one batch shape.")
