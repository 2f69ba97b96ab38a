"""EPI: when to prune, from the stability of the dominant sub-network.

"When to Prune? A Policy towards Early Structural Pruning" (Shen, Molchanov,
Yin, Alvarez, CVPR 2022). Train dense from scratch; after every epoch k rank
all channels with a criterion and take the *dominant sub-network* A_k: per
channel group, the number of channels a global selection at prune ratio p
would keep now. When these architectures stop changing,

    Psi(A_i, A_j) = 1 - mean_l |a_i^l - a_j^l| / (a_i^l + a_j^l)
    EPI_k = mean_{j=1..r} Psi(A_k, A_{k-j}),

prune once (EPI_k >= tau and EPI_k not below any of its last `window`
values), slim, slice the optimizer state, and keep training the small network
on the rest of the same lr schedule. No official code exists; every choice
the paper does not pin down is a field of `Config` (see docs/epi.md).

Criteria: magnitude (the L2 norm of each channel's filters, normalised per
group so layers compare) or first-order Taylor on BatchNorm parameters,
|sum_bn gamma dL/dgamma + beta dL/dbeta| over a coupled group, averaged over
the epoch's steps from the gradients the train step already has
(`taylor_accumulate`, or `taylor_transform` chained in front of the optimizer).

Example:
  >>> spec = epi.channel_leaves(graph)                          # once per graph
  >>> cfg = epi.Config(criterion="magnitude", prune_ratio=0.5, unit="macs")
  >>> tracker = epi.init([g.size for g in graph.groups], capacity=epochs + 1)
  >>> for epoch in range(epochs + 1):                           # record 0: at init
  ...   # epoch > 0: train one epoch here, then score the new variables
  ...   scores = epi.scores(cfg, spec, graph, variables)
  ...   sub = epi.dominant(scores, graph, cfg)
  ...   tracker, fire = epi.update(tracker, sub.counts, sub.flat, cfg)
  ...   if fire:  # prune now: state = epi.slim_state(state, graph, sub.masks)
  ...     break
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import criteria, select
from jaxprune.graph import ChannelGraph
from jaxprune.methods.epi_compute import (
  TRAIN_MACS_PER_FORWARD,
  Compute,
  compare_compute,
  train_macs_per_sample,
  training_macs,
)
from jaxprune.methods.epi_scores import (
  ChannelLeaves,
  TaylorState,
  channel_leaves,
  find_taylor,
  magnitude_rms,
  replace_taylor,
  taylor_accumulate,
  taylor_init,
  taylor_scores,
  taylor_step,
  taylor_transform,
)

Pytree = Any

# tau from the paper's stability figure (ResNet-34/50, ImageNet, 90 epochs).
TAU = {"magnitude": 0.983, "taylor": 0.944}
CRITERIA = ("magnitude", "taylor")
SCORE_NORMS = ("rms", "group_mean", "raw")
DISTANCE_NORMS = ("sum", "max", "width")
INDICATORS = ("epi", "early_bird")


@dataclasses.dataclass(frozen=True)
class Config:
  """EPI's settings; fields marked [unverified] are the paper's open choices.

  criterion: "magnitude" or "taylor".
  prune_ratio: p, the fraction of `unit` removed (paper: of neurons).
  unit: a `jaxprune.cost` unit the selection budgets ("channels" = the
    paper's neuron count; "macs" for a compute target).
  min_keep: channels every group keeps [unverified; the usual safeguard].
  score_norm: how scores compare across groups [unverified]. None: the
    criterion's default. "group_mean" (magnitude's default): the core's
    L2 criterion (`criteria.l2`), each group divided by its mean before the
    global ranking (`global_topk(normalize=True)`); "rms": L2 of a channel's
    output filters / sqrt(their number of weights), ranked raw (the paper's
    Eq. (2) as cited; at He/LeCun init the RMS falls as 1/sqrt(fan), so it
    empties the widest layers, see docs/epi.md); "raw": scores as they are
    (taylor's default, as in HALP).
  distance_norm: normaliser of |a_i - a_j| in Psi [unverified]: "sum"
    (a_i + a_j), "max" (max(a_i, a_j)) or "width" (the group's size).
  r: previous sub-networks EPI averages over [unverified; figure: ~5].
  window: the trigger's "not lower than the last `window` EPI values".
  strict: `>` instead of `>=` in both trigger comparisons [unverified].
  full_window: the trigger waits until all `window` previous EPI values
    exist (else at least one) [unverified].
  tau: the trigger threshold; None: `TAU[criterion]` (ImageNet schedule;
    recalibrate for others with `calibrate_tau`).
  indicator: "epi", or "early_bird" (You et al. 2020: the normalised Hamming
    distance of the current mask to each of the last `eb_keep - 1` masks
    is at most `eb_eps`).
  """

  criterion: str = "magnitude"
  prune_ratio: float = 0.5
  unit: str = "channels"
  min_keep: int = 1
  score_norm: str | None = None
  distance_norm: str = "sum"
  r: int = 5
  window: int = 5
  strict: bool = False
  full_window: bool = True
  tau: float | None = None
  indicator: str = "epi"
  eb_keep: int = 5
  eb_eps: float = 0.1

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ValueError(f"epi.Config: {msg}")

    check(self.criterion in CRITERIA, f"criterion {self.criterion!r}; choose one of {CRITERIA}")
    check(
      0.0 <= self.prune_ratio < 1.0,
      f"prune_ratio is the fraction removed and must lie in [0, 1), got {self.prune_ratio!r}",
    )
    check(self.unit in jaxprune.UNITS, f"unit {self.unit!r}; choose one of {jaxprune.UNITS}")
    check(
      self.score_norm is None or self.score_norm in SCORE_NORMS,
      f"score_norm {self.score_norm!r}; choose one of {SCORE_NORMS} or None",
    )
    check(
      not (self.criterion == "taylor" and self.score_norm == "rms"),
      "score_norm 'rms' is a magnitude normalisation; use 'raw' or 'group_mean' for taylor",
    )
    check(self.distance_norm in DISTANCE_NORMS, f"distance_norm {self.distance_norm!r}; choose one of {DISTANCE_NORMS}")
    check(self.indicator in INDICATORS, f"indicator {self.indicator!r}; choose one of {INDICATORS}")
    for name in ("min_keep", "r", "window"):
      check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    check(self.eb_keep >= 2, f"eb_keep must be >= 2 (it compares masks), got {self.eb_keep}")

  @property
  def threshold(self) -> float:
    return TAU[self.criterion] if self.tau is None else float(self.tau)

  @property
  def norm(self) -> str:
    if self.score_norm is not None:
      return self.score_norm
    return "group_mean" if self.criterion == "magnitude" else "raw"


def scores(
  config: Config,
  spec: ChannelLeaves,
  graph: ChannelGraph,
  variables: Mapping,
  taylor: TaylorState | None = None,
  *,
  collection: str | None = "params",
) -> dict[str, jax.Array]:
  """The configured criterion's channel scores (`taylor`: this epoch's accumulator)."""
  if config.criterion == "taylor":
    if taylor is None:
      raise ValueError("criterion 'taylor' scores from the epoch's TaylorState; pass taylor=")
    return taylor_scores(taylor, spec)
  if config.norm == "group_mean":
    return criteria.l2(variables, graph)
  return magnitude_rms(spec, variables[collection] if collection else variables)


class Subnetwork(NamedTuple):
  """The dominant sub-network: kept channels per group (graph order) and its masks."""

  counts: np.ndarray
  masks: dict[str, jax.Array]
  flat: np.ndarray


def dominant(scores: Mapping[str, jax.Array], graph: ChannelGraph, config: Config) -> Subnetwork:
  """What the core's global selection keeps at ratio p now (host side, once per epoch).

  >>> cfg = epi.Config(prune_ratio=0.5)
  >>> sub = epi.dominant(epi.scores(cfg, epi.channel_leaves(graph), graph, variables), graph, cfg)
  >>> sub.counts.shape == (len(graph.groups),)   # kept channels per group
  True
  """
  masks = select.global_topk(
    scores,
    graph,
    budget=1.0 - config.prune_ratio,
    unit=config.unit,
    min_channels=config.min_keep,
    normalize=config.norm == "group_mean",
  )
  flat = np.concatenate([np.asarray(masks[g.name]) for g in graph.groups]) > 0
  counts = np.array([int(np.asarray(masks[g.name]).sum()) for g in graph.groups], np.int32)
  return Subnetwork(counts, masks, flat)


# ---------------------------------------------------------------------------
# Similarity, indicators and the trigger (pure jnp; jit-able).


def psi(a: jax.Array, b: jax.Array, norm: str = "sum", widths: jax.Array | None = None) -> jax.Array:
  """Structural similarity of two architectures given as kept counts per group.

  1 - mean_l |a_l - b_l| / n_l with n_l = a_l + b_l ("sum"), max(a_l, b_l)
  ("max") or the group width ("width"); a term whose normaliser is 0 is 0.
  Leading axes broadcast.

  >>> float(epi.psi(jnp.array([4, 2]), jnp.array([2, 2])))   # 1 - (2/6 + 0) / 2
  0.8333...
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if norm == "sum":
    n = a + b
  elif norm == "max":
    n = jnp.maximum(a, b)
  elif norm == "width":
    if widths is None:
      raise ValueError("distance_norm 'width' needs the group widths")
    n = jnp.broadcast_to(jnp.asarray(widths, jnp.float32), a.shape)
  else:
    raise ValueError(f"norm {norm!r}; choose one of {DISTANCE_NORMS}")
  d = jnp.where(n > 0, jnp.abs(a - b) / jnp.where(n > 0, n, 1.0), 0.0)
  return 1.0 - d.mean(-1)


def _shifted(x: jax.Array, lags: int, fill) -> jax.Array:
  """[lags, T]: row j-1 holds x[t - j] (fill where t - j < 0)."""
  t = jnp.arange(x.shape[0])
  rows = [
    jnp.where((t - j >= 0).reshape((-1,) + (1,) * (x.ndim - 1)), jnp.roll(x, j, 0), fill) for j in range(1, lags + 1)
  ]
  return jnp.stack(rows)


def epi_series(counts: jax.Array, r: int = 5, norm: str = "sum", widths: jax.Array | None = None) -> jax.Array:
  """EPI_t = mean_{j=1..r} Psi(A_t, A_{t-j}) for a history [T, groups]; NaN for t < r."""
  counts = jnp.asarray(counts, jnp.float32)
  prev = _shifted(counts, r, 0.0)  # [r, T, L]
  sims = psi(counts[None], prev, norm, widths)  # [r, T]
  return jnp.where(jnp.arange(counts.shape[0]) >= r, sims.mean(0), jnp.nan)


def hamming_series(masks: jax.Array, keep: int = 5) -> jax.Array:
  """Early-Bird distance: max over j < keep of the fraction of mask entries that
  differ between records t and t - j; NaN for t < keep - 1."""
  masks = jnp.asarray(masks, bool)
  prev = _shifted(masks, keep - 1, False)  # [keep-1, T, N]
  dist = (prev != masks[None]).mean(-1).max(0)
  return jnp.where(jnp.arange(masks.shape[0]) >= keep - 1, dist, jnp.nan)


def epi_triggers(
  epi: jax.Array, tau: float, window: int = 5, *, strict: bool = False, full_window: bool = True
) -> jax.Array:
  """bool[T]: EPI_t >= tau and EPI_t >= each of EPI_{t-1..t-window} (`>` if strict).

  Undefined (NaN) values never trigger; `full_window` needs all `window`
  previous values defined, otherwise at least one.
  """
  epi = jnp.asarray(epi, jnp.float32)
  prev = _shifted(epi, window, jnp.nan)
  defined = ~jnp.isnan(prev)
  ge = epi[None] > prev if strict else epi[None] >= prev
  ok = jnp.all(jnp.where(defined, ge, not full_window), 0) & defined.any(0)
  above = epi > tau if strict else epi >= tau
  return above & ok & ~jnp.isnan(epi)


def first(triggers) -> int:
  """The index of the first True, or -1."""
  t = np.asarray(triggers, bool)
  return int(np.argmax(t)) if t.any() else -1


# ---------------------------------------------------------------------------
# The per-epoch tracker: (init, update), plain arrays, checkpointable.


UNSET = -1.0  # a tracker value not defined (yet): EPI and Early-Bird distances are >= 0


def _unset_to_nan(x: jax.Array) -> jax.Array:
  return jnp.where(x < 0, jnp.nan, x)


class State(NamedTuple):
  """Records of the dominant sub-network, one row per `update` (capacity rows).

  counts: int32[capacity, groups] A_k; masks: bool[capacity, channels] its
  flat masks; epi / eb: float32[capacity] EPI and the Early-Bird distance
  (`UNSET` where undefined or unwritten: both are >= 0 when defined, and a
  finite state passes the trainer's non-finite guard; `history` gives NaN
  there); widths: int32[groups]; size: records
  written; fired: the record the trigger fired at (-1: not yet);
  first_epoch: the epoch of record 0 (0 when recording from initialisation).
  """

  counts: jax.Array
  masks: jax.Array
  epi: jax.Array
  eb: jax.Array
  widths: jax.Array
  size: jax.Array
  fired: jax.Array
  first_epoch: jax.Array


def init(widths: Sequence[int], capacity: int, first_epoch: int = 0) -> State:
  """An empty tracker for groups of `widths` and up to `capacity` records.

  >>> tracker = epi.init([g.size for g in graph.groups], capacity=epochs + 1)
  """
  widths = np.asarray(widths, np.int32)
  if widths.ndim != 1 or capacity < 1:
    raise ValueError("init takes a 1-D sequence of group widths and a capacity >= 1")
  # Separate buffers: a train step that donates its state must not see one twice.
  unset = lambda: jnp.full((capacity,), UNSET, jnp.float32)
  return State(
    jnp.zeros((capacity, widths.size), jnp.int32),
    jnp.zeros((capacity, int(widths.sum())), bool),
    unset(),
    unset(),
    jnp.asarray(widths),
    jnp.zeros((), jnp.int32),
    jnp.full((), -1, jnp.int32),
    jnp.asarray(first_epoch, jnp.int32),
  )


def update(state: State, counts: jax.Array, mask: jax.Array, config: Config) -> tuple[State, jax.Array]:
  """Record one sub-network; returns the new state and whether to prune now.

  `fire` is True only at the first record that meets the configured
  indicator's rule. Jit-able with `config` static:
  `jax.jit(epi.update, static_argnames="config")`.
  """
  capacity = state.counts.shape[0]
  if not isinstance(state.size, jax.core.Tracer) and int(state.size) >= capacity:
    raise ValueError(
      f"the tracker is full ({capacity} records); init it with a capacity of "
      "at least the number of epochs recorded (epochs + 1 from initialisation)"
    )
  counts = jnp.asarray(counts, jnp.int32)
  mask = jnp.asarray(mask) > 0
  if counts.shape != state.counts.shape[1:] or mask.shape != state.masks.shape[1:]:
    raise ValueError(
      f"counts {counts.shape} / mask {mask.shape} do not match the tracker's "
      f"{state.counts.shape[1:]} / {state.masks.shape[1:]}"
    )
  k = state.size
  hist = state.counts.at[k].set(counts)
  masks = state.masks.at[k].set(mask)
  epi_k = epi_series(hist, config.r, config.distance_norm, state.widths)[k]
  eb_k = hamming_series(masks, config.eb_keep)[k]
  epi = state.epi.at[k].set(jnp.nan_to_num(epi_k, nan=UNSET))
  eb = state.eb.at[k].set(jnp.nan_to_num(eb_k, nan=UNSET))
  if config.indicator == "epi":
    hit = epi_triggers(
      _unset_to_nan(epi), config.threshold, config.window, strict=config.strict, full_window=config.full_window
    )[k]
  else:
    hit = ~jnp.isnan(eb_k) & (eb_k <= config.eb_eps)
  fire = hit & (state.fired < 0)
  new = State(hist, masks, epi, eb, state.widths, k + 1, jnp.where(fire, k, state.fired), state.first_epoch)
  return new, fire


def fire_epoch(state: State) -> int | None:
  """The epoch the trigger fired at, or None."""
  f = int(state.fired)
  return None if f < 0 else int(state.first_epoch) + f


def last_masks(state: State, graph: ChannelGraph) -> dict[str, jax.Array]:
  """The group masks of the tracker's last record (the dominant sub-network of the
  epoch just ended), by group name.

  Example:
    >>> cfg = epi.Config(prune_ratio=0.5)
    >>> sub = epi.dominant(epi.scores(cfg, epi.channel_leaves(graph), graph, variables), graph, cfg)
    >>> track = epi.init([g.size for g in graph.groups], capacity=2)
    >>> track, fire = epi.update(track, sub.counts, sub.flat, cfg)
    >>> masks = epi.last_masks(track, graph)        # then jaxprune.slim(v, graph, masks)
    >>> sorted(masks) == sorted(g.name for g in graph.groups)
    True
  """
  if int(state.size) == 0:
    raise ValueError("the tracker has no record yet: call epi.update after an epoch first")
  flat = np.asarray(state.masks[int(state.size) - 1], np.float32)
  out, o = {}, 0
  for g in graph.groups:
    out[g.name] = jnp.asarray(flat[o : o + g.size])
    o += g.size
  return out


def history(state: State) -> dict[str, np.ndarray]:
  """The written records as numpy: epoch, counts, epi, eb (NaN where undefined)."""
  n = int(state.size)
  return {
    "epoch": int(state.first_epoch) + np.arange(n),
    "counts": np.asarray(state.counts[:n]),
    "epi": np.asarray(_unset_to_nan(state.epi[:n])),
    "eb": np.asarray(_unset_to_nan(state.eb[:n])),
  }


class Calibration(NamedTuple):
  """tau from an oracle sweep: any tau in (low, high] fires at `fire_epoch`."""

  tau: float
  low: float
  high: float
  target_epoch: int
  fire_epoch: int


def calibrate_tau(
  epi: Sequence[float],
  sweep_epochs: Sequence[int],
  sweep_accuracy: Sequence[float],
  *,
  tolerance: float,
  config: Config = Config(),
  first_epoch: int = 0,
) -> Calibration:
  """tau for a new schedule, from its EPI curve and an oracle prune-epoch sweep.

  `epi[i]` is EPI at epoch `first_epoch + i` of a dense run; the sweep pruned
  at `sweep_epochs` and reached `sweep_accuracy` (same units as `tolerance`).
  The target is the earliest sweep epoch within `tolerance` of the best;
  tau is chosen so the trigger (the config's window and strictness) fires at
  the first plateau epoch at or after it: the midpoint of the interval of
  such taus, or its top when nothing fires earlier at any tau.

  >>> curve = [0.2, 0.6, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.99]   # EPI at epochs 0..8
  >>> cal = epi.calibrate_tau(curve, [0, 2, 4, 8], [0.61, 0.66, 0.70, 0.70], tolerance=0.005)
  >>> cal.target_epoch, cal.fire_epoch
  (4, 5)
  """
  epi = np.asarray(epi, np.float64)
  acc = np.asarray(sweep_accuracy, np.float64)
  ep = np.asarray(sweep_epochs)
  if acc.shape != ep.shape or acc.size == 0:
    raise ValueError("sweep_epochs and sweep_accuracy must be non-empty and of equal length")
  target = int(ep[acc >= acc.max() - tolerance].min())
  epochs = first_epoch + np.arange(epi.size)
  plateau = np.asarray(epi_triggers(epi, -np.inf, config.window, strict=config.strict, full_window=config.full_window))
  before = epi[plateau & (epochs < target)]
  low = float(before.max()) if before.size else -np.inf
  after = np.nonzero(plateau & (epochs >= target) & (epi > low))[0]
  if after.size == 0:
    raise ValueError(
      f"the EPI curve has no plateau at or after epoch {target} above the "
      f"earlier plateaus ({low:.4f}); record more epochs or shorten the window"
    )
  k = int(after[0])
  high = float(epi[k])
  if np.isfinite(low):
    tau = (low + high) / 2
  else:
    tau = float(np.nextafter(high, -np.inf)) if config.strict else high
  return Calibration(tau, low, high, target, int(epochs[k]))


# ---------------------------------------------------------------------------
# Pruning mid-training: slim the params and the optimizer state together.


def slim_opt_state(
  opt_state: Pytree,
  variables: Mapping,
  graph: ChannelGraph,
  masks: Mapping[str, jax.Array],
  *,
  collection: str = "params",
) -> Pytree:
  """The optimizer state with the pruned channels removed, like the params.

  Every leaf whose key path ends with a params leaf's path and has its shape
  (momentum, Adam moments, ...) is sliced by `jaxprune.slim`, by slimming
  the variables with that leaf in place of the param: kept channels keep
  their values exactly. Other leaves (step counts, a TaylorState) are left
  alone. Host side, once per prune.

  >>> opt_state = optax.sgd(0.1, momentum=0.9).init(variables["params"])
  >>> small_opt_state = epi.slim_opt_state(opt_state, variables, graph, masks)
  >>> jax.tree.map(jnp.shape, small_opt_state[0].trace) == jax.tree.map(jnp.shape, small["params"])
  True
  """
  params = variables[collection]
  p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
  by_path = {tuple(path): (i, np.shape(x)) for i, (path, x) in enumerate(p_paths)}
  p_leaves = [x for _, x in p_paths]
  o_paths, o_def = jax.tree_util.tree_flatten_with_path(opt_state)
  found: dict[tuple, dict[int, int]] = {}  # prefix -> {params leaf: opt leaf}
  for j, (path, x) in enumerate(o_paths):
    path = tuple(path)
    for n in range(len(path)):  # longest suffix first
      hit = by_path.get(path[n:])
      if hit is not None and np.shape(x) == hit[1]:
        found.setdefault(path[:n], {})[hit[0]] = j
        break
  out = [x for _, x in o_paths]
  for where in found.values():
    leaves = list(p_leaves)
    for i, j in where.items():
      leaves[i] = out[j]
    stand_in = {**variables, collection: jax.tree_util.tree_unflatten(p_def, leaves)}
    small = jax.tree_util.tree_leaves(jaxprune.slim(stand_in, graph, masks)[collection])
    for i, j in where.items():
      out[j] = small[i]
  return jax.tree_util.tree_unflatten(o_def, out)


def slim_state(state: Any, graph: ChannelGraph, masks: Mapping[str, jax.Array]) -> Any:
  """A train state (fields params, batch_stats, other, opt_state) with the
  masked channels removed from the model and from the optimizer state.

  The step count and the optimizer's schedule counters are kept, so training
  continues on the same lr schedule. Rebuild the model from the new
  variables with `jaxprune.module` and re-jit the step. Drop a
  `taylor_transform` stage first (`opt_state[1]` of its chain): its
  accumulator is sized for the dense network.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats, "other": state.other}
  small = jaxprune.slim(variables, graph, masks)
  opt_state = slim_opt_state(state.opt_state, variables, graph, masks)
  return state._replace(
    params=small["params"], batch_stats=small["batch_stats"], other=small["other"], opt_state=opt_state
  )


__all__ = [
  "CRITERIA",
  "Calibration",
  "ChannelLeaves",
  "Compute",
  "Config",
  "State",
  "Subnetwork",
  "TAU",
  "TRAIN_MACS_PER_FORWARD",
  "TaylorState",
  "UNSET",
  "calibrate_tau",
  "channel_leaves",
  "compare_compute",
  "dominant",
  "epi_series",
  "epi_triggers",
  "fire_epoch",
  "find_taylor",
  "first",
  "hamming_series",
  "history",
  "init",
  "last_masks",
  "magnitude_rms",
  "psi",
  "replace_taylor",
  "scores",
  "slim_opt_state",
  "slim_state",
  "taylor_accumulate",
  "taylor_init",
  "taylor_scores",
  "taylor_step",
  "taylor_transform",
  "train_macs_per_sample",
  "training_macs",
  "update",
]
