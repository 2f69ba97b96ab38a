"""`cost`: exact, differentiable cost of a network under channel masks."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import FIRST, ChannelGraph, Expr, Masks, pad_expr


class Cost(NamedTuple):
  """Per-sample cost of the network as it runs under the masks.

  macs: multiply-accumulates of convolutions and dense layers (the count
    papers report as MACs, or often as "FLOPs").
  flops: every arithmetic operation on activations: 2 per MAC plus one per
    element of each elementwise op (BatchNorm, biases, activations, residual
    adds) and per reduced/pooled element. With mode="paper", 2 x macs.
  params: elements of the parameter leaves that remain.
  channels: channels kept across the channel groups (a branch mask keeps or
    drops a producer's share of a channel, not the channel).
  volume: elements of the conv/dense output activations (per sample).
  per_layer: `LayerCosts` of the conv/dense layers, in trace order:
    `per_layer["layer1.0.conv1"]["macs"]`, or arrays `per_layer.macs`.
  """

  macs: jax.Array
  flops: jax.Array
  params: jax.Array
  channels: jax.Array
  volume: jax.Array
  per_layer: "LayerCosts"


@jax.tree_util.register_pytree_node_class
class LayerCosts:
  """MACs and params per conv/dense layer as two arrays (one jit output each)."""

  def __init__(self, names: tuple[str, ...], macs: jax.Array, params: jax.Array):
    self.names, self.macs, self.params = names, macs, params

  def __getitem__(self, name: str) -> dict[str, jax.Array]:
    i = self.names.index(name)
    return {"macs": self.macs[..., i], "params": self.params[..., i]}

  def __iter__(self):
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)

  def items(self):
    return ((n, self[n]) for n in self.names)

  def tree_flatten(self):
    return (self.macs, self.params), self.names

  @classmethod
  def tree_unflatten(cls, names, children):
    return cls(names, *children)

  def __repr__(self) -> str:
    return f"LayerCosts({len(self.names)} layers)"


UNITS = ("macs", "flops", "params", "channels", "volume")
_MACS, _ELEMENTWISE, _VOLUME, _PARAMS = range(4)


class _Plan(NamedTuple):
  """The graph's cost terms as arrays: the distinct places' exprs, two incidence
  sums and a product."""

  prod: np.ndarray  # (K, P) flat indices of the distinct places' product factors
  union: np.ndarray  # (L, P) their union factors (L = 0: none)
  seg_inc: np.ndarray  # (segments, P): how often each place counts in each segment
  row_coef: np.ndarray  # one row per term (per block for grouped convs)
  row_segs: np.ndarray  # [rows, k] segments whose sums multiply (0 = constant 1)
  row_inc: np.ndarray  # (buckets, rows) 0/1
  layers: tuple[str, ...]  # per-layer buckets: 4 + 2i (macs), 5 + 2i (params)


@functools.lru_cache(maxsize=64)
def _plan(graph: ChannelGraph) -> _Plan:
  factors = [e for t in graph.terms for e in t.factors]
  kmax = max([e.prod.shape[0] for e in factors] + [1])
  lmax = max([e.union.shape[0] for e in factors] + [0])
  columns: dict[bytes, int] = {}  # distinct place exprs
  col_list: list[np.ndarray] = []
  seg_cols: list[np.ndarray] = [np.zeros(0, np.int64)]  # segment 0: the constant 1
  seg_of: dict[tuple[bytes, int], np.ndarray] = {}

  def place_columns(e: Expr) -> np.ndarray:
    padded = pad_expr(e, kmax, lmax)
    both = np.ascontiguousarray(np.concatenate([padded.prod, padded.union]).T)
    out = np.empty(e.size, np.int64)
    for i, col in enumerate(both):
      key = col.tobytes()
      k = columns.get(key)
      if k is None:
        k = columns[key] = len(col_list)
        col_list.append(col)
      out[i] = k
    return out

  def segments(e: Expr, groups: int) -> np.ndarray:
    key = (e.prod.tobytes() + b"|" + e.union.tobytes() + bytes(str(e.prod.shape), "ascii"), groups)
    if key not in seg_of:
      cols = place_columns(e)
      seg_of[key] = np.arange(len(seg_cols), len(seg_cols) + groups)
      seg_cols.extend(np.split(cols, groups))
    return seg_of[key]

  kf = max([len(t.factors) for t in graph.terms] + [1])
  layers: dict[str, int] = {}
  rows_coef, rows_segs, rows_bucket = [], [], []
  for t in graph.terms:
    if t.kind in ("conv", "dense"):
      buckets = [_MACS, 4 + 2 * layers.setdefault(t.name.rsplit(".", 1)[0], len(layers))]
    elif t.kind in ("elementwise", "reduce"):
      buckets = [_ELEMENTWISE]
    elif t.kind == "volume":
      buckets = [_VOLUME]
    elif t.kind == "param":
      buckets = [_PARAMS]
      layer = t.name.rsplit(".", 1)[0]
      if layer in layers:
        buckets.append(5 + 2 * layers[layer])
    else:
      raise ValueError(f"unknown cost term kind {t.kind!r}")
    segs = [segments(f, t.groups) for f in t.factors]
    for g in range(t.groups):
      row = [s[g] for s in segs] + [0] * (kf - len(segs))
      for b in buckets:
        rows_coef.append(t.coef)
        rows_segs.append(row)
        rows_bucket.append(b)
  cols = np.stack(col_list, 1) if col_list else np.zeros((kmax + lmax, 0), np.int32)
  seg_inc = np.zeros((len(seg_cols), cols.shape[1]), np.float32)
  for k, c in enumerate(seg_cols):
    np.add.at(seg_inc[k], c, 1.0)
  nb = 4 + 2 * len(layers)
  row_inc = np.zeros((nb, len(rows_bucket)), np.float32)
  row_inc[np.asarray(rows_bucket, np.int64), np.arange(len(rows_bucket))] = 1.0
  return _Plan(
    cols[:kmax].astype(np.int32),
    cols[kmax:].astype(np.int32),
    seg_inc,
    np.asarray(rows_coef, np.float32),
    np.asarray(rows_segs, np.int32).reshape(-1, kf),
    row_inc,
    tuple(layers),
  )


def cost(graph: ChannelGraph, masks: Masks | None = None, *, mode: str = "exact") -> Cost:
  """Cost of the traced network when its channels are masked.

  Masks may be soft (values in [0, 1]); the result is then a smooth
  (multilinear) function of them, exact at hard masks. With branch groups a
  stream channel counts for a consumer as 1 - prod(1 - m) over the producers
  that reach it. Masks carry no batch axis here: for per-sample masks use
  `jax.vmap(lambda m: cost(graph, m))(masks)`.

  Example:
    >>> c = jaxprune.cost(graph, graph.ones())
    >>> float(c.macs), float(c.params)
    (40551040.0, 269722.0)
    >>> grads = jax.grad(lambda m: jaxprune.cost(graph, m).macs)(graph.ones())
  """
  if mode not in ("exact", "paper"):
    raise ValueError(f"mode must be 'exact' or 'paper', got {mode!r}")
  masks = graph.ones() if masks is None else masks
  # Concrete masks (the common interactive case) are counted in numpy: no
  # compilation. Traced masks (jit, grad, vmap) take the same path in jnp.
  concrete = not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(masks))
  xp = np if concrete else jnp
  m = graph.flat(masks)
  if concrete:
    m = np.asarray(m, np.float32)
  if m.ndim != 1:
    raise ValueError(
      f"cost takes masks without a batch axis (got leading shape {m.shape[:-1]}); "
      "use jax.vmap(lambda m: jaxprune.cost(graph, m))(masks) for per-sample cost."
    )
  p = _plan(graph)
  # Dense 0/1 matrices instead of scatters: XLA compiles them much faster.
  sums = p.seg_inc @ Expr(p.prod, p.union).value(m)
  sums = xp.concatenate([xp.ones((1,), sums.dtype), sums[1:]])
  rows = p.row_coef * xp.prod(sums[p.row_segs], axis=1)
  b = p.row_inc @ rows
  flops = 2 * b[_MACS] + (b[_ELEMENTWISE] if mode == "exact" else 0.0)
  per_layer = LayerCosts(p.layers, b[4::2], b[5::2])
  n_ch = sum(g.size for g in graph.groups if g.kind == 'channel')  # channel groups come first
  return Cost(
    *(xp.asarray(v) for v in (b[_MACS], flops, b[_PARAMS], m[FIRST : FIRST + n_ch].sum(), b[_VOLUME])), per_layer
  )


@functools.lru_cache(maxsize=64)
def _dense(graph: ChannelGraph, unit: str, mode: str) -> float:
  # A constant, counted eagerly even while a jit traces the caller.
  with jax.ensure_compile_time_eval():
    ones = {g.name: np.ones(g.size, np.float32) for g in graph.groups}
    return float(getattr(cost(graph, ones, mode=mode), unit))


def ratio(graph: ChannelGraph, masks: Masks, unit: str = "macs", *, mode: str = "exact") -> jax.Array:
  """Fraction of the dense cost that remains, in one unit; jit-able and differentiable
  in the masks (the dense cost is a cached constant)."""
  if unit not in UNITS:
    raise ValueError(f"unknown cost unit {unit!r}; choose one of {UNITS}")
  return getattr(cost(graph, masks, mode=mode), unit) / _dense(graph, unit, mode)
