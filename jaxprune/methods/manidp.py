"""ManiDP: manifold-regularized dynamic channel pruning (Tang et al., CVPR 2021).

A saliency gate per gated conv predicts, per sample, a non-negative scale for
every output channel from the conv's input (GAP -> FC -> ReLU -> FC, bias 1 ->
ReLU capped at `clamp_max`). Channels whose saliency is below the layer's
threshold are switched off; the others are multiplied by their saliency. The
gated convs are both convs of every residual block (the second one on its
branch, before the residual add, through the core's branch groups); the stem,
projection shortcuts, the classifier and the residual streams are not gated.
Gating runs through `jaxprune.gated`, in one pass: a gate reads its conv's
input with every upstream gate applied.

Training adds to the cross-entropy
  lambda_sparse * sum_l mean_b [w_b * mean_c s_l(x_b)]      complexity-aware sparsity
  lambda_sim   * sum_l ||T_l - R_l||_F^2 / B^2               similarity consistency
with w_b = max(0, 1 - CE_b / C)^gamma, C = thre_cls x the previous epoch's mean
CE, T_l / R_l the cosine-similarity matrices over the batch of the layer's
pooled un-gated output and of its saliencies. Per-layer thresholds are
refreshed after every epoch (from epoch 1 on) from the epoch-mean saliencies:
the k-th largest, k = ceil(rho(e) C_l), with the kept rate rho following a
cosine from 1 to the target.

Example:
  >>> graph = jaxprune.trace(fn, variables, x[:1], branches=True)
  >>> layers = manidp.gate_layers(fn, graph, variables, x[:1])
  >>> params = manidp.init_gates(0, layers)
  >>> state = manidp.init(layers)                                  # thresholds, sums
  >>> out, res = manidp.gated(fn, graph, layers)(variables, params, state.thresholds, x)
  >>> w = jnp.ones(len(x))                  # per-sample weights: manidp.complexity_weights
  >>> loss = manidp.sparsity_loss(res.aux, w) + manidp.similarity_loss(res.observed, res.aux)
  >>> state = manidp.accumulate(state, res.aux)                    # every train step
  >>> state = manidp.refresh(state, 0, epochs, target=0.65)        # every epoch end
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune.graph import ChannelGraph

CLAMP_MAX = 1000.0
THRESHOLD_INIT = -10000.0  # the official init: nothing is switched off
SQUEEZE_RATE = 2  # halved (to 1) for layers of fewer than 80 channels
EXCLUDE = r"downsample|shortcut|proj"


class GateLayer(NamedTuple):
  """A gated conv: group `name` (`size` channels) decided from `c_in` input features."""

  name: str
  c_in: int
  size: int
  hidden: int
  spatial_axes: tuple[int, ...]
  layer: str = ""  # the conv, e.g. "layer1.0.conv2"


class State(NamedTuple):
  """Per gated layer: its threshold and this epoch's saliency sums (checkpointed)."""

  thresholds: dict[str, jax.Array]  # scalar per layer
  sal_sum: dict[str, jax.Array]  # (size,) per layer: sum of saliencies over the epoch's samples
  count: jax.Array  # samples summed


