"""ChipNet: budget-aware pruning with continuous Heaviside masks (Tiwari et al., ICLR 2021).

Every channel group gets a trainable logit ζ. A logistic curve and a
continuous Heaviside projection turn it into a soft mask z in [0, 1]:

  ẑ = σ(β ζ)                               (logistic, steepness β)
  z = H_γ(ẑ) = 1 − exp(−γ ẑ) + ẑ exp(−γ)   (continuous Heaviside, sharpness γ)

The network runs with its channels multiplied by z (through `jaxprune.masked`,
which scales a channel wherever it is consumed: for z >= 0 that equals
ChipNet's multiplication after BatchNorm, before or after the ReLU, since
relu(z·x) = z·relu(x)). Soft pruning minimises

  CE + w_b · (V(z) − V*)² + w_c · mean_channels (H_γ(ẑ) − ẑ)²

where V is the kept fraction of a resource (channels, activation volume,
params or MACs), computed by the core's exact `cost` on soft-rounded masks,
so it is the exact cost ratio at binary masks and residual couplings are
handled by the channel graph, not by a per-architecture `prev` map. β, γ and
the rounding steepness s grow with the optimizer step (see `Schedule`). At
the end (and at every epoch, to pick the best checkpoint) a global threshold
on z turns the masks binary so the network meets the budget; `jaxprune.slim`
then removes the channels.

Units. On a graph traced with `branches=True` (units="branch", the official
code's): ζ for the stem, every block's inner conv, the last BN of every
residual branch and every projection shortcut; residual streams are never
masked (a stream channel lives while any producer reaching it keeps it). On a
channel graph (units="stream"): ζ for every channel group, a residual stream
as one group.

Budgets: the core's exact cost of the soft masks in channels, volume, params
or MACs ("flops"), or "volume_paper", the official definition: the sum over
masked layers of activation area x kept channels over the same with all
channels.

Differences from the official code (PyTorch, transmuteAI/ChipNet), on purpose:
  * The budget is the exact cost of the network as slimmed (a stream channel
    counts for a consumer while any producer that reaches it keeps it), not a
    per-layer approximation against a "previous" layer.
  * Soft rounding is normalised, (σ(s(z−½)) − σ(−s/2)) / (σ(s/2) − σ(−s/2)),
    so it maps 0 → 0 and 1 → 1 exactly for every s (the official σ(s(z−½))
    is off by σ(−s/2) = 0.7% at s = 10, negligible from s = 20).
  * Every group keeps its `min_channels` best channels, in the soft budget
    and in the threshold: no layer and no stage can vanish.
  * The threshold always meets the budget (cost <= budget, within one
    channel's worth), for every budget type; the official one caps the
    threshold at 0.9 and can end above the budget.
  * The schedules advance per optimizer step, in units of the paper's
    full-data epochs, so a small data set gets as many steps as the paper
    before γ saturates.

Example:
  >>> from jaxprune.methods import chipnet
  >>> zeta = chipnet.init(jax.random.key(0), graph)
  >>> hp = chipnet.hparams(step=0)                    # beta=1, gamma=2, s=10
  >>> zhat, z = chipnet.project(zeta, hp.beta, hp.gamma)
  >>> logits = jaxprune.masked(fn, graph)(variables, graph.complete(z), images)   # streams: 1
  >>> loss, parts = chipnet.penalty(graph, zeta, hp, budget=0.5, unit="volume")
  >>> hard = chipnet.threshold(zeta, graph, budget=0.5, unit="volume")
  >>> small = jaxprune.slim(variables, graph, hard)
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import select
from jaxprune.cost import ratio
from jaxprune.graph import ChannelGraph

Masks = dict[str, jax.Array]

# ChipNet's budget types -> units of `jaxprune.cost`. "flops" is the paper's
# name for multiply-accumulates of convs and dense layers.
BUDGET_UNITS = {
  "channels": "channels",
  "volume": "volume",
  "params": "params",
  "flops": "macs",
  "macs": "macs",
  "volume_paper": "volume_paper",
}
UNITS = ("branch", "stream")

W_BUDGET = 30.0  # official defaults (pruning.py / trailmet chipnet.yaml)
W_CRISP = 10.0
ZETA_INIT_HIGH = 0.01
# The paper's steps per epoch: 45,000 CIFAR training images (10% held out), batch 32.
PAPER_STEPS_PER_EPOCH = 45_000 / 32


class Hparams(NamedTuple):
  """The scheduled scalars of one step; pass to a jitted step as an argument
  (traced), so a new value does not recompile."""

  beta: jax.Array  # logistic steepness
  gamma: jax.Array  # Heaviside sharpness
  s: jax.Array  # steepness of the soft rounding in the budget


class Schedule(NamedTuple):
  """Official schedules, as functions of the (fractional) epoch e = step / steps_per_epoch.

  β = min(6, 1 + 0.02 e), γ = min(256, 2 · √2^e), s = min(60, 10 + 5 e).
  The official code steps β and γ once per epoch; here they move every
  optimizer step, with `steps_per_epoch` the paper's (1,406: 45k images at
  batch 32) rather than the data set's, so that on a small data set γ does
  not saturate before the gates separate (it then never prunes).
  """

  steps_per_epoch: float = PAPER_STEPS_PER_EPOCH
  beta0: float = 1.0
  beta_inc: float = 0.02
  beta_max: float = 6.0
  gamma0: float = 2.0
  gamma_rate: float = math.sqrt(2.0)
  gamma_max: float = 256.0
  s0: float = 10.0
  s_inc: float = 5.0
  s_max: float = 60.0


def hparams(step: int | float, schedule: Schedule = Schedule()) -> Hparams:
  """β, γ, s at optimizer step `step` (float32 numpy scalars: computed on the host).

  >>> [round(float(v), 3) for v in hparams(0)]
  [1.0, 2.0, 10.0]
  >>> hparams(14 * PAPER_STEPS_PER_EPOCH).gamma   # 2 * 2**7, the cap
  np.float32(256.0)
  """
  e = float(step) / float(schedule.steps_per_epoch)
  beta = min(schedule.beta_max, schedule.beta0 + schedule.beta_inc * e)
  # In log space: gamma_rate ** e overflows for long runs.
  gamma = math.exp(min(math.log(schedule.gamma_max), math.log(schedule.gamma0) + e * math.log(schedule.gamma_rate)))
  s = min(schedule.s_max, schedule.s0 + schedule.s_inc * e)
  return Hparams(np.float32(beta), np.float32(gamma), np.float32(s))


# ------------------------------------------------------------- pure functions


def unit_groups(graph: ChannelGraph, units: str | None = None) -> list[str]:
  """The groups ChipNet masks: all but the residual streams on a branch graph
  (units="branch", the official units), every group on a channel graph
  ("stream"). By default the units follow the graph.

  >>> unit_groups(graph)[:3]
  ['layer1.0.conv1', 'layer1.1.conv1', 'layer1.2.conv1']
  """
  units = ("branch" if graph.has_branches else "stream") if units is None else units
  if units not in UNITS:
    raise ValueError(f"units must be one of {UNITS}, got {units!r}")
  if (units == "branch") != graph.has_branches:
    raise ValueError(
      f"units={units!r} needs a graph traced with branches={units == 'branch'} (jaxprune.trace(..., branches=...))."
    )
  streams = set(graph.streams()) if units == "branch" else set()
  return [g.name for g in graph.groups if g.name not in streams]


def init(key: jax.Array, graph: ChannelGraph, high: float = ZETA_INIT_HIGH, groups: list[str] | None = None) -> Masks:
  """ζ ~ U(0, high) per channel, one vector per masked group (official init).

  >>> zeta = init(jax.random.key(0), graph)
  >>> zeta["layer1.0.conv1"].shape, len(zeta)
  ((16,), 19)
  """
  groups = unit_groups(graph) if groups is None else groups
  keys = jax.random.split(key, max(len(groups), 1))
  return {n: jax.random.uniform(k, (graph.group(n).size,), jnp.float32, 0.0, high) for n, k in zip(groups, keys)}


def logistic(zeta: jax.Array, beta: jax.Array | float) -> jax.Array:
  """ẑ = σ(β ζ), in (0, 1)."""
  return jax.nn.sigmoid(beta * zeta)


def heaviside(x: jax.Array, gamma: jax.Array | float) -> jax.Array:
  """Continuous Heaviside H_γ(x) = 1 − e^{−γx} + x e^{−γ} on [0, 1].

  H_γ(0) = 0, H_γ(1) = 1, strictly increasing and concave (so H_γ(x) >= x),
  and a step at 0 as γ → ∞. exp(−γ) underflows to 0 for large γ: harmless.

  >>> [round(float(heaviside(x, 2.0)), 3) for x in (0.0, 0.5, 1.0)]
  [0.0, 0.7, 1.0]
  """
  return 1.0 - jnp.exp(-gamma * x) + x * jnp.exp(-gamma)


def project(zeta: Mapping[str, jax.Array], beta, gamma) -> tuple[Masks, Masks]:
  """(ẑ, z) per group: the logistic mask and the projected (soft) mask."""
  zhat = {k: logistic(v, beta) for k, v in zeta.items()}
  return zhat, {k: heaviside(v, gamma) for k, v in zhat.items()}


def crispness(zhat: Mapping[str, jax.Array], gamma) -> jax.Array:
  """Mean over all channels (not per group) of (H_γ(ẑ) − ẑ)²; zero only when every ẑ is 0 or 1."""
  x = jnp.concatenate([jnp.ravel(v) for v in zhat.values()])
  return jnp.mean((heaviside(x, gamma) - x) ** 2)


def soft_round(z: jax.Array, s) -> jax.Array:
  """A smooth step at 0.5 with steepness s that maps 0 → 0 and 1 → 1 exactly.

  The soft "channel is kept" count ChipNet feeds to its budget. Normalised
  so that binary masks count exactly, whatever s.
  """
  lo, hi = jax.nn.sigmoid(-0.5 * s), jax.nn.sigmoid(0.5 * s)
  return (jax.nn.sigmoid(s * (z - 0.5)) - lo) / (hi - lo)


def keep_best(masks: Mapping[str, jax.Array], scores: Mapping[str, jax.Array], min_channels: int = 1) -> Masks:
  """Masks with each group's `min_channels` best channels (by score) set to 1.

  What the threshold keeps anyway, so the soft budget counts it too; no
  gradient flows to those entries.
  """
  out = {}
  for name, m in masks.items():
    k = min(int(min_channels), m.shape[-1])
    if k <= 0:
      out[name] = m
      continue
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores[name]), k)
    best = jnp.zeros(m.shape, bool).at[idx].set(True)
    out[name] = jnp.where(best, jnp.ones_like(m), m)
  return out


def areas(graph: ChannelGraph, groups: tuple[str, ...]) -> dict[str, float]:
  """Activation area (output spatial size) of each group's producing layer."""
  return dict(_areas(graph, tuple(groups)))


