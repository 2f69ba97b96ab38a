"""Turn channel scores into hard masks: per group (local) or to a global budget."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.cost import UNITS, cost
from jaxprune.graph import ChannelGraph

Masks = dict[str, jax.Array]


class BudgetUnmet(ValueError):
  """A budget the selection's constraints (min_channels, round_to, whole groups)
  cannot reach: a caller may relax them and try again (a ValueError, as before)."""


def _check_budget(budget: float, what: str = "budget") -> None:
  # numbers.Real: numpy scalars too (np.float32 is no Python float)
  if isinstance(budget, bool) or not (isinstance(budget, numbers.Real) and 0.0 < budget <= 1.0):
    raise ValueError(f"{what} must be a fraction in (0, 1] of the dense network, got {budget!r}")


def _keep_count(size: int, n: int, min_channels: int, round_to: int) -> int:
  n = max(n, min(min_channels, size))
  if round_to > 1 and n < size:
    n = max(round_to * (n // round_to), min(round_to, size), min(min_channels, size))
  return min(n, size)


def _masks_from_counts(graph: ChannelGraph, order: Mapping[str, np.ndarray], counts) -> Masks:
  out = {}
  for g, n in zip(graph.groups, counts):
    m = np.zeros(g.size, np.float32)
    m[order[g.name][:n]] = 1.0
    out[g.name] = jnp.asarray(m)
  return out


def _orders(graph: ChannelGraph, scores, keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
  unknown = sorted(set(keep) - {g.name for g in graph.groups})
  if unknown:
    raise ValueError(f"keep names unknown groups {unknown}")
  missing = [g.name for g in graph.groups if g.name not in scores and g.name not in keep]
  if missing:
    raise ValueError(f"scores missing for groups {missing} (pass keep=[...] to keep groups whole)")
  return {
    g.name: (np.arange(g.size) if g.name in keep else np.argsort(-np.asarray(scores[g.name]), kind="stable"))
    for g in graph.groups
  }


def local(
  scores: Mapping[str, jax.Array],
  graph: ChannelGraph,
  keep: float,
  *,
  min_channels: int = 1,
  round_to: int = 1,
  whole: Sequence[str] = (),
) -> Masks:
  """Keep the top `keep` fraction of every group (groups in `whole` entirely).

  Example:
    >>> masks = jaxprune.select.local(scores, graph, keep=0.5)
  """
  _check_budget(keep, "keep")
  order = _orders(graph, scores, whole)
  counts = [
    g.size if g.name in whole else _keep_count(g.size, math.ceil(keep * g.size), min_channels, round_to)
    for g in graph.groups
  ]
  return _masks_from_counts(graph, order, counts)


@functools.lru_cache(maxsize=32)
def _unit_cost(graph: ChannelGraph, unit: str, mode: str):
  # One compile per graph and unit: methods threshold again every epoch.
  return jax.jit(lambda m: getattr(cost(graph, m, mode=mode), unit))


def global_topk(
  scores: Mapping[str, jax.Array],
  graph: ChannelGraph,
  budget: float,
  unit: str | Callable[[Masks], jax.Array] = "macs",
  *,
  min_channels: int = 1,
  round_to: int = 1,
  mode: str = "exact",
  normalize: bool = True,
  whole: Sequence[str] = (),
) -> Masks:
  """Keep the globally best channels while cost(unit) <= budget x dense cost.

  Scores are divided by their group's mean so groups compare (`normalize=False`
  ranks raw scores, for methods whose scores share one scale). Channels are
  removed lowest score first; the search (bisection on how many are removed)
  stops at the largest kept set within the budget, so the result is within
  one channel's worth of it. Every group keeps `min_channels` (its best), and
  with `round_to` > 1 kept counts are rounded down to multiples of it (even
  widths run faster on most hardware). Groups in `whole` are kept entirely
  (e.g. residual streams when pruning branches). `unit` is a cost unit or a
  function of masks giving the cost to budget (e.g. a method's own count).

  Example:
    >>> masks = jaxprune.select.global_topk(scores, graph, budget=0.5, unit="macs")
  """
  _check_budget(budget)
  if not callable(unit) and unit not in UNITS:
    raise ValueError(f"unknown cost unit {unit!r}; choose one of {UNITS}")
  order = _orders(graph, scores, whole)
  names = [g.name for g in graph.groups if g.name not in whole]
  norm = [np.asarray(scores[n], np.float64) for n in names]
  if normalize:
    norm = [s / (np.mean(np.abs(s)) + 1e-12) for s in norm]
  # Global ranking of (group, rank within group), lowest normalized score first.
  gid = np.concatenate([np.full(len(s), k) for k, s in enumerate(norm)]) if norm else np.zeros(0, int)
  val = np.concatenate([np.sort(s) for s in norm]) if norm else np.zeros(0)
  ranking = gid[np.argsort(val, kind="stable")]
  pruned = [g for g in graph.groups if g.name not in whole]
  sizes = np.array([g.size for g in pruned])

  unit_cost = unit if callable(unit) else _unit_cost(graph, unit, mode)
  full = float(unit_cost(graph.ones()))

  def masks_after(k: int) -> Masks:
    removed = dict(zip([g.name for g in pruned], np.bincount(ranking[:k], minlength=len(sizes))))
    counts = [
      g.size if g.name in whole else _keep_count(g.size, int(g.size - removed[g.name]), min_channels, round_to)
      for g in graph.groups
    ]
    return _masks_from_counts(graph, order, counts)

  def fits(k: int) -> bool:
    return float(unit_cost(masks_after(k))) <= budget * full * (1 + 1e-6)

  lo, hi = 0, len(ranking)  # fits(lo) is true for budget 1; find the smallest k that fits
  if fits(lo):
    return masks_after(lo)
  if not fits(hi):
    floor = float(unit_cost(masks_after(hi))) / full
    raise BudgetUnmet(
      f"budget {budget} in {getattr(unit, '__name__', unit)} cannot be met: keeping {max(min_channels, round_to)} "
      f"channel(s) per group (or the whole group if narrower) already costs {floor:.4f} of the dense network. "
      "Raise the budget"
      + (" or lower round_to" if round_to > 1 else "")
      + (" or lower min_channels" if min_channels > 1 else "")
      + "."
    )
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      hi = mid
    else:
      lo = mid
  return masks_after(hi)
