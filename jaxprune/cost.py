"""`cost`: exact, differentiable cost of a network under channel masks."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.graph import ChannelGraph, Masks, Term


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
  per_layer: {layer name: {"macs": ..., "params": ...}} for conv/dense layers.
  """
  macs: jax.Array
  flops: jax.Array
  params: jax.Array
  channels: jax.Array
  volume: jax.Array
  per_layer: dict


UNITS = ("macs", "flops", "params", "channels", "volume")


def _term_value(term: Term, m: jax.Array, cache: dict) -> jax.Array:
  if not term.factors:
    return jnp.asarray(term.coef, jnp.float32)
  prod = None
  for f in term.factors:
    key = (f.tobytes(), term.groups)
    if key not in cache:
      cache[key] = m[f].reshape(term.groups, -1).sum(-1)
    prod = cache[key] if prod is None else prod * cache[key]
  return term.coef * prod.sum()


def cost(graph: ChannelGraph, masks: Masks | None = None, *, mode: str = "exact") -> Cost:
  """Cost of the traced network when its channels are masked.

  Masks may be soft (values in [0, 1]); the result is then a smooth function
  of them (multilinear), exact at hard masks. Masks carry no batch axis here:
  for per-sample masks use `jax.vmap(lambda m: cost(graph, m))(masks)`.

  Example:
    >>> c = jaxprune.cost(graph, graph.ones())
    >>> float(c.macs), float(c.params)
    >>> jax.grad(lambda m: jaxprune.cost(graph, m).macs)(graph.ones())
  """
  if mode not in ("exact", "paper"):
    raise ValueError(f"mode must be 'exact' or 'paper', got {mode!r}")
  masks = graph.ones() if masks is None else masks
  m = graph.flat(masks)
  if m.ndim != 1:
    raise ValueError(
        f"cost takes masks without a batch axis (got leading shape {m.shape[:-1]}); "
        "use jax.vmap(lambda m: jaxprune.cost(graph, m))(masks) for per-sample cost.")
  cache: dict = {}
  zero = jnp.zeros((), jnp.float32)
  totals = {"macs": zero, "flops": zero, "params": zero, "volume": zero}
  per_layer: dict[str, dict[str, jax.Array]] = {}
  for t in graph.terms:
    v = _term_value(t, m, cache)
    if t.kind in ("conv", "dense"):
      totals["macs"] = totals["macs"] + v
      totals["flops"] = totals["flops"] + 2 * v
      layer = per_layer.setdefault(t.name.rsplit(".", 1)[0], {"macs": zero, "params": zero})
      layer["macs"] = layer["macs"] + v
    elif t.kind in ("elementwise", "reduce"):
      if mode == "exact":
        totals["flops"] = totals["flops"] + v
    elif t.kind == "volume":
      totals["volume"] = totals["volume"] + v
    elif t.kind == "param":
      totals["params"] = totals["params"] + v
      layer_name = t.name.rsplit(".", 1)[0]
      if layer_name in per_layer:
        per_layer[layer_name]["params"] = per_layer[layer_name]["params"] + v
  channels = m[1:].sum()
  return Cost(totals["macs"], totals["flops"], totals["params"], channels,
              totals["volume"], per_layer)


def ratio(graph: ChannelGraph, masks: Masks, unit: str = "macs", *, mode: str = "exact") -> jax.Array:
  """Fraction of the dense cost that remains, in one unit."""
  if unit not in UNITS:
    raise ValueError(f"unknown cost unit {unit!r}; choose one of {UNITS}")
  full = getattr(cost(graph, None, mode=mode), unit)
  return getattr(cost(graph, masks, mode=mode), unit) / full
