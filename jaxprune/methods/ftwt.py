"""FTWT: dynamic per-sample channel gating with self-supervised mask prediction.

"Fire Together Wire Together" (Elkerdawy et al., CVPR 2022). Every gated conv
gets a small predictor: pool the conv's *input* over space, softmax over
channels, one dense layer to one logit per output channel; the channel runs
for this sample iff its logit is > 0. Predictors learn by binary
classification against targets made from the layer's own output: the top
filters (by peak |activation|) whose cumulative share of the mass stays
within r.

Gating is exact and sequential, in one pass, on the core's `jaxprune.gated`:
when the evaluation reaches a gated conv, that group's per-sample mask is
computed from the conv's input as it is at that point, i.e. with every
upstream gate already applied. So layer l's predictor sees layer l's gated
input, as in the paper; later consumers of the group then multiply their input
channels by that mask (equal to the per-sample slimmed network).

Which groups are gated follows the graph: on a channel graph every group its
first producing conv computes; where the core ties channels (a residual
stream: the stem conv and every block's second conv share one group) there is
one mask per stream, decided at its first producer. With branch groups
(`trace(..., branches=True)`) the official units are available: each block's
second conv gated before the residual add, the identity never.

Example:
  >>> fn, v = jaxprune.functional(model)                # any fn(variables, x)
  >>> graph = jaxprune.trace(fn, v, x[:1])
  >>> points = ftwt.gate_points(fn, graph, v, x[:1])
  >>> preds = ftwt.init_predictors(0, points)
  >>> logits, aux = ftwt.gated(fn, graph, points)(v, preds, x)
  >>> loss = ftwt.mask_loss(aux.logits, ftwt.targets(aux.peaks, r=0.9))
  >>> macs = ftwt.per_sample_cost(graph, aux.masks).macs      # shape (batch,)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from jaxprune.graph import ChannelGraph

Pytree = Any


class GatePoint(NamedTuple):
  """A gated conv: group `name` (`size` channels) decided from an input of `c_in` channels."""

  name: str
  c_in: int
  size: int
  feature_axis: int  # of the conv's input
  spatial_axes: tuple[int, ...]


class GateAux(NamedTuple):
  """Per-group (batch, size) arrays from one gated forward pass."""

  logits: dict[str, jax.Array]  # gated groups only
  masks: dict[str, jax.Array]  # every group (ungated ones are all ones)
  peaks: dict[str, jax.Array]  # gated groups: max |activation| over space, pre-mask


def check_r(r: float) -> float:
  """r must lie in (0, 1]."""
  if not isinstance(r, (int, float, np.floating)) or not 0.0 < float(r) <= 1.0:
    raise ValueError(f"FTWT's r is the share of activation mass kept and must lie in (0, 1]; got {r!r}")
  return float(r)


UNITS = ("branch", "stream")
EXCLUDE = r"downsample|shortcut|proj"  # projection shortcuts: not gated in the official code


def gate_points(
  fn: Callable,
  graph: ChannelGraph,
  variables: Pytree,
  *args,
  units: str | None = None,
  exclude: str = EXCLUDE,
  groups: tuple[str, ...] | None = None,
) -> tuple[GatePoint, ...]:
  """The convs that gate, in program order, and the group each one decides.

  units="branch" (the official code's gate points; the graph must be traced
  with `branches=True`): every conv that produces a residual branch gates its
  branch group (a block's last conv before the add, the stem), every other
  conv its channel group (a block's inner convs, every VGG conv); residual
  streams and projection shortcuts (layer names matching `exclude`) are not
  gated. units="stream": every channel group at its first producing conv (a
  residual stream is gated once, at its first producer). `groups` restricts
  to those names. By default the units follow the graph (traced with
  branches=True: "branch"). Raises ValueError if the network has none (e.g. a
  pure MLP).

  Example:
    >>> points = ftwt.gate_points(fn, graph, v, jnp.zeros((1, 32, 32, 3)))
    >>> [(p.name, p.c_in, p.size) for p in points][:2]
    [('conv1:branch', 3, 16), ('layer1.0.conv1', 16, 16)]
  """
  import re

  units = ("branch" if graph.has_branches else "stream") if units is None else units
  if units not in UNITS:
    raise ValueError(f"units must be one of {UNITS}, got {units!r}")
  if units == "branch" and not graph.has_branches:
    raise ValueError(
      "units='branch' needs branch groups: trace the network with "
      "jaxprune.trace(..., branches=True) (or use units='stream')."
    )
  if units == "stream" and graph.has_branches:
    raise ValueError("units='stream' gates channel groups only: trace without branches=True.")
  prods = jaxprune.producers(fn, graph, variables, *args)
  skip = set(graph.streams()) if units == "branch" else set()
  wanted = set(g.name for g in graph.groups) if groups is None else set(groups)
  points = tuple(
    GatePoint(p.name, p.c_in, p.size, p.feature_axis, p.spatial_axes)
    for n, p in prods.items()
    if n in wanted
    and n not in skip
    and p.op == "conv"
    and p.feature_axis != 0
    and not (units == "branch" and exclude and re.search(exclude, p.layer))
  )
  if not points:
    raise ValueError(
      "FTWT found no gate points: no conv layer produces a prunable channel group "
      f"(groups: {[g.name for g in graph.groups]}). It gates conv outputs only."
    )
  return points


def init_predictors(seed: int, points: tuple[GatePoint, ...]) -> dict[str, dict[str, jax.Array]]:
  """`{group: {'kernel': (c_in, size), 'bias': (size,)}}`, PyTorch's default 1x1-conv init.

  Uniform in +-1/sqrt(c_in), as the official code; about half the gates start
  open. Drawn with numpy: dozens of small eager jax.random calls take seconds.

  Example:
    >>> preds = ftwt.init_predictors(0, points)
  """
  rng = np.random.default_rng(seed)
  out = {}
  for p in points:
    bound = 1.0 / np.sqrt(p.c_in)
    out[p.name] = {
      "kernel": jnp.asarray(rng.uniform(-bound, bound, (p.c_in, p.size)), jnp.float32),
      "bias": jnp.asarray(rng.uniform(-bound, bound, (p.size,)), jnp.float32),
    }
  return out


def predict_logits(x: jax.Array, params: Mapping[str, jax.Array], point, *, pool: str = "avg") -> jax.Array:
  """(batch, size) logits from a conv input `x`: pool over space, softmax, dense."""
  if pool == "avg":
    h = jnp.mean(x, axis=point.spatial_axes)
  elif pool == "max":
    h = jnp.max(x, axis=point.spatial_axes)
  else:
    raise ValueError(f"pool must be 'avg' (official code) or 'max' (paper figure), got {pool!r}")
  # After reducing the spatial axes the remaining order is (batch, feature).
  h = jax.nn.softmax(h.astype(jnp.float32), axis=-1)
  return h @ params["kernel"] + params["bias"]


def _peaks(y: jax.Array, axis: int) -> jax.Array:
  """(batch, channels): max |y| over every axis but the batch and channel axes."""
  red = tuple(a for a in range(y.ndim) if a not in (0, axis))
  a = jnp.max(jnp.abs(y), axis=red) if red else jnp.abs(y)
  return a.astype(jnp.float32)


def gated(
  fn: Callable, graph: ChannelGraph, points: tuple[GatePoint, ...], *, pool: str = "avg", mode: str = "decoupled"
) -> Callable:
  """`g(variables, predictors, *args) -> (fn's output, GateAux)` with per-sample gates.

  Each gate's hard mask (logit > 0) is computed from its conv's input with all
  upstream gates applied, and multiplies that group's channels wherever they
  are consumed. Masks carry no gradient (the task loss never reaches the
  predictors). mode="decoupled" stops the gradient at the predictor input, so
  the mask loss trains predictors only; mode="joint" lets it reach the
  upstream backbone. Peaks (the targets' input) are max |activation| of a
  group's channels before its mask, over every place they are used.

  Example:
    >>> out, aux = jax.jit(ftwt.gated(fn, graph, points))(v, preds, x)
    >>> aux.masks["layer1.0.conv1"].shape    # (batch, channels)
    (8, 16)
  """
  if mode not in ("decoupled", "joint"):
    raise ValueError(f"mode must be 'decoupled' or 'joint', got {mode!r}")
  if pool not in ("avg", "max"):
    raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
  if not points:
    raise ValueError(
      "no gate points: call ftwt.gate_points first (a model without convs producing prunable groups cannot be gated)"
    )
  decoupled = mode == "decoupled"

  def gate(inp: jaxprune.GateInput, params):
    x = jax.lax.stop_gradient(inp.x) if decoupled else inp.x
    logits = predict_logits(x, params, inp.producer, pool=pool)
    return jax.lax.stop_gradient((logits > 0).astype(jnp.float32)), logits

  core = jaxprune.gated(fn, graph, gate, [p.name for p in points], observe=_peaks, combine="max")

  def g(variables, predictors, *args):
    missing = [p.name for p in points if p.name not in predictors]
    if missing:
      raise ValueError(f"predictors missing for gates {missing}")
    out, res = core(variables, predictors, *args)
    peaks = {p.name: jax.lax.stop_gradient(res.observed[p.name]) for p in points}
    return out, GateAux(dict(res.aux), dict(res.masks), peaks)

  return g


# ------------------------------------------------------------------ targets ----


def targets(peaks: Mapping[str, jax.Array], r: float, *, eps: float = 1e-5) -> dict[str, jax.Array]:
  """Self-supervised 0/1 targets per group, (batch, size) each.

  Per sample: p = peaks / sum(peaks); sort p descending; keep the filters whose
  cumulative share stays within r (+eps; the filter that crosses r is dropped,
  as in the official code). r = 1 keeps every filter with p > eps (drops dead
  ones only). A sample whose layer output is all zero keeps nothing (every
  filter is dead; the official code would divide by zero).

  Example:
    >>> ftwt.targets({"a": jnp.array([[.3, .1, .3, .2, .1]])}, r=0.95)["a"]
    Array([[1., 1., 1., 1., 0.]], dtype=float32)
  """
  r = check_r(r)

  def one(a):
    a = jnp.asarray(a, jnp.float32)
    total = a.sum(-1, keepdims=True)
    p = a / jnp.where(total > 0, total, 1.0)
    if r == 1.0:
      keep = p > eps
    else:
      order = jnp.argsort(-p, axis=-1, stable=True)
      cs = jnp.cumsum(jnp.take_along_axis(p, order, axis=-1), axis=-1)
      keep = jnp.take_along_axis(cs - r <= eps, jnp.argsort(order, axis=-1), axis=-1)
    return jax.lax.stop_gradient((keep & (total > 0)).astype(jnp.float32))

  return {k: one(v) for k, v in peaks.items()}


def mask_loss(logits: Mapping[str, jax.Array], target: Mapping[str, jax.Array]) -> jax.Array:
  """BCE-with-logits, summed over filters, averaged over the batch, then over gates
  (the official code's reduction; the poster sums over gates)."""
  import optax  # only the loss needs it

  if not logits:
    raise ValueError("mask_loss: no gates")
  per = [jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits[k], target[k]), -1)) for k in logits]
  return jnp.mean(jnp.stack(per))


# --------------------------------------------------------------------- cost ----


def per_sample_cost(graph: ChannelGraph, masks: Mapping[str, jax.Array], *, mode: str = "exact") -> jaxprune.Cost:
  """`jaxprune.cost` of every sample's masks (fields gain a leading batch axis).

  Example:
    >>> ftwt.per_sample_cost(graph, aux.masks).macs.shape   # one count per image
    (8,)
  """
  lead = {jnp.shape(m)[:-1] for m in masks.values()}
  if len(lead) != 1 or len(next(iter(lead))) != 1:
    raise ValueError(f"per-sample masks need one shared batch axis, got leading shapes {lead}")
  return jax.vmap(lambda m: jaxprune.cost(graph, m, mode=mode))(dict(masks))


def legacy_macs(graph: ChannelGraph, masks: Mapping[str, jax.Array]) -> jax.Array:
  """Per-sample MACs as FTWT's official code counts them (spec B6), shape (batch,).

  Every conv in program order costs a_l * H_out*W_out * (a_prev // groups) * k^2,
  with a_l its open output channels and a_prev the open outputs of the
  *previous conv in program order* (the stem: its input channels). So a
  ResNet block's first conv is charged against the previous block's conv2
  gates, not the (denser) residual stream it really reads; a depthwise conv
  is free once one input is off; the classifier and predictors are left out.
  Compare `1 - legacy_macs / legacy_base(graph)` with the paper's "FLOPs red.".

  Example:
    >>> red = 1 - ftwt.legacy_macs(graph, aux.masks).mean() / ftwt.legacy_base(graph)
  """
  f = graph.flat(masks)
  total, prev = 0.0, None
  for t in graph.terms:
    if t.kind != "conv":
      continue
    a_in = t.factors[0].value(f).sum(-1) if prev is None else prev
    a_out = t.factors[-1].value(f).sum(-1)
    # a depthwise conv has one factor (its input and output channels are one set): C groups
    groups = t.factors[0].size if len(t.factors) == 1 else t.groups
    total = total + t.coef * a_out * jnp.floor(a_in / groups)
    prev = a_out
  return total


def legacy_base(graph: ChannelGraph) -> float:
  """The dense model's MACs as the official code's base (thop: conv + fc, BN/ReLU free)."""
  return float(jaxprune.cost(graph).macs)


def predictor_macs(points: tuple[GatePoint, ...]) -> int:
  """MACs of the predictors per sample: one dense layer c_in x size per gate
  (pooling, softmax and bias adds not counted, as conv biases are not)."""
  return int(sum(p.c_in * p.size for p in points))


def predictor_params(points: tuple[GatePoint, ...]) -> int:
  return int(sum(p.c_in * p.size + p.size for p in points))


def open_predictors(points: tuple[GatePoint, ...]) -> dict[str, dict[str, jax.Array]]:
  """Predictors that keep every channel (logit 1): `gated` then runs the dense network."""
  return {p.name: {"kernel": jnp.zeros((p.c_in, p.size)), "bias": jnp.ones((p.size,))} for p in points}


def oracle_masks(
  gated_fn: Callable, points: tuple[GatePoint, ...], variables: Pytree, x: jax.Array, r: float, *, min_channels: int = 1
) -> dict[str, jax.Array]:
  """Per-sample target masks at r from the *ungated* network's activations.

  The paper's before-training estimate (B6): apply the targets as if they were
  the predicted masks and count the cost. Upstream gates are open here (the
  official targets see gated inputs), so this is an approximation; each group
  keeps at least its `min_channels` strongest channels so the network stays
  connected. `gated_fn` is `ftwt.gated(fn, graph, points)` (jitted or not).

  Example:
    >>> m = ftwt.oracle_masks(jax.jit(ftwt.gated(fn, graph, points)), points, v, x, 0.9)
    >>> ftwt.per_sample_cost(graph, m).macs.shape
    (8,)
  """
  r = check_r(r)
  _, aux = gated_fn(variables, open_predictors(points), x)
  t = targets(aux.peaks, r)
  out = dict(aux.masks)
  for k, m in t.items():
    rank = jnp.argsort(jnp.argsort(-aux.peaks[k], axis=-1), axis=-1)
    out[k] = jnp.maximum(m, (rank < min_channels).astype(m.dtype))
  return out


def backbone_schedule(
  epochs: float, steps_per_epoch: int, lr: float, *, decay_epochs: Iterable[float] = (), decay_factor: float = 0.1
) -> optax.Schedule:
  """The backbone's learning rate: x `decay_factor` at each of `decay_epochs`.

  Default epochs: the official MultiStep milestones 81/122/151 of 200 epochs, as
  fractions of `epochs` (spec B4). Milestones outside (0, epochs) are ignored.

  Example:
    >>> s = ftwt.backbone_schedule(200, 10, 0.01)
    >>> round(float(s(809)), 6), round(float(s(810)), 6)
    (0.01, 0.001)
  """
  epochs_at = tuple(decay_epochs) or tuple(epochs * f for f in (81 / 200, 122 / 200, 151 / 200))
  total = max(1, int(round(epochs * steps_per_epoch)))
  drops = {int(round(e * steps_per_epoch)): float(decay_factor) for e in epochs_at if 0 < e < epochs}
  return optax.piecewise_constant_schedule(lr, drops or {total + 1: 1.0})


def oracle_curve(
  fn: Callable, variables: Pytree, batches: Iterable[Mapping[str, Any]], rs: Iterable[float] = (0.8, 0.9, 0.95, 1.0)
) -> list[dict[str, float]]:
  """Before training (spec B6): per r, accuracy and mean per-sample MACs of the network
  run with FTWT's targets at r as its masks (`oracle_masks`; forward passes only).

  `fn(variables, x)` is the eval-mode network, `batches` (iterated once per r) hold
  `image` and integer `label` arrays.

  Example:
    >>> fn, v = jaxprune.functional(model)
    >>> curve = ftwt.oracle_curve(fn, v, [{"image": x, "label": y}], rs=(0.9,))
  """
  batches = list(batches)
  x1 = jnp.asarray(batches[0]["image"][:1])
  graph = jaxprune.trace(fn, variables, x1)
  points = gate_points(fn, graph, variables, x1)
  gated_fn, run_masked = jax.jit(gated(fn, graph, points)), jax.jit(jaxprune.masked(fn, graph))
  macs_fn, dense = jax.jit(lambda m: per_sample_cost(graph, m).macs), float(jaxprune.cost(graph).macs)
  rows = []
  for r in rs:
    correct, macs = 0, []
    for b in batches:
      x = jnp.asarray(b["image"])
      m = oracle_masks(gated_fn, points, variables, x, r)
      correct += int((np.asarray(run_masked(variables, m, x)).argmax(-1) == np.asarray(b["label"])).sum())
      macs.append(np.asarray(macs_fn(m)))
    macs = np.concatenate(macs)
    rows.append(
      {
        "r": float(r),
        "accuracy": correct / macs.size,
        "macs_mean": float(macs.mean()),
        "macs_std": float(macs.std()),
        "macs_reduction": 1 - float(macs.mean()) / dense,
      }
    )
  return rows
