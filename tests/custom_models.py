"""Custom models and helpers shared by the core's tests.

Models are built abstractly (``nnx.eval_shape``) and filled with numpy random
values: compiling jax.random initializers costs about a second per kernel
shape on a small CPU, more than the tests themselves.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune


class ZeroPad(nnx.Variable):
  """A vector of zeros whose length is a channel count (option-A shortcut)."""


class DepthwiseConv(nnx.Module):
  """3x3 depthwise conv whose group count is read from the input."""

  def __init__(self, channels: int):
    self.kernel = nnx.Param(jnp.zeros((3, 3, 1, channels)))

  def __call__(self, x):
    return jax.lax.conv_general_dilated(
      x, self.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
    )


def _bn(c, rngs):
  return nnx.BatchNorm(c, rngs=rngs)


class Custom(nnx.Module):
  """Every structure the core must follow, on a 16x16x3 input.

  stem 3x3 conv (8) -> concat[conv a (6) + BN, 1x1 conv b with bias (4)] (10)
  -> depthwise 3x3 (10) -> grouped conv (10 -> 8, 2 groups) -> residual
  x + BN(conv r(x)) + conv qq(q) (8), where the side branch q = 1x1 conv of
  the stem output (4) is split/sliced/concatenated into a channel permutation
  -> static jnp.pad of the channel axis by (1, 2) (11) -> transpose to NCHW,
  conv p with an OIHW kernel (11 -> 6), transpose back -> conv w stride 2
  (12) added to the option-A shortcut [lo zeros (2) | x[:, ::2, ::2] (6) | hi
  zeros (4)] -> max pool 2 -> avg pool 2 -> flatten (2*2*12 = 48) -> fc1
  (16) -> fc2 (10).
  """

  def __init__(self, rngs: nnx.Rngs):
    conv = lambda i, o, **k: nnx.Conv(i, o, (3, 3), use_bias=False, rngs=rngs, **k)
    self.stem = conv(3, 8)
    self.bn0 = _bn(8, rngs)
    self.a = conv(8, 6)
    self.bna = _bn(6, rngs)
    self.b = nnx.Conv(8, 4, (1, 1), use_bias=True, rngs=rngs)
    self.dw = DepthwiseConv(10)
    self.bnd = _bn(10, rngs)
    self.g = conv(10, 8, feature_group_count=2)
    self.bng = _bn(8, rngs)
    self.r = conv(8, 8)
    self.bnr = _bn(8, rngs)
    self.q = nnx.Conv(8, 4, (1, 1), use_bias=False, rngs=rngs)
    self.qq = nnx.Conv(4, 8, (1, 1), use_bias=False, rngs=rngs)
    self.p = nnx.Param(jnp.zeros((6, 11, 3, 3)))  # OIHW, for an NCHW conv
    self.bnp = _bn(6, rngs)
    self.w = conv(6, 12, strides=(2, 2))
    self.bnw = _bn(12, rngs)
    self.lo = ZeroPad(jnp.zeros((2,)))
    self.hi = ZeroPad(jnp.zeros((4,)))
    self.fc1 = nnx.Linear(48, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.stem(x)))
    q = nnx.relu(self.q(x))
    q1, q2 = jnp.split(q, [1], axis=-1)
    q = jnp.concatenate([q2[..., 1:], q2[..., :1], q1], axis=-1)  # channel permutation
    x = jnp.concatenate([nnx.relu(self.bna(self.a(x))), nnx.relu(self.b(x))], axis=-1)
    x = nnx.relu(self.bnd(self.dw(x)))
    x = nnx.relu(self.bng(self.g(x)))
    x = nnx.relu(x + self.bnr(self.r(x)) + self.qq(q))
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (1, 2)))
    x = x.transpose(0, 3, 1, 2)
    x = jax.lax.conv_general_dilated(x, self.p[...], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    x = nnx.relu(self.bnp(x.transpose(0, 2, 3, 1)))
    s = x[:, ::2, ::2, :]
    lead = s.shape[:-1]
    sc = jnp.concatenate(
      [jnp.broadcast_to(self.lo[...], lead + self.lo.shape), s, jnp.broadcast_to(self.hi[...], lead + self.hi.shape)],
      axis=-1,
    )
    x = nnx.relu(self.bnw(self.w(x)) + sc)
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.fc2(x)


class Tiny(nnx.Module):
  """conv1 (3 -> 4) + BN + ReLU -> conv2 (4 -> 5) + ReLU -> global avg pool -> fc (5 -> 3)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = _bn(4, rngs)
    self.conv2 = nnx.Conv(4, 5, (3, 3), use_bias=True, rngs=rngs)
    self.fc = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.conv2(x))
    return self.fc(x.mean(axis=(1, 2)))