@functools.lru_cache(maxsize=32)
def _areas(graph: ChannelGraph, groups: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
  offsets = graph.offsets
  out = []
  for n in groups:
    o, size = offsets[n], graph.group(n).size
    for t in graph.terms:
      if t.kind != "volume":
        continue
      rows = t.factors[0].prod
      if np.isin(np.arange(o, o + size), rows).all():
        out.append((n, float(t.coef)))
        break
    else:
      raise ValueError(f"no layer produces group {n!r}: it has no activation area")
  return tuple(out)


def paper_volume(graph: ChannelGraph, masks: Mapping[str, jax.Array]) -> jax.Array:
  """The official volume budget: sum over the masked groups of activation area x kept
  channels, over the same with every channel kept (linear in the masks).

  >>> float(paper_volume(graph, {n: jnp.ones(graph.group(n).size) for n in unit_groups(graph)}))
  1.0
  """
  a = areas(graph, tuple(masks))
  kept = sum(a[n] * jnp.sum(m) for n, m in masks.items())
  return kept / sum(a[n] * graph.group(n).size for n in masks)


def soft_budget(
  graph: ChannelGraph,
  zeta: Mapping[str, jax.Array],
  hp: Hparams,
  unit: str,
  *,
  min_channels: int = 1,
  mode: str = "exact",
) -> jax.Array:
  """V(z): the kept fraction of `unit`, from soft-rounded masks; differentiable in ζ.

  At binary z this is exactly `jaxprune.ratio` of the mask the threshold
  would keep (every group keeps at least `min_channels`; groups without ζ,
  e.g. residual streams, are kept).
  """
  _, z = project(zeta, hp.beta, hp.gamma)
  counts = keep_best({k: soft_round(v, hp.s) for k, v in z.items()}, zeta, min_channels)
  return budget_ratio(graph, counts, unit, mode=mode)


def budget_ratio(graph: ChannelGraph, masks: Mapping[str, jax.Array], unit: str, *, mode: str = "exact") -> jax.Array:
  """Kept fraction in `unit` of masks for ChipNet's groups: a cost unit, "volume_paper",
  or "channels" (the kept fraction of the masked units' entries, branch masks included)."""
  if unit == "volume_paper":
    return paper_volume(graph, masks)
  if unit == "channels":
    kept = sum(jnp.sum(m) for m in masks.values())
    return kept / sum(graph.group(n).size for n in masks)
  return ratio(graph, graph.complete(masks), unit, mode=mode)


def penalty(
  graph: ChannelGraph,
  zeta: Mapping[str, jax.Array],
  hp: Hparams,
  *,
  budget: float,
  unit: str,
  min_channels: int = 1,
  w_budget: float = W_BUDGET,
  w_crisp: float = W_CRISP,
  mode: str = "exact",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ChipNet's loss terms beside the cross-entropy, and their parts.

  Returns `(w_b · (V − V*)² + w_c · crispness, {"budget_loss", "crispness",
  "soft_budget"})`. Jit-able; `hp` may be traced.

  >>> zeta = init(jax.random.key(0), graph)
  >>> loss, parts = penalty(graph, zeta, hparams(0), budget=0.5, unit="volume")
  """
  v = soft_budget(graph, zeta, hp, unit, min_channels=min_channels, mode=mode)
  zhat, _ = project(zeta, hp.beta, hp.gamma)
  b = (v - budget) ** 2
  c = crispness(zhat, hp.gamma)
  return w_budget * b + w_crisp * c, {"budget_loss": b, "crispness": c, "soft_budget": v}


# --------------------------------------------------------- budgets, threshold


def unit_of(budget_type: str) -> str:
  """The `jaxprune.cost` unit of a ChipNet budget type.

  >>> unit_of("flops")
  'macs'
  """
  if budget_type not in BUDGET_UNITS:
    raise ValueError(f"unknown budget type {budget_type!r}; choose one of {sorted(BUDGET_UNITS)} (flops means MACs)")
  return BUDGET_UNITS[budget_type]


def budget_floor(
  graph: ChannelGraph, unit: str, min_channels: int = 1, mode: str = "exact", groups: list[str] | None = None
) -> float:
  """The smallest budget reachable when every masked group keeps `min_channels`."""
  groups = unit_groups(graph) if groups is None else groups
  masks = {
    n: (np.arange(graph.group(n).size) < min(min_channels, graph.group(n).size)).astype(np.float32) for n in groups
  }
  return float(budget_ratio(graph, masks, unit, mode=mode))


def check_budget(
  graph: ChannelGraph,
  budget: float,
  budget_type: str,
  *,
  min_channels: int = 1,
  mode: str = "exact",
  groups: list[str] | None = None,
) -> str:
  """Validates a budget before any training; returns its cost unit.

  Raises ValueError for a budget outside (0, 1], an unknown budget type,
  `min_channels` < 1, or a budget below what `min_channels` per group allows.

  >>> check_budget(graph, 0.5, "volume")
  'volume'
  """
  unit = unit_of(budget_type)
  select._check_budget(budget)
  if int(min_channels) < 1:
    raise ValueError(f"min_channels must be >= 1 (a group without channels cuts the network), got {min_channels}")
  floor = budget_floor(graph, unit, min_channels, mode, groups)
  if budget < floor * (1 - 1e-6):
    raise ValueError(
      f"budget {budget} of {budget_type} cannot be met: keeping {min_channels} channel(s) "
      f"per group already costs {floor:.4f} of the dense network. Raise the budget or "
      "lower min_channels."
    )
  return unit


def threshold(
  scores: Mapping[str, jax.Array],
  graph: ChannelGraph,
  budget: float,
  unit: str = "volume",
  *,
  min_channels: int = 1,
  mode: str = "exact",
) -> Masks:
  """Hard masks: the globally highest-scoring channels that fit the budget.

  ChipNet's hard pruning: one global threshold on the projected masks z.
  Pass ζ (or ẑ, or z) as `scores`: z is a strictly increasing function of ζ,
  so the ranking is the same, and ζ has no ties where z saturates at 1.0 in
  float32. Channels go lowest score first; bisection finds the largest kept
  set with cost(unit) <= budget x dense cost, so the result is within one
  channel's worth of the budget. Each group keeps its `min_channels` best.

  This is `jaxprune.select.global_topk` without dividing scores by their
  group's mean: ChipNet's masks are on one global scale already. Groups
  without scores (residual streams on branch units) are kept whole.

  >>> zeta = init(jax.random.key(0), graph)
  >>> hard = threshold(zeta, graph, budget=0.25, unit="volume")
  >>> float(jaxprune.ratio(graph, hard, "volume")) <= 0.25
  True
  """
  whole = [g.name for g in graph.groups if g.name not in scores]
  if unit in ("volume_paper", "channels"):
    names, kind = tuple(scores), unit
    unit = lambda m: budget_ratio(graph, {n: m[n] for n in names}, kind)  # noqa: E731
  return select.global_topk(
    scores, graph, budget, unit, min_channels=min_channels, mode=mode, normalize=False, whole=whole
  )


def hard_masks(
  zeta: Mapping[str, jax.Array],
  graph: ChannelGraph,
  *,
  budget: float,
  budget_type: str = "volume",
  min_channels: int = 1,
  mode: str = "exact",
) -> Masks:
  """Binary masks meeting `budget` of `budget_type`, from the learned ζ (see `threshold`)."""
  return threshold(zeta, graph, budget, unit_of(budget_type), min_channels=min_channels, mode=mode)
