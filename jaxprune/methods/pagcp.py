"""PAGCP: performance-aware greedy global channel pruning of multitask CNNs.

Ye et al., "Performance-aware Approximation of Global Channel Pruning for
Multitask CNNs" (TPAMI 2023), after the official code (HankYe/PAGCP,
`prune/sensitivity.py`), for any multitask network given as one loss
function per task on shared variables.

A round:
  1. Units: the core's channel groups of the shared part (the heads are
     left whole). Each unit's *FLOPs contribution* is the cost removed when
     30% of its channels alone are pruned (`jaxprune.cost`).
  2. Tolerance schedule: λ solves Π_{i<L} (1 + δ0 λ^i) = T (L units); units
     are scanned largest contribution first when λ <= 1 (smallest first
     when λ > 1, as the official sort does), and δ <- δ λ after every
     pruned unit.
  3. Greedy scan, unit by unit, on the network with the units before it
     already pruned: candidates prune floor(r n) (at most n - 1) of the
     unit's n channels, lowest per-filter L1 (or L2) first, for r in
     0.05, 0.10, ..., 0.95. The first r where some task's validation loss
     exceeds (1 + δ) times its base loss stops the scan; that task is the
     unit's most sensitive; the unit is pruned at the previous r, and each
     base loss becomes max(base, its loss there).
  4. Top-k filter: of the pruned units, the int(L topk) with the smallest
     loss rise per FLOP removed keep their ratios, which are re-applied in
     scan order with the scores recomputed on the current network.
Rounds of prune -> finetune (a callback of the caller) repeat this.

The oracle is batched: all candidate ratios of a unit are masks stacked on a
leading axis and evaluated in one `jax.vmap` (`jaxprune.gated` sets the
unit's mask just before its producer, so the network up to there runs once;
`shard_map`-ed over the candidates when there are several devices), where
the official code runs one validation pass per candidate.

Beyond the official code: an explicit cost target (`Config.target`, a
fraction of the dense FLOPs or params) that stops pruning as soon as it is
met, within one channel. Quirks of the official scan and what is done here
(`Config.official_quirks=True` reproduces the official behaviour):
  * No ratio breaks the tolerance: the official code leaves the greedy
    network unpruned for that unit yet later applies ratio 0.90 to it (the
    second-to-last ratio). Here the unit is pruned at 0.95, the largest ratio
    that was checked and passed, in the greedy network as in the result.
  * The first ratio already breaks it: the unit stays whole, δ and the base
    losses do not change, and it takes no part in the top-k ranking (as in
    the official code; both modes).

Example:
  >>> from jaxprune.methods import pagcp
  >>> oracle = pagcp.make_oracle(fn, graph, pagcp.cross_entropy_losses(("left", "right")),
  ...                            {"image": x_val, "label": y_val})
  >>> result = pagcp.prune(variables, graph, oracle, rounds=2, finetune=finetune,
  ...                      config=pagcp.Config(total=1.5))
  >>> small = jaxprune.slim(result.variables, graph, result.masks)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxprune.graph import ChannelGraph
from jaxprune.methods.pagcp_oracle import Oracle, cross_entropy_losses, make_oracle
from jaxprune.methods.pagcp_units import (
  NORMS,
  RATIOS,
  Config,
  Masks,
  Unit,
  check_config,
  check_target,
  cost_of,
  filter_scores,
  hard_masks,
  prune_count,
  remove_lowest,
  scan_order,
  shared_units,
  tolerance_decay,
)

# --------------------------------------------------------------------------- greedy scan


class UnitScan(NamedTuple):
  """What the greedy scan found for one unit.

  losses: `[R, T]` per-task validation loss at each candidate ratio (NaN where
    a one-by-one scan stopped before it).
  fail: index of the first ratio that broke the tolerance, -1 if none did.
  sensitive: the task with the largest relative rise there (None if none).
  ratio: the ratio the unit keeps for the top-k filter (0: left whole).
  pruned: channels the greedy network lost at this unit.
  loss_total: summed task losses at `ratio` (the top-k filter's loss rise is
    loss_total - base_total).
  """

  name: str
  size: int
  contribution: float
  counts: tuple[int, ...]
  losses: np.ndarray
  base: np.ndarray
  base_total: float
  delta: float
  fail: int
  sensitive: str | None
  ratio: float
  pruned: int
  loss_total: float


class State(NamedTuple):
  """The greedy scan of one round: the network so far and the schedule.

  masks: the greedy network (hard masks on the traced graph).
  base, base_total: per-task and summed base losses the next unit compares with.
  delta: the next unit's tolerance δ.
  lam: λ of the schedule.
  units: the units in scan order.
  scans: the units scanned so far.
  """

  masks: Masks
  base: np.ndarray
  base_total: float
  delta: float
  lam: float
  units: tuple[Unit, ...]
  scans: tuple[UnitScan, ...]

  @property
  def done(self) -> bool:
    return len(self.scans) == len(self.units)


def init(
  variables: Any,
  graph: ChannelGraph,
  oracle: Oracle,
  masks: Mapping[str, Any] | None = None,
  *,
  groups: Sequence[str] | None = None,
  prefix: str | None = "encoder.",
  config: Config = Config(),
) -> State:
  """Units in scan order, λ, and the base losses of the network under `masks`.

  Raises:
    ValueError: bad settings, no unit, a target below one channel per unit, or
      a task whose base loss is not positive (relative tolerance undefined).
  """
  check_config(config)
  m = hard_masks(graph, masks)
  units = shared_units(variables, graph, m, groups=groups, prefix=prefix, config=config)
  check_target(graph, m, units, config)
  lam = tolerance_decay(config.delta0, len(units), config.total)
  base = oracle.evaluate(variables, m, units[0].name, m[units[0].name][None])[0]
  if not np.all(np.isfinite(base) & (base > 0)):
    raise ValueError(
      f"base losses {dict(zip(oracle.tasks, base))} must be finite and > 0: PAGCP "
      "compares each task's loss with its base loss relatively"
    )
  return State(m, base, float(base.sum()), float(config.delta0), lam, scan_order(units, lam), ())


def first_break(losses: np.ndarray, base: np.ndarray, delta: float) -> tuple[int, int]:
  """(index of the first candidate where max_t L_t / base_t > 1 + δ, its argmax
  task), or (-1, -1). Rows of NaN (not evaluated) never break.

  >>> first_break(np.array([[1.0, 1.0], [1.02, 1.2], [2.0, 2.0]]), np.ones(2), 0.1)
  (1, 1)
  """
  rel = np.asarray(losses, np.float64) / np.asarray(base, np.float64)
  broken = np.nan_to_num(rel, nan=0.0).max(axis=1) > 1.0 + delta
  if not broken.any():
    return -1, -1
  i = int(np.argmax(broken))
  return i, int(np.argmax(rel[i]))


def update(state: State, variables: Any, graph: ChannelGraph, oracle: Oracle, config: Config = Config()) -> State:
  """Scans the next unit: evaluates its candidate ratios on the greedy network
  and prunes it at the last ratio before the tolerance breaks."""
  if state.done:
    raise ValueError("every unit of this round is scanned; start a new round with init()")
  unit = state.units[len(state.scans)]
  scores = filter_scores(variables, graph, state.masks, norm=config.criterion)
  live = int(state.masks[unit.name].sum())
  counts = tuple(prune_count(r, live) for r in config.ratios)
  # Ratios that prune as many channels give the same network: evaluated once
  # (the official code re-evaluates them; the decisions are the same).
  distinct, row = np.unique(counts, return_inverse=True)
  candidates = np.stack([remove_lowest(state.masks, unit.name, scores, c)[unit.name] for c in distinct])
  if config.batched:
    losses = oracle.evaluate(variables, state.masks, unit.name, candidates)[row]
  else:
    losses = np.full((len(counts), len(oracle.tasks)), np.nan)
    for i, k in enumerate(row):
      same = np.nonzero(row[:i] == k)[0]
      losses[i] = (
        losses[same[0]] if same.size else oracle.evaluate(variables, state.masks, unit.name, candidates[k : k + 1])[0]
      )
      if first_break(losses[i : i + 1], state.base, state.delta)[0] == 0:
        break
  fail, task = first_break(losses, state.base, state.delta)
  last = len(counts) - 1
  if fail == -1:  # no ratio broke the tolerance
    accepted = last - 1 if config.official_quirks and last >= 1 else last
    prune_greedy = not config.official_quirks
  else:
    accepted, prune_greedy = fail - 1, fail >= 1
  prune_greedy = prune_greedy and counts[accepted] > 0
  masks, base, base_total, delta = state.masks, state.base, state.base_total, state.delta
  if prune_greedy:
    masks = {**masks, unit.name: candidates[row[accepted]]}
    base = np.maximum(base, losses[accepted])
    base_total = max(base_total, float(losses[accepted].sum()))
    delta = delta * state.lam
  ratio = float(config.ratios[accepted]) if accepted >= 0 and counts[accepted] > 0 else 0.0
  scan = UnitScan(
    unit.name,
    live,
    unit.contribution,
    counts,
    losses,
    state.base,
    state.base_total,
    state.delta,
    fail,
    oracle.tasks[task] if fail >= 0 else None,
    ratio,
    counts[accepted] if prune_greedy else 0,
    float(losses[accepted].sum()) if ratio > 0 else state.base_total,
  )
  return state._replace(masks=masks, base=base, base_total=base_total, delta=delta, scans=state.scans + (scan,))


# --------------------------------------------------------------------------- top-k, re-application


def topk_ratios(
  state: State, variables: Any, graph: ChannelGraph, masks: Mapping[str, Any], config: Config = Config()
) -> dict[str, float]:
  """The official `get_ratio`: the int(L topk) pruned units with the smallest
  loss rise per cost removed keep their ratio, in scan order.

  The cost each unit removes is measured by applying the pruned units' ratios
  in scan order from `masks` (the round's start), scores recomputed each time.
  """
  m = hard_masks(graph, masks)
  pruned = [s for s in state.scans if s.ratio > 0]
  value = {}
  for s in pruned:
    before = cost_of(graph, m, config.unit, config.mode)
    scores = filter_scores(variables, graph, m, norm=config.criterion)
    m = remove_lowest(m, s.name, scores, prune_count(s.ratio, int(m[s.name].sum())))
    removed = before - cost_of(graph, m, config.unit, config.mode)
    value[s.name] = (s.loss_total - s.base_total) / (removed + 1e-20)
  keep = set(sorted(value, key=value.__getitem__)[: int(len(state.units) * config.topk)])
  return {s.name: s.ratio for s in pruned if s.name in keep}


def apply_ratios(
  variables: Any, graph: ChannelGraph, masks: Mapping[str, Any], ratios: Mapping[str, float], config: Config = Config()
) -> tuple[Masks, bool]:
  """Prunes each unit at its ratio, in order, scores recomputed on the current
  network; returns the masks and whether the cost target is met.

  With a target, pruning stops as soon as the cost is at most the target: the
  unit that crosses it loses only as many channels as needed, so one channel
  fewer would miss it.
  """
  m = hard_masks(graph, masks)

  def reached(mm: Masks) -> bool:
    return config.target is not None and cost_of(graph, mm, config.target_unit, config.mode) <= config.target * (
      1 + 1e-9
    )

  if reached(m):
    return m, True
  for name, r in ratios.items():
    scores = filter_scores(variables, graph, m, norm=config.criterion)
    count = prune_count(r, int(m[name].sum()))
    if reached(remove_lowest(m, name, scores, count)):
      lo, hi = 0, count  # smallest count that meets the target: bisection
      while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(remove_lowest(m, name, scores, mid)) else (mid, hi)
      return remove_lowest(m, name, scores, hi), True
    m = remove_lowest(m, name, scores, count)
  return m, config.target is None


# --------------------------------------------------------------------------- rounds


class Round(NamedTuple):
  """One round: the greedy scan, the ratios kept by the top-k filter, the masks
  after re-applying them, and the cost left (fraction of the dense `target_unit`)."""

  state: State
  ratios: dict[str, float]
  masks: Masks
  cost: float


class Result(NamedTuple):
  """masks: final hard masks on the traced graph (slim with them);
  variables: after the last finetune; reached: whether the target is met (None
  without a target)."""

  masks: Masks
  variables: Any
  rounds: tuple[Round, ...]
  reached: bool | None


Finetune = Callable[[Any, Masks, int], Any]


def prune_round(
  variables: Any,
  graph: ChannelGraph,
  oracle: Oracle,
  masks: Mapping[str, Any] | None = None,
  *,
  groups: Sequence[str] | None = None,
  prefix: str | None = "encoder.",
  config: Config = Config(),
  on_unit: Callable[[UnitScan], None] | None = None,
) -> tuple[Round, bool]:
  """Greedy scan of every unit, top-k filter, re-application (one round, no finetune)."""
  start = hard_masks(graph, masks)
  state = init(variables, graph, oracle, start, groups=groups, prefix=prefix, config=config)
  while not state.done:
    state = update(state, variables, graph, oracle, config)
    if on_unit is not None:
      on_unit(state.scans[-1])
  ratios = topk_ratios(state, variables, graph, start, config)
  out, reached = apply_ratios(variables, graph, start, ratios, config)
  return Round(state, ratios, out, cost_of(graph, out, config.target_unit, config.mode)), reached


def prune(
  variables: Any,
  graph: ChannelGraph,
  oracle: Oracle,
  *,
  rounds: int = 1,
  finetune: Finetune | None = None,
  masks: Mapping[str, Any] | None = None,
  groups: Sequence[str] | None = None,
  prefix: str | None = "encoder.",
  config: Config = Config(),
  on_unit: Callable[[UnitScan], None] | None = None,
) -> Result:
  """Rounds of PAGCP, each followed by `finetune(variables, masks, round)`.

  `finetune` trains the network under the round's masks (e.g. through
  `jaxprune.masked`) and returns its variables; the next round scores and
  evaluates those. Tolerance-driven: `rounds` rounds. With `config.target`:
  at most `rounds`, stopping when the target is met. Without `finetune`, a
  round that removes nothing ends the run (the next would repeat it).

  Example:
    >>> oracle = pagcp.make_oracle(fn, graph, pagcp.cross_entropy_losses(("left", "right")),
    ...                            {"image": x_val, "label": y_val})
    >>> result = pagcp.prune(variables, graph, oracle, rounds=2, finetune=finetune,
    ...                      config=pagcp.Config(target=0.5))
    >>> result.reached, result.rounds[-1].cost <= 0.5
    (True, True)
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  check_config(config)
  current = hard_masks(graph, masks)
  done: list[Round] = []
  reached = False
  for r in range(rounds):
    result, reached = prune_round(
      variables, graph, oracle, current, groups=groups, prefix=prefix, config=config, on_unit=on_unit
    )
    done.append(result)
    stalled = all(np.array_equal(result.masks[k], current[k]) for k in current)
    current = result.masks
    if finetune is not None:
      variables = finetune(variables, current, r)
    if (config.target is not None and reached) or (stalled and finetune is None):
      break  # met, or the same network would be scanned again to the same end
  return Result(current, variables, tuple(done), reached if config.target is not None else None)


__all__ = [
  "Config",
  "Masks",
  "NORMS",
  "Oracle",
  "RATIOS",
  "Result",
  "Round",
  "State",
  "Unit",
  "UnitScan",
  "apply_ratios",
  "check_config",
  "check_target",
  "cost_of",
  "cross_entropy_losses",
  "filter_scores",
  "first_break",
  "hard_masks",
  "init",
  "make_oracle",
  "prune",
  "prune_count",
  "prune_round",
  "remove_lowest",
  "scan_order",
  "shared_units",
  "tolerance_decay",
  "topk_ratios",
  "update",
]