def hidden_size(c_out: int, squeeze_rate: int = SQUEEZE_RATE) -> int:
  """The gate's hidden width: C / q, with q halved for layers of fewer than 80 channels."""
  q = squeeze_rate // 2 if c_out < 80 else squeeze_rate
  return max(c_out // max(q, 1), 1)


def gate_layers(
  fn: Callable, graph: ChannelGraph, variables: Any, *args, exclude: str = EXCLUDE, squeeze_rate: int = SQUEEZE_RATE
) -> tuple[GateLayer, ...]:
  """Both convs of every residual block, in program order (the graph must be traced
  with `branches=True`): every conv that neither reads the input (the stem) nor
  matches `exclude` (projection shortcuts); never a residual stream.

  Raises ValueError for a model without gate points.

  >>> [l.name for l in manidp.gate_layers(fn, graph, v, x[:1])][:2]
  ['layer1.0.conv1', 'layer1.0.conv2:branch']
  """
  if not graph.has_branches:
    raise ValueError("ManiDP gates residual branches: trace with jaxprune.trace(..., branches=True)")
  streams = set(graph.streams())
  prods = jaxprune.producers(fn, graph, variables, *args)
  layers = tuple(
    GateLayer(p.name, p.c_in, p.size, hidden_size(p.size, squeeze_rate), p.spatial_axes, p.layer)
    for p in prods.values()
    if p.op == "conv" and not p.first and p.name not in streams and not (exclude and re.search(exclude, p.layer))
  )
  if not layers:
    raise ValueError(
      "ManiDP found no gate points: no conv inside a residual block produces a "
      f"prunable group (groups: {[g.name for g in graph.groups]})."
    )
  return layers


def init_gates(seed: int, layers: tuple[GateLayer, ...], *, scale: float = 1.0) -> dict[str, dict[str, jax.Array]]:
  """`{layer: {'w1': (c_in, h), 'w2': (h, size), 'b2': (size,)}}`: Kaiming-normal
  weights times `scale` (1: official), bias 1 (gates start open, saliencies around 1
  when the block inputs are small). Drawn with numpy.

  A pretrained network whose block inputs are large gets saliencies far from 1 at
  the official init, and the product over the blocks blows its logits up; a small
  `scale` starts every gate near 1, i.e. near the pretrained network.
  """
  if not scale > 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  rng = np.random.default_rng(seed)
  out = {}
  for l in layers:
    out[l.name] = {
      "w1": jnp.asarray(scale * rng.normal(0, math.sqrt(2.0 / l.c_in), (l.c_in, l.hidden)), jnp.float32),
      "w2": jnp.asarray(scale * rng.normal(0, math.sqrt(2.0 / l.hidden), (l.hidden, l.size)), jnp.float32),
      "b2": jnp.ones((l.size,), jnp.float32),
    }
  return out


def init(layers: tuple[GateLayer, ...], threshold: float = THRESHOLD_INIT) -> State:
  """Thresholds at `threshold` (nothing off), empty sums."""
  return State(
    {l.name: jnp.float32(threshold) for l in layers},
    {l.name: jnp.zeros((l.size,), jnp.float32) for l in layers},
    jnp.float32(0.0),
  )


def saliency(x: jax.Array, params: Mapping[str, jax.Array], spatial_axes, *, clamp_max: float = CLAMP_MAX) -> jax.Array:
  """(batch, size) saliencies >= 0 from a conv input `x`: GAP, FC, ReLU, FC, ReLU, cap."""
  g = jnp.mean(x, axis=tuple(spatial_axes)).astype(jnp.float32)
  h = jax.nn.relu(g @ params["w1"])
  return jnp.minimum(jax.nn.relu(h @ params["w2"] + params["b2"]), clamp_max)


def apply_threshold(s: jax.Array, threshold: jax.Array) -> jax.Array:
  """The applied gate s * 1[s >= threshold]; the comparison carries no gradient."""
  return s * jax.lax.stop_gradient((s >= threshold).astype(s.dtype))


def _pooled(y: jax.Array, axis: int) -> jax.Array:
  red = tuple(a for a in range(y.ndim) if a not in (0, axis))
  return (jnp.mean(y, axis=red) if red else y).astype(jnp.float32)


def gated(
  fn: Callable, graph: ChannelGraph, layers: tuple[GateLayer, ...], *, clamp_max: float = CLAMP_MAX
) -> Callable:
  """`g(variables, params, thresholds, *args) -> (output, jaxprune.Gated)`.

  `Gated.aux[layer]` holds the soft saliencies (batch, size) (the sparsity and
  similarity terms use them), `Gated.observed[layer]` the layer's pooled
  un-gated output (the similarity's features), `Gated.masks` the applied
  gates.

  >>> layers = manidp.gate_layers(fn, graph, v, x[:1])
  >>> params, state = manidp.init_gates(0, layers), manidp.init(layers)
  >>> out, res = jax.jit(manidp.gated(fn, graph, layers))(v, params, state.thresholds, x)
  >>> out.shape
  (8, 10)
  """
  if not layers:
    raise ValueError("no gate layers: call manidp.gate_layers first")
  by_name = {l.name: l for l in layers}

  def gate(inp: jaxprune.GateInput, p):
    params, thre = p
    s = saliency(inp.x, params, by_name[inp.producer.name].spatial_axes, clamp_max=clamp_max)
    return apply_threshold(s, thre), s

  core = jaxprune.gated(fn, graph, gate, [l.name for l in layers], observe=_pooled, combine="first")

  def g(variables, params, thresholds, *args):
    missing = [l.name for l in layers if l.name not in params or l.name not in thresholds]
    if missing:
      raise ValueError(f"gate parameters or thresholds missing for {missing}")
    return core(variables, {n: (params[n], thresholds[n]) for n in by_name}, *args)

  return g


# ------------------------------------------------------------------ losses ----


def complexity_weights(
  ce: jax.Array, c_ref: jax.Array | float, *, gamma: float = 1.0, detach: bool = True
) -> jax.Array:
  """w_b = max(0, 1 - CE_b / C)^gamma: 1 for fitted samples, 0 at CE >= C.

  The official code does not detach w (its gradient then *raises* the loss of
  easy samples whenever lambda * sum_l mean(s_l) > C); `detach=True` treats it
  as the constant the paper describes.

  >>> complexity_weights(jnp.array([0.0, 0.25, 0.5, 2.0]), 0.5)
  Array([1. , 0.5, 0. , 0. ], dtype=float32)
  """
  c_ref = jnp.asarray(c_ref, jnp.float32)
  r = jnp.clip((c_ref - ce) / c_ref, 1e-10, None) ** gamma
  w = jnp.where(ce < c_ref, r, 0.0)
  return jax.lax.stop_gradient(w) if detach else w


def sparsity_loss(saliencies: Mapping[str, jax.Array], w: jax.Array) -> jax.Array:
  """sum over gated layers of mean_b [w_b * mean_c s_l(x_b)] (an L1 over C_l, summed
  over layers: its strength grows with depth, as in the official code)."""
  return sum(jnp.mean(w * jnp.mean(s, axis=-1)) for s in saliencies.values())


def _cosine_gram(f: jax.Array) -> jax.Array:
  f = f.reshape(f.shape[0], -1).astype(jnp.float32)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  return f @ f.T


def similarity_loss(features: Mapping[str, jax.Array], saliencies: Mapping[str, jax.Array]) -> jax.Array:
  """sum_l ||T_l - R_l||_F^2 / B^2, T and R the cosine similarities over the batch of
  the pooled un-gated features and of the saliencies. Under jit with a sharded
  batch the Gram matrices span the global batch (as the official code, which
  gathers the full batch)."""
  total = 0.0
  for name, s in saliencies.items():
    b = s.shape[0]
    d = _cosine_gram(features[name]) - _cosine_gram(s)
    total = total + jnp.sum(d * d) / (b * b)
  return total


# -------------------------------------------------------------- thresholds ----


def kept_rate(epoch: int, epochs: int, target: float) -> float:
  """rho(e) = (1 - target)/2 cos(pi (e + 1) / E) + (1 + target)/2: from ~1 to `target`.

  >>> round(kept_rate(9, 10, 0.5), 6)
  0.5
  """
  check_rate(target)
  return (1 - target) / 2 * math.cos(math.pi * (epoch + 1) / epochs) + (1 + target) / 2


def check_rate(target: float) -> float:
  if isinstance(target, bool) or not (isinstance(target, (int, float, np.floating)) and 0.0 < float(target) <= 1.0):
    raise ValueError(f"ManiDP's target kept rate must lie in (0, 1], got {target!r}")
  return float(target)


def thresholds(mean_saliency: Mapping[str, jax.Array], rate: float) -> dict[str, jax.Array]:
  """Per layer, the k-th largest epoch-mean saliency, k = ceil(rate * C_l): channels
  below it (on average) are off. Jit-able.

  >>> thresholds({"a": jnp.array([0.1, 0.4, 0.3, 0.2])}, 0.5)["a"]
  Array(0.3, dtype=float32)
  """
  out = {}
  for name, m in mean_saliency.items():
    k = max(1, math.ceil(rate * m.shape[-1]))
    out[name] = jax.lax.top_k(m, k)[0][-1]
  return out


def accumulate(state: State, saliencies: Mapping[str, jax.Array], weight: jax.Array | None = None) -> State:
  """Adds a training batch's soft saliencies to the epoch sums (`weight`: 0 for padding)."""
  sums = {}
  for name, s in saliencies.items():
    s = jax.lax.stop_gradient(s)
    if weight is not None:
      s = s * weight[:, None]
    sums[name] = state.sal_sum[name] + s.sum(0)
  batch = next(iter(saliencies.values())).shape[0]
  n = jnp.float32(batch) if weight is None else weight.sum()
  return state._replace(sal_sum=sums, count=state.count + n)


def refresh(state: State, epoch: int, epochs: int, target: float, *, every: int = 1) -> State:
  """At the end of epoch `epoch` (0-based): from epoch 1 on (every `every` epochs) the
  thresholds become `thresholds(mean saliencies, kept_rate(epoch))`; the sums restart."""
  if epoch >= 1 and epoch % every == 0 and float(state.count) > 0:
    mean = {k: v / state.count for k, v in state.sal_sum.items()}
    state = state._replace(thresholds=thresholds(mean, kept_rate(epoch, epochs, target)))
  return state._replace(sal_sum={k: jnp.zeros_like(v) for k, v in state.sal_sum.items()}, count=jnp.float32(0.0))


# -------------------------------------------------------------------- cost ----


def gate_macs(layers: tuple[GateLayer, ...]) -> int:
  """MACs of the gates per sample: two dense layers each (pooling, bias not counted)."""
  return int(sum(l.c_in * l.hidden + l.hidden * l.size for l in layers))


def per_sample_cost(graph: ChannelGraph, masks: Mapping[str, jax.Array], *, mode: str = "exact") -> jaxprune.Cost:
  """`jaxprune.cost` of every sample's masks (a channel runs where its gate is > 0)."""
  hard = {k: (jnp.asarray(v) > 0).astype(jnp.float32) for k, v in masks.items()}
  return jax.vmap(lambda m: jaxprune.cost(graph, m, mode=mode))(hard)


def paper_macs(graph: ChannelGraph, layers: tuple[GateLayer, ...], masks: Mapping[str, jax.Array]) -> jax.Array:
  """The official count (A10), per sample: a block's first conv reads its input dense
  and computes its open channels, the second reads those and computes its own open
  ones; stem, shortcut and classifier dense. The exact count is lower where a
  residual stream channel that no producer keeps is read (option-A zero padding)."""
  exact = per_sample_cost(graph, masks)
  dense = jaxprune.cost(graph)
  total = jnp.full(exact.macs.shape, dense.macs)
  for l in layers:
    n = (jnp.asarray(masks[l.name]) > 0).sum(-1)
    d = dense.per_layer[l.layer]["macs"]
    if graph.group(l.name).kind == "channel":  # a block's first conv
      total = total + d * (n / l.size - 1.0)
    else:  # its second: input and output gated
      total = total + exact.per_layer[l.layer]["macs"] - d
  return total


def check_weights(**weights: float) -> None:
  """Loss weights must be finite and >= 0."""
  for k, v in weights.items():
    if not (np.isfinite(v) and v >= 0):
      raise ValueError(f"ManiDP's {k} must be a finite number >= 0, got {v!r}")
