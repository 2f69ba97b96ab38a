"""FTWT: dynamic per-sample channel gating with self-supervised mask prediction.

"Fire Together Wire Together" (Elkerdawy et al., CVPR 2022). Every gated conv
gets a small predictor: pool the conv's *input* over space, softmax over
channels, one dense layer to one logit per output channel; the channel runs
for this sample iff its logit is > 0. Predictors learn by binary
classification against targets made from the layer's own output: the top
filters (by peak |activation|) whose cumulative share of the mass stays
within r.

Gating is exact and sequential, in one pass: `gated` evaluates the traced
network equation by equation (like `jaxprune.masked`), and when it reaches a
gated conv it computes that group's per-sample mask from the conv's input as
it is at that point, i.e. with every upstream gate already applied. So layer
l's predictor sees layer l's gated input, as in the paper; later consumers of
the group then multiply their input channels by that mask (the core's
per-sample masking, equal to the per-sample slimmed network).

Where the core ties channels (a residual stream: the stem conv and every
block's second conv share one group), there is one mask per stream, decided
at its first producer (the stem for a ResNet stage-1 stream, the downsample
shortcut or first conv2 for later stages). FTWT gates each conv2 output
separately before the add and never gates the identity path; here the
stream channels are gated as one (see docs/ftwt.md).

Example:
  >>> fn, v = pruning.core_view(graphdef, state)        # any fn(variables, x)
  >>> graph = jaxprune.trace(fn, v, x[:1])
  >>> points = ftwt.gate_points(fn, graph, v, x[:1])
  >>> preds = ftwt.init_predictors(0, points)
  >>> logits, aux = ftwt.gated(fn, graph, points)(v, preds, x)
  >>> loss = ftwt.mask_loss(aux.logits, ftwt.targets(aux.peaks, r=0.9))
  >>> macs = ftwt.per_sample_cost(graph, aux.masks).macs      # shape (batch,)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

import jaxprune
from jaxprune.graph import ChannelGraph
from jaxprune.masked import _CALLS, _apply_mask, _bind, _site_indices, _write
from jaxprune.trace import analyze

Pytree = Any
# Ops that leave a kernel's values and layout alone on its way to the conv.
_SAME = ("convert_element_type", "copy", "copy_p", "device_put", "reduce_precision")


class GatePoint(NamedTuple):
  """A gated conv: group `name` (`size` channels) decided from an input of `c_in` channels."""
  name: str
  path: tuple[int, ...]   # equation index per jaxpr nesting level
  c_in: int
  size: int
  feature_axis: int       # of the conv's input
  spatial_axes: tuple[int, ...]
  offset: int             # of the group in the graph's flat mask vector


class GateAux(NamedTuple):
  """Per-group (batch, size) arrays from one gated forward pass."""
  logits: dict[str, jax.Array]  # gated groups only
  masks: dict[str, jax.Array]   # every group (ungated ones are all ones)
  peaks: dict[str, jax.Array]   # gated groups: max |activation| over space, pre-mask


def check_r(r: float) -> float:
  """r must lie in (0, 1]."""
  if not isinstance(r, (int, float, np.floating)) or not 0.0 < float(r) <= 1.0:
    raise ValueError(f"FTWT's r is the share of activation mass kept and must lie in (0, 1]; "
                     f"got {r!r}")
  return float(r)


def _walk(jaxpr, origin: dict, path: tuple, visit) -> None:
  """Calls `visit(eqn, path, origin)` in program order, following nested calls.

  `origin` maps a jaxpr variable to the index of the variable leaf it equals.
  """
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    name = eqn.primitive.name
    ins = [origin.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
    if name in _CALLS:
      closed = eqn.params[_CALLS[name]]
      inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
      k = len(eqn.invars) - len(inner.invars)
      inner_origin = {v: o for v, o in zip(inner.invars, ins[k:]) if o is not None}
      _walk(inner, inner_origin, here, visit)
      continue
    if name in _SAME and ins and ins[0] is not None:
      origin[eqn.outvars[0]] = ins[0]
    visit(eqn, here, ins)


def gate_points(fn: Callable, graph: ChannelGraph, variables: Pytree, *args) -> tuple[GatePoint, ...]:
  """The conv layers that gate each group: for every group, its first producing conv.

  Raises ValueError if the network has none (e.g. a pure MLP).

  Example:
    >>> points = ftwt.gate_points(fn, graph, v, jnp.zeros((1, 32, 32, 3)))
    >>> [(p.name, p.c_in, p.size) for p in points][:2]   # [('conv1', 3, 16), ...]
  """
  closed = jax.make_jaxpr(fn)(variables, *args)
  n_leaves = len(graph.leaf_shapes)
  if len(jax.tree_util.tree_leaves(variables)) != n_leaves:
    raise ValueError("variables do not have the structure the graph was traced with")
  origin = {v: i for i, v in enumerate(closed.jaxpr.invars[:n_leaves])}
  offsets = graph.offsets
  points: list[GatePoint] = []
  done: set[str] = set()

  def visit(eqn, path, ins):
    if eqn.primitive.name != "conv_general_dilated" or ins[1] is None or ins[0] is not None:
      return
    f = graph.leaf_axes[ins[1]].get(eqn.params["dimension_numbers"].rhs_spec[0])
    if f is None:
      return
    lb, lf, *lsp = eqn.params["dimension_numbers"].lhs_spec
    if lb != 0:
      return  # per-sample masks need the batch first
    have = set(f.tolist())
    for g in graph.groups:
      o = offsets[g.name]
      if g.name not in done and have.issuperset(range(o, o + g.size)):
        done.add(g.name)
        points.append(GatePoint(g.name, path, int(eqn.invars[0].aval.shape[lf]), g.size,
                                lf, tuple(lsp), o))

  _walk(closed.jaxpr, origin, (), visit)
  if not points:
    raise ValueError(
        "FTWT found no gate points: no conv layer produces a prunable channel group "
        f"(groups: {[g.name for g in graph.groups]}). It gates conv outputs only.")
  return tuple(points)


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
        "bias": jnp.asarray(rng.uniform(-bound, bound, (p.size,)), jnp.float32)}
  return out


def predict_logits(x: jax.Array, params: Mapping[str, jax.Array], point: GatePoint, *,
                   pool: str = "avg") -> jax.Array:
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


def gated(fn: Callable, graph: ChannelGraph, points: tuple[GatePoint, ...], *,
          pool: str = "avg", mode: str = "decoupled") -> Callable:
  """`g(variables, predictors, *args) -> (fn's output, GateAux)` with per-sample gates.

  Each gate's hard mask (logit > 0) is computed from its conv's input with all
  upstream gates applied, and multiplies that group's channels wherever they
  are consumed. Masks carry no gradient (the task loss never reaches the
  predictors). mode="decoupled" stops the gradient at the predictor input, so
  the mask loss trains predictors only; mode="joint" lets it reach the
  upstream backbone.

  Example:
    >>> out, aux = jax.jit(ftwt.gated(fn, graph, points))(v, preds, x)
    >>> aux.masks["layer1.0.conv1"].shape    # (batch, 16)
  """
  if mode not in ("decoupled", "joint"):
    raise ValueError(f"mode must be 'decoupled' or 'joint', got {mode!r}")
  if pool not in ("avg", "max"):
    raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
  if not points:
    raise ValueError("no gate points: call ftwt.gate_points first (a model without convs "
                     "producing prunable groups cannot be gated)")
  by_path: dict[tuple, list[GatePoint]] = {}
  for p in points:  # one conv may produce several groups (e.g. zero-padded shortcuts)
    by_path.setdefault(p.path, []).append(p)
  offsets = graph.offsets

  def g(variables, predictors, *args):
    missing = [p.name for p in points if p.name not in predictors]
    if missing:
      raise ValueError(f"predictors missing for gates {missing}")
    fl, leaf_vals, _, closed, out_tree = analyze(fn, variables, args)
    sites = _site_indices(graph, fl, leaf_vals)
    leaves = jax.tree_util.tree_leaves((variables, *args))
    batch = None
    for a in jax.tree_util.tree_leaves(args):
      if np.ndim(a):
        batch = np.shape(a)[0]
        break
    if batch is None:
      raise ValueError("gated: no batched input found (per-sample gates need a batch axis)")
    n = 1 + graph.num_channels
    st = {"flat": jnp.ones((batch, n), jnp.float32),
          "peaks": jnp.zeros((batch, n), jnp.float32), "logits": {}}
    outs = _eval(closed.jaxpr, closed.consts, leaves, sites, by_path, st, predictors,
                 pool, mode == "decoupled")
    out = jax.tree_util.tree_unflatten(out_tree, outs)
    sl = lambda a, name: a[:, offsets[name]:offsets[name] + graph.group(name).size]
    masks = {gr.name: sl(st["flat"], gr.name) for gr in graph.groups}
    peaks = {p.name: jax.lax.stop_gradient(sl(st["peaks"], p.name)) for p in points}
    return out, GateAux(st["logits"], masks, peaks)
  return g


def _peaks(x: jax.Array, axis: int) -> jax.Array:
  """(batch, channels): max |x| over every axis but the batch and channel axes."""
  red = tuple(a for a in range(x.ndim) if a not in (0, axis))
  a = jnp.max(jnp.abs(x), axis=red) if red else jnp.abs(x)
  return a.astype(jnp.float32)


def _eval(jaxpr, consts, args, sites, gates, st, predictors, pool, decoupled, path=()):
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  inside = lambda here: (any(p[:len(here)] == here and len(p) > len(here) for p, _ in sites)
                         or any(p[:len(here)] == here and len(p) > len(here) for p in gates))
  _write(env, jaxpr.constvars, consts)
  _write(env, jaxpr.invars, args)
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    invals = [read(v) for v in eqn.invars]
    key = _CALLS.get(eqn.primitive.name)
    if key is not None and inside(here):
      closed = eqn.params[key]
      inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
      outs = _eval(inner, list(getattr(closed, "consts", ())),
                   invals[len(invals) - len(inner.invars):], sites, gates, st, predictors,
                   pool, decoupled, here)
    else:
      if inside(here):
        raise NotImplementedError(
            f"ftwt.gated: channels inside '{eqn.primitive.name}' at "
            f"{source_info_util.summarize(eqn.source_info)} cannot be gated yet.")
      for (p, k), (axis, index) in sites.items():
        if p == here and axis != 0:
          # Targets read the layer output before its mask (the paper's O^l).
          st["peaks"] = st["peaks"].at[:, index].max(_peaks(invals[k], axis))
          invals[k] = _apply_mask(invals[k], axis, index, st["flat"])
      for gp in gates.get(here, ()):
        x = invals[0]
        if decoupled:
          x = jax.lax.stop_gradient(x)
        logits = predict_logits(x, predictors[gp.name], gp, pool=pool)
        st["logits"][gp.name] = logits
        m = jax.lax.stop_gradient((logits > 0).astype(jnp.float32))
        st["flat"] = st["flat"].at[:, gp.offset:gp.offset + gp.size].set(m)
      outs = _bind(eqn, invals)
    _write(env, eqn.outvars, outs)
  return [read(v) for v in jaxpr.outvars]


# ------------------------------------------------------------------ targets ----

def targets(peaks: Mapping[str, jax.Array], r: float, *, eps: float = 1e-5) -> dict[str, jax.Array]:
  """Self-supervised 0/1 targets per group, (batch, size) each.

  Per sample: p = peaks / sum(peaks); sort p descending; keep the filters whose
  cumulative share stays within r (+eps; the filter that crosses r is dropped,
  as in the official code). r = 1 keeps every filter with p > eps (drops dead
  ones only). A sample whose layer output is all zero keeps nothing (every
  filter is dead; the official code would divide by zero).

  Example:
    >>> ftwt.targets({"a": jnp.array([[.3, .1, .3, .2, .1]])}, r=0.95)["a"]  # [[1,0,1,1,0]]
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
  per = [jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits[k], target[k]), -1))
         for k in logits]
  return jnp.mean(jnp.stack(per))