def fill(abstract: nnx.Module, seed: int = 0) -> nnx.Module:
  """Numpy random values for every variable of an abstract model, eval mode.

  Kernels get std sqrt(2 / fan_in) (fan_in = all axes but the output one; an
  OIHW kernel is treated the same, which is only a scale), BN scale/var are
  in [0.5, 1.5], biases and means small; ZeroPad vectors stay zero.
  """
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, var in nnx.to_flat_state(state):
    shape, leaf = var.get_value().shape, path[-1]
    if type(var).__name__ == "ChannelIndex":
      flat[path] = var.replace(value=jnp.arange(shape[0], dtype=jnp.int32))  # positions
      continue
    if isinstance(var, ZeroPad) or type(var).__name__ == "ZeroPad":
      value = np.zeros(shape)
    elif len(shape) >= 2:
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    flat[path] = var.replace(value=jnp.asarray(value, jnp.float32))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  model.eval()
  return model


def build(cls_or_factory, seed: int = 0, **kwargs) -> nnx.Module:
  """An eval-mode model with numpy random values (no jax.random compile)."""
  abstract = nnx.eval_shape(lambda: cls_or_factory(rngs=nnx.Rngs(0), **kwargs))
  return fill(abstract, seed)


def zoo(name: str, seed: int = 0, num_classes: int = 10, **kwargs) -> nnx.Module:
  from jaxprune import models

  return build(lambda rngs: models.create(name, num_classes=num_classes, rngs=rngs, **kwargs), seed)


def abstract_zoo(name: str, num_classes: int = 10, **kwargs):
  """(fn, abstract state) of a zoo model: enough for trace and cost."""
  from jaxprune import models

  model = nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0), **kwargs))
  model.eval()
  return jaxprune.functional(model)


def param_count(state) -> int:
  """Elements of the parameters of a jaxprune.functional variables dict."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state["params"])))


def random_hard_masks(graph, rng: np.random.Generator, p_keep: float = 0.5) -> dict:
  """Random 0/1 masks; every group keeps at least one (random) channel."""
  out = {}
  for g in graph.groups:
    m = (rng.random(g.size) < p_keep).astype(np.float32)
    m[rng.integers(g.size)] = 1.0
    out[g.name] = jnp.asarray(m)
  return out


def input_(shape, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ----------------------------------------------------- shared, cached setups ---
# Cached per process so the test modules share traced graphs and compiled
# functions (each cache key is traced/built once per pytest session).


class Setup(NamedTuple):
  model: nnx.Module
  fn: Any
  state: Any
  graph: jaxprune.ChannelGraph
  x: jax.Array


@functools.lru_cache(maxsize=None)
def custom_setup(batch: int = 2) -> Setup:
  model = build(Custom)
  fn, state = jaxprune.functional(model)
  x = input_((batch, 16, 16, 3))
  return Setup(model, fn, state, jaxprune.trace(fn, state, x), x)


@functools.lru_cache(maxsize=None)
def tiny_setup() -> Setup:
  model = build(Tiny, seed=3)
  fn, state = jaxprune.functional(model)
  x = input_((2, 8, 8, 3), seed=4)
  return Setup(model, fn, state, jaxprune.trace(fn, state, x), x)


@functools.lru_cache(maxsize=None)
def zoo_setup(name: str, hw: int = 32, batch: int = 2) -> Setup:
  model = zoo(name, num_classes=10)
  fn, state = jaxprune.functional(model)
  x = input_((batch, hw, hw, 3))
  return Setup(model, fn, state, jaxprune.trace(fn, state, x), x)


@functools.lru_cache(maxsize=None)
def abstract_graph(name: str, hw: int, num_classes: int) -> jaxprune.ChannelGraph:
  """Trace of an abstract (eval_shape) zoo model: no arrays are allocated."""
  fn, state = abstract_zoo(name, num_classes=num_classes)
  return jaxprune.trace(fn, state, jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32))


@functools.lru_cache(maxsize=None)
def jit_cost(graph: jaxprune.ChannelGraph, mode: str = "exact"):
  """One compiled function: masks -> {unit: value} (per_layer dropped)."""

  def f(masks):
    c = jaxprune.cost(graph, masks, mode=mode)
    return {u: getattr(c, u) for u in jaxprune.UNITS}

  return jax.jit(f)


def structure(graph: jaxprune.ChannelGraph) -> frozenset:
  """The graph as plain sets: groups of channels, each channel the set of
  (leaf, axis, index) places it lives in. Independent of names and order."""
  groups = []
  for g in graph.groups:
    chans: dict[int, set] = {}
    for m in g.members:
      for i, p in zip(m.index, m.position):
        chans.setdefault(int(p), set()).add((m.leaf, m.axis, int(i)))
    assert sorted(chans) == list(range(g.size)), g.name
    groups.append(frozenset(frozenset(c) for c in chans.values()))
  return frozenset(groups)


@functools.lru_cache(maxsize=None)
def jit_masked(fn, graph: jaxprune.ChannelGraph):
  """A shared jitted `masked(fn, graph)` (compiled once per input shapes)."""
  return jax.jit(jaxprune.masked(fn, graph))


@functools.lru_cache(maxsize=None)
def jit_merged(graphdef):
  """(variables, x) -> the eval-mode model, jitted: runs slimmed variables."""
  return jax.jit(jaxprune.nnx_bridge.apply_fn(graphdef))
