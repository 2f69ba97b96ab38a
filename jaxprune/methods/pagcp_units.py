"""PAGCP's units and what a round starts from: the settings (`Config`), the
tolerance schedule (λ), per-filter scores recomputed on the current network, and the
units of the shared part with their FLOPs contributions and scan order.
`jaxprune.methods.pagcp` runs the greedy scan on them; every name here is
exported from there.

>>> units = pagcp.shared_units(variables, graph)
>>> [u.name for u in pagcp.scan_order(units, 0.9)][0] == max(units, key=lambda u: u.contribution).name
True
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

import jaxprune
from jaxprune.graph import ChannelGraph

Masks = dict[str, np.ndarray]
RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # np.linspace(.05, .95, 19)
NORMS = ("l1", "l2")


class Config(NamedTuple):
  """PAGCP's settings (official defaults unless noted).

  delta0: δ0, the tolerated relative loss rise of the first unit (official 0.05).
  total: T, the product of all (1 + δ_i) of a round; the official default 5
    (README 6) is for YOLOv5's ~69 units, 1.5-2 suits nets of a few units.
  ratios: candidate pruning ratios, scanned in order.
  topk: fraction of the units whose ratios survive the top-k filter (official
    default 1.0, README 0.8).
  criterion: "l1" or "l2" per-filter norm.
  probe: ratio pruned to measure a unit's FLOPs contribution.
  unit, mode: cost unit and `jaxprune.cost` mode of the FLOPs contribution and
    of the top-k loss rise per cost ("flops", "paper": 2 x conv/dense MACs,
    what the official model.info reports).
  target: None (tolerance-driven) or the fraction of the dense network's
    `target_unit` cost to keep; pruning stops when it is met.
  target_unit: "flops", "macs" or "params" (with `mode`).
  batched: evaluate all candidate ratios of a unit at once (vmap); False
    evaluates them one by one and stops at the first that breaks the
    tolerance, as the official code does. Same decisions either way.
  official_quirks: reproduce the official handling of a unit where no ratio
    breaks the tolerance (see the module docstring).
  """

  delta0: float = 0.05
  total: float = 1.5
  ratios: tuple[float, ...] = RATIOS
  topk: float = 0.8
  criterion: str = "l1"
  probe: float = 0.3
  unit: str = "flops"
  mode: str = "paper"
  target: float | None = None
  target_unit: str = "flops"
  batched: bool = True
  official_quirks: bool = False


def check_config(config: Config) -> None:
  """Raises a ValueError that names a setting out of range."""
  if not (isinstance(config.delta0, numbers.Real) and 0.0 < config.delta0 <= 1.0):
    raise ValueError(
      f"delta0 (δ0) must be in (0, 1], the first unit's tolerated relative loss rise; got {config.delta0!r}"
    )
  if not (isinstance(config.total, numbers.Real) and config.total > 1.0 + config.delta0):
    raise ValueError(
      f"total (T) must exceed 1 + delta0 = {1 + config.delta0}: the first unit "
      f"alone may raise the loss by that factor; got {config.total!r}"
    )
  r = np.asarray(config.ratios, float)
  if r.ndim != 1 or r.size < 1 or not np.all((r > 0) & (r < 1)) or np.any(np.diff(r) <= 0):
    raise ValueError(f"ratios must increase strictly within (0, 1), got {config.ratios!r}")
  if not 0.0 < config.topk <= 1.0:
    raise ValueError(f"topk must be in (0, 1], got {config.topk!r}")
  if not 0.0 < config.probe < 1.0:
    raise ValueError(f"probe must be in (0, 1), got {config.probe!r}")
  if config.criterion not in NORMS:
    raise ValueError(f"criterion must be one of {NORMS}, got {config.criterion!r}")
  for u in (config.unit, config.target_unit):
    if u not in jaxprune.UNITS:
      raise ValueError(f"unknown cost unit {u!r}; choose one of {jaxprune.UNITS}")
  if config.target is not None and not 0.0 < config.target <= 1.0:
    raise ValueError(f"target must be None or a fraction in (0, 1] of the dense cost, got {config.target!r}")


# --------------------------------------------------------------------------- schedule


def tolerance_decay(delta0: float, num_units: int, total: float) -> float:
  """λ with Π_{i<L} (1 + δ0 λ^i) = T, the official `ratio_compute` (fsolve there).

  The left side grows with λ from 1 + δ0 (λ = 0) to infinity, so the root is
  unique when T > 1 + δ0; it is bracketed and found with Brent's method. One
  unit has no later tolerance to schedule: λ = 1.

  Example:
    >>> round(tolerance_decay(0.06, 69, 6.0), 3)   # YOLOv5m, the README's settings
    0.972
  """
  check_config(Config(delta0=delta0, total=total))
  if num_units < 1:
    raise ValueError(f"num_units must be >= 1, got {num_units}")
  if num_units == 1:
    return 1.0
  powers = np.arange(num_units)

  def f(lam: float) -> float:
    return float(np.sum(np.log1p(delta0 * lam**powers)) - math.log(total))

  hi = 1.0
  while f(hi) < 0:
    hi *= 2.0
  return float(optimize.brentq(f, 0.0, hi, xtol=1e-15, rtol=1e-13))


# --------------------------------------------------------------------------- scores


def _producer(graph: ChannelGraph, member) -> bool:
  """A kernel whose last axis holds the group: the channels are its output filters."""
  i = graph.leaf_names.index(member.leaf)
  shape = graph.leaf_shapes[i]
  return graph.is_param[i] and len(shape) >= 2 and member.axis == len(shape) - 1


def _filter_scores(
  variables: Any, masks: Mapping[str, jax.Array], graph: ChannelGraph, norm: str
) -> dict[str, jax.Array]:
  leaves = jax.tree_util.tree_leaves(variables)
  keep = jax.tree_util.tree_leaves(jaxprune.expand(graph, masks))
  named = {n: (x, m) for n, x, m in zip(graph.leaf_names, leaves, keep)}
  fallback = None
  out = {}
  for g in graph.groups:
    total = jnp.zeros(g.size)
    producers = [mem for mem in g.members if _producer(graph, mem)]
    for mem in producers:
      x, m = named[mem.leaf]
      w = jnp.moveaxis(x * m, mem.axis, 0)[mem.index].reshape(mem.index.size, -1)
      alive = jnp.maximum(jnp.moveaxis(m, mem.axis, 0)[mem.index].reshape(mem.index.size, -1).sum(1), 1.0)
      # Mean over the filter's live weights: the filter as the slimmed network has it.
      s = jnp.abs(w).sum(1) / alive if norm == "l1" else jnp.sqrt((w * w).sum(1) / alive)
      total = total + jax.ops.segment_sum(s, jnp.asarray(mem.position), g.size)
    if not producers:  # no kernel produces these channels: the core's criterion
      if fallback is None:
        weighted = jax.tree_util.tree_map(
          lambda x, m: x * m if jnp.issubdtype(x.dtype, jnp.floating) else x, variables, jaxprune.expand(graph, masks)
        )
        fallback = getattr(jaxprune.criteria, norm)(weighted, graph)
      total = fallback[g.name]
    out[g.name] = total
  return out


@functools.lru_cache(maxsize=32)
def _jitted_scores(graph: ChannelGraph, norm: str):
  return jax.jit(lambda v, m: _filter_scores(v, m, graph, norm))


def filter_scores(
  variables: Any, graph: ChannelGraph, masks: Mapping[str, Any] | None = None, *, norm: str = "l1", jit: bool = True
) -> dict[str, jax.Array]:
  """Per-filter norm of every group's channels in the network under `masks`.

  A channel's score is the mean |w| ("l1") or root mean square ("l2") of its
  output filter in each kernel that produces it, over the weights that are
  still there (inputs of pruned channels do not count), summed over the
  producers: torch_pruning's L1/L2 strategy for one conv (same ranking), and
  the official `group_l1prune` (sum of per-filter mean |W|) for coupled
  convs. Groups that no kernel produces fall back to `jaxprune.criteria`.

  Example:
    >>> scores = pagcp.filter_scores(variables, graph, masks)   # {group: [size]}
  """
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  masks = graph.ones() if masks is None else {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}
  jaxprune.check_masks(graph, masks)
  if jit:
    return _jitted_scores(graph, norm)(variables, masks)
  return _filter_scores(variables, masks, graph, norm)


# --------------------------------------------------------------------------- units


class Unit(NamedTuple):
  """A prunable unit: one channel group of the shared part of the network."""

  name: str
  size: int  # live channels at the start of the round
  contribution: float  # cost removed when `probe` of them alone are pruned


def hard_masks(graph: ChannelGraph, masks: Mapping[str, Any] | None) -> Masks:
  """`masks` as NumPy 0/1 arrays (all ones for None); a ValueError for soft ones."""
  if masks is None:
    return {g.name: np.ones(g.size, np.float32) for g in graph.groups}
  jaxprune.check_masks(graph, masks)
  out = {k: np.asarray(v, np.float32) for k, v in masks.items()}
  if any(not np.all((m == 0) | (m == 1)) for m in out.values()):
    raise ValueError("PAGCP prunes hard masks (0 or 1); threshold soft masks first")
  return out


def prune_count(ratio: float, live: int) -> int:
  """Channels a ratio removes from `live` ones: floor(r n), keeping >= 1.

  The official `int(r * n)`; a tolerance of 1e-9 keeps 0.15 * 20 at 3
  whatever the float rounding of the ratio.

  >>> prune_count(0.3, 10), prune_count(0.95, 3), prune_count(0.05, 10)
  (3, 2, 0)
  """
  return int(min(math.floor(ratio * live + 1e-9), max(live - 1, 0)))


def remove_lowest(masks: Masks, name: str, scores: Mapping[str, Any], count: int) -> Masks:
  """`masks` with the `count` lowest-scoring live channels of group `name` removed."""
  m = masks[name].copy()
  live = np.nonzero(m > 0)[0]
  order = live[np.argsort(np.asarray(scores[name])[live], kind="stable")]
  m[order[:count]] = 0.0
  return {**masks, name: m}


def cost_of(graph: ChannelGraph, masks: Masks, unit: str, mode: str) -> float:
  """The cost of the network under `masks`, a fraction of the dense one's."""
  return float(jaxprune.ratio(graph, masks, unit, mode=mode))


