"""`cost`: exact, differentiable cost of a network under channel masks."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import ChannelGraph, Masks


class Cost(NamedTuple):
  """Per-sample cost of the network as it runs under the masks.

  macs: multiply-accumulates of convolutions and dense layers (the count
    papers report as MACs, or often as "FLOPs").
  flops: every arithmetic operation on activations: 2 per MAC plus one per
    element of each elementwise op (BatchNorm, biases, activations, residual
    adds) and per reduced/pooled element. With mode="paper", 2 x macs.
  params: elements of the parameter leaves that remain.
  channels: channels kept across all prunable groups.
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
  """The graph's cost terms as arrays: two segment sums and a product."""
  pos: np.ndarray       # flat-mask positions of every segment, concatenated
  seg: np.ndarray       # segment of each position
  num_segments: int
  row_coef: np.ndarray  # one row per term (per block for grouped convs)
  row_segs: np.ndarray  # [rows, k] segments whose sums multiply (0 = constant 1)
  row_bucket: np.ndarray
  layers: tuple[str, ...]  # per-layer buckets: 4 + 2i (macs), 5 + 2i (params)


@functools.lru_cache(maxsize=64)
def _plan(graph: ChannelGraph) -> _Plan:
  pos, seg = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]  # segment 0 sums m[0] == 1
  seg_of: dict[tuple[bytes, int], np.ndarray] = {}
  nseg = 1

  def segments(f: np.ndarray, groups: int) -> np.ndarray:
    nonlocal nseg
    key = (f.tobytes(), groups)
    if key not in seg_of:
      ids = np.arange(nseg, nseg + groups)
      pos.append(f.astype(np.int64))
      seg.append(np.repeat(ids, f.size // groups))
      seg_of[key] = ids
      nseg += groups
    return seg_of[key]

  kmax = max([len(t.factors) for t in graph.terms] + [1])
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
      row = [s[g] for s in segs] + [0] * (kmax - len(segs))
      for b in buckets:
        rows_coef.append(t.coef)
        rows_segs.append(row)
        rows_bucket.append(b)
  return _Plan(np.concatenate(pos).astype(np.int32), np.concatenate(seg).astype(np.int32), nseg,
               np.asarray(rows_coef, np.float32), np.asarray(rows_segs, np.int32).reshape(-1, kmax),
               np.asarray(rows_bucket, np.int32), tuple(layers))


@functools.lru_cache(maxsize=256)
def _incidence_cached(rows: bytes, cols: bytes, n_rows: int, n_cols: int) -> np.ndarray:
  a = np.zeros((n_rows, n_cols), np.float32)
  np.add.at(a, (np.frombuffer(rows, np.int32), np.frombuffer(cols, np.int32)), 1.0)
  return a


def _incidence(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
  return _incidence_cached(rows.astype(np.int32).tobytes(), cols.astype(np.int32).tobytes(), n_rows, n_cols)


def cost(graph: ChannelGraph, masks: Masks | None = None, *, mode: str = "exact") -> Cost:
  """Cost of the traced network when its channels are masked.

  Masks may be soft (values in [0, 1]); the result is then a smooth
  (multilinear) function of them, exact at hard masks. Masks carry no batch
  axis here: for per-sample masks use `jax.vmap(lambda m: cost(graph, m))(masks)`.

  Example:
    >>> c = jaxprune.cost(graph, graph.ones())
    >>> float(c.macs), float(c.params)
    >>> jax.grad(lambda m: jaxprune.cost(graph, m).macs)(graph.ones())
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
        "use jax.vmap(lambda m: jaxprune.cost(graph, m))(masks) for per-sample cost.")
  p = _plan(graph)
  # Dense 0/1 matrices instead of scatters: XLA compiles them much faster.
  sums = _incidence(p.seg, p.pos, p.num_segments, m.shape[0]) @ m
  rows = p.row_coef * xp.prod(sums[p.row_segs], axis=1)
  b = _incidence(p.row_bucket, np.arange(p.row_bucket.size), 4 + 2 * len(p.layers), rows.size) @ rows
  flops = 2 * b[_MACS] + (b[_ELEMENTWISE] if mode == "exact" else 0.0)
  per_layer = LayerCosts(p.layers, b[4::2], b[5::2])
  return Cost(*(xp.asarray(v) for v in (b[_MACS], flops, b[_PARAMS], m[1:].sum(), b[_VOLUME])),
              per_layer)


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
