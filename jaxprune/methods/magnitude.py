"""Magnitude channel pruning, one-shot or iterative: the baseline for every method.

Score channels with a criterion (l1, l2, bn_scale, fpgm, random, taylor),
select to a budget in any cost unit (global or local), slim. Iterative
pruning reaches the final budget in `steps` geometric stages with finetuning
in between (Han et al. 2015; Li et al. 2017 for filters).

Example:
  >>> from jaxprune.methods import magnitude
  >>> masks = magnitude.prune(state, graph, criterion="l1", budget=0.5, unit="macs")
  >>> small = jaxprune.slim(state, graph, masks)
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxprune import criteria as criteria_lib
from jaxprune import select
from jaxprune.cost import cost
from jaxprune.graph import ChannelGraph

CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "random", "taylor")


def schedule(budget: float, steps: int) -> list[float]:
  """Budgets (fractions of the dense cost) after each of `steps` stages.

  Geometric, so every stage removes the same fraction of what is left.

  >>> [round(b, 3) for b in schedule(0.25, 2)]
  [0.5, 0.25]
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  select._check_budget(budget)
  return [budget ** ((k + 1) / steps) for k in range(steps)]


def scores(
  variables: Any,
  graph: ChannelGraph,
  criterion: str,
  *,
  key: jax.Array | None = None,
  fn: Callable | None = None,
  loss_fn: Callable | None = None,
  args: tuple = (),
):
  """Channel scores by name; `taylor` needs `fn`, `loss_fn` and a batch in `args`."""
  if criterion == "random":
    return criteria_lib.random(jax.random.key(0) if key is None else key, graph)
  if criterion == "taylor":
    if fn is None or loss_fn is None or not args:
      raise ValueError("criterion 'taylor' needs fn, loss_fn and a batch (args)")
    return criteria_lib.taylor(fn, variables, graph, loss_fn, *args)
  if criterion not in CRITERIA:
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
  return getattr(criteria_lib, criterion)(variables, graph)


def prune(
  variables: Any,
  graph: ChannelGraph,
  *,
  criterion: str = "l1",
  budget: float,
  unit: str = "macs",
  scope: str = "global",
  min_channels: int = 1,
  round_to: int = 1,
  reference: float | None = None,
  whole: tuple[str, ...] | None = None,
  **score_kw,
) -> dict[str, jax.Array]:
  """Hard masks keeping `budget` of the cost (of `reference`, default this network).

  `reference` is the dense network's cost in `unit`, for iterative pruning of
  an already slimmed network to a budget stated against the original one.
  `unit` may be a function of masks (a method's own count, e.g. ChipNet's
  official volume). `whole`: groups kept entirely; by default the residual streams of a graph
  traced with branch groups (the units the seed methods prune are the
  branches, so the baseline prunes the same ones).
  """
  s = scores(variables, graph, criterion, **score_kw)
  whole = tuple(graph.streams()) if whole is None else tuple(whole)
  if scope == "local":
    return select.local(s, graph, keep=budget, min_channels=min_channels, round_to=round_to, whole=whole)
  if scope != "global":
    raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
  rel = budget if reference is None else budget * reference / float(getattr(cost(graph), unit))
  if rel >= 1.0:
    return {g.name: jax.numpy.ones(g.size) for g in graph.groups}
  return select.global_topk(s, graph, budget=rel, unit=unit, min_channels=min_channels, round_to=round_to, whole=whole)