def shared_units(
  variables: Any,
  graph: ChannelGraph,
  masks: Mapping[str, Any] | None = None,
  *,
  groups: Sequence[str] | None = None,
  prefix: str | None = "encoder.",
  config: Config = Config(),
) -> tuple[Unit, ...]:
  """The units of a round in trace order, with their FLOPs contribution.

  `groups` names them; by default every channel group whose name starts
  with `prefix` (the zoo's multitask model: its encoder, so heads stay whole).
  Groups with a single live channel cannot lose one and are left out.

  Raises:
    ValueError: an unknown group name, or no unit to prune.
  """
  check_config(config)
  m = hard_masks(graph, masks)
  names = [g.name for g in graph.groups]
  if groups is not None:
    unknown = [n for n in groups if n not in names]
    if unknown:
      raise ValueError(f"unknown groups {unknown}; the graph's groups are {names}")
    chosen = [n for n in names if n in set(groups)]
  else:
    chosen = [g.name for g in graph.groups if g.kind == "channel" and (prefix is None or g.name.startswith(prefix))]
  chosen = [n for n in chosen if m[n].sum() >= 2]
  if not chosen:
    raise ValueError(
      f"no unit to prune: no group with >= 2 live channels among "
      f"{list(groups) if groups is not None else f'names starting with {prefix!r}'}. "
      f"Pass groups= (the graph's groups: {names})."
    )
  scores = filter_scores(variables, graph, m, norm=config.criterion)
  base = cost_of(graph, m, config.unit, config.mode)
  out = []
  for n in chosen:
    live = int(m[n].sum())
    probed = remove_lowest(m, n, scores, prune_count(config.probe, live))
    out.append(Unit(n, live, base - cost_of(graph, probed, config.unit, config.mode)))
  return tuple(out)


def scan_order(units: Sequence[Unit], lam: float) -> tuple[Unit, ...]:
  """Largest FLOPs contribution first when λ <= 1 (tolerances shrink), smallest
  first when λ > 1: the official `sorted(..., reverse=exp <= 1)` (stable)."""
  return tuple(sorted(units, key=lambda u: u.contribution, reverse=lam <= 1))


def check_target(graph: ChannelGraph, masks: Masks, units: Sequence[Unit], config: Config) -> None:
  """A ValueError when the target is below what one live channel per unit allows."""
  if config.target is None:
    return
  floor = dict(masks)
  for u in units:
    m = floor[u.name].copy()
    m[np.nonzero(m > 0)[0][1:]] = 0.0
    floor[u.name] = m
  least = cost_of(graph, floor, config.target_unit, config.mode)
  if config.target < least:
    raise ValueError(
      f"target {config.target} of the dense {config.target_unit} cannot be met: keeping one "
      f"channel in each of the {len(units)} units already costs {least:.4f}. Raise the "
      "target or prune more groups (groups=)."
    )