# --------------------------------------------------------------------- cost ----

def per_sample_cost(graph: ChannelGraph, masks: Mapping[str, jax.Array], *,
                    mode: str = "exact") -> jaxprune.Cost:
  """`jaxprune.cost` of every sample's masks (fields gain a leading batch axis).

  Example:
    >>> ftwt.per_sample_cost(graph, aux.masks).macs.mean()
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
    a_in = f[..., t.factors[0]].sum(-1) if prev is None else prev
    a_out = f[..., t.factors[-1]].sum(-1)
    # a depthwise conv has one factor (its input and output channels are one set): C groups
    groups = len(t.factors[0]) if len(t.factors) == 1 else t.groups
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
  return {p.name: {"kernel": jnp.zeros((p.c_in, p.size)), "bias": jnp.ones((p.size,))}
          for p in points}


def oracle_masks(gated_fn: Callable, points: tuple[GatePoint, ...], variables: Pytree,
                 x: jax.Array, r: float, *, min_channels: int = 1) -> dict[str, jax.Array]:
  """Per-sample target masks at r from the *ungated* network's activations.

  The paper's before-training estimate (B6): apply the targets as if they were
  the predicted masks and count the cost. Upstream gates are open here (the
  official targets see gated inputs), so this is an approximation; each group
  keeps at least its `min_channels` strongest channels so the network stays
  connected. `gated_fn` is `ftwt.gated(fn, graph, points)` (jitted or not).

  Example:
    >>> m = ftwt.oracle_masks(jax.jit(ftwt.gated(fn, graph, points)), points, v, x, 0.9)
    >>> ftwt.per_sample_cost(graph, m).macs.mean()
  """
  r = check_r(r)
  _, aux = gated_fn(variables, open_predictors(points), x)
  t = targets(aux.peaks, r)
  out = dict(aux.masks)
  for k, m in t.items():
    rank = jnp.argsort(jnp.argsort(-aux.peaks[k], axis=-1), axis=-1)
    out[k] = jnp.maximum(m, (rank < min_channels).astype(m.dtype))
  return out
