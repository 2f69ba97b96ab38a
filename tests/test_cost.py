"""`jaxprune.cost` against hand counts, XLA's own count, published numbers,
finite differences and a Python loop (per-sample)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import abstract_graph, custom_setup, jit_cost
from flax import nnx

import jaxprune

DN = ("NHWC", "HWIO", "NHWC")


def xla_flops(f, *args) -> float:
  """XLA's flop count of the lowered (unoptimized) computation."""
  ca = jax.jit(f).lower(*args).cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def out_size(n, k, s, d, pad):
  """Output length and (lo, hi) padding of one spatial axis, by the formula."""
  eff = d * (k - 1) + 1
  if pad == "VALID":
    lo = hi = 0
  elif pad == "SAME":
    o = -(-n // s)
    total = max((o - 1) * s + eff - n, 0)
    lo, hi = total // 2, total - total // 2
  else:
    lo, hi = pad
  return (n + lo + hi - eff) // s + 1, lo


def valid_taps(n, k, s, d, pad):
  """Kernel taps that land on real (non-padding) input, summed over outputs."""
  o, lo = out_size(n, k, s, d, pad)
  return sum(1 for i in range(o) for t in range(k) if 0 <= i * s + t * d - lo < n)


# ----------------------------------------------------------- single layers ----

CONV_CASES = [
  # (kernel hw, stride, dilation, padding, bias)
  ((3, 3), (1, 1), (1, 1), "VALID", False),
  ((3, 3), (1, 1), (1, 1), "VALID", True),
  ((1, 1), (1, 1), (1, 1), "VALID", False),
  ((3, 5), (2, 1), (2, 2), "VALID", True),
  ((3, 3), (2, 2), (1, 1), "SAME", False),
  ((5, 3), (1, 2), (1, 2), "SAME", True),
  ((3, 3), (1, 1), (1, 1), ((1, 2), (0, 1)), False),
]


@pytest.mark.parametrize("kernel,stride,dil,pad,bias", CONV_CASES)
def test_single_conv_by_hand_and_xla(kernel, stride, dil, pad, bias):
  H, W, cin, cout, B = 13, 11, 5, 4, 2
  p = {"kernel": jnp.ones((*kernel, cin, cout))}
  if bias:
    p["bias"] = jnp.ones((cout,))
  padding = pad if isinstance(pad, str) else list(pad)

  def f(p, x):
    y = jax.lax.conv_general_dilated(x, p["kernel"], stride, padding, rhs_dilation=dil, dimension_numbers=DN)
    return y + p["bias"] if "bias" in p else y

  x = jnp.ones((B, H, W, cin))
  pads = pad if not isinstance(pad, str) else (pad, pad)
  ho, _ = out_size(H, kernel[0], stride[0], dil[0], pads[0])
  wo, _ = out_size(W, kernel[1], stride[1], dil[1], pads[1])
  assert jax.eval_shape(f, p, x).shape == (B, ho, wo, cout)  # the formula is right

  c = jaxprune.cost(jaxprune.trace(f, p, x))
  macs = ho * wo * kernel[0] * kernel[1] * cin * cout
  assert float(c.macs) == macs
  assert float(c.params) == kernel[0] * kernel[1] * cin * cout + (cout if bias else 0)
  assert float(c.flops) == 2 * macs + (ho * wo * cout if bias else 0)
  assert float(c.volume) == ho * wo * cout
  assert float(c.channels) == 0  # input and output channels are never pruned

  # XLA skips the multiplies on padding: compare with the taps that land on
  # real input (== all taps for VALID), per sample.
  th = valid_taps(H, kernel[0], stride[0], dil[0], pads[0])
  tw = valid_taps(W, kernel[1], stride[1], dil[1], pads[1])
  xla = xla_flops(lambda x: f(p, x), x) / B
  assert xla == 2 * th * tw * cin * cout + (ho * wo * cout if bias else 0)
  if pad == "VALID":
    assert xla == float(c.flops)


@pytest.mark.parametrize("cin,groups,cout", [(6, 6, 6), (6, 6, 12), (6, 2, 4), (6, 3, 6)])
def test_depthwise_and_grouped_conv(cin, groups, cout):
  # depthwise: groups == cin (with 1 or 2 outputs per input channel);
  # grouped: every output reads cin / groups inputs.
  H, B = 9, 2
  k = jnp.ones((3, 3, cin // groups, cout))
  f = lambda p, x: jax.lax.conv_general_dilated(x, p, (1, 1), "VALID", dimension_numbers=DN, feature_group_count=groups)
  x = jnp.ones((B, H, H, cin))
  c = jaxprune.cost(jaxprune.trace(f, k, x))
  macs = (H - 2) ** 2 * 9 * (cin // groups) * cout
  assert float(c.macs) == macs
  assert float(c.params) == 9 * (cin // groups) * cout
  assert xla_flops(lambda x: f(k, x), x) / B == 2 * macs == float(c.flops)


def test_dense_with_bias():
  p = {"w": jnp.ones((6, 7)), "b": jnp.ones(7)}
  f = lambda p, x: x @ p["w"] + p["b"]
  x = jnp.ones((3, 6))
  c = jaxprune.cost(jaxprune.trace(f, p, x))
  assert float(c.macs) == 42 and float(c.params) == 49 and float(c.volume) == 7
  assert float(c.flops) == 2 * 42 + 7 == xla_flops(lambda x: f(p, x), x) / 3


def test_batchnorm_relu_and_pooling():
  # nnx.BatchNorm in eval mode computes (x - mean) * (rsqrt(var + eps) *
  # scale) + bias; the bracket is per channel (not per activation), so 3
  # flops per element (sub, mul, add). ReLU is 1 per element; max_pool counts
  # each pooled element (window 2x2 -> 4 per output), avg_pool the same plus
  # one division per output. Only scale and bias are parameters (nnx.Param);
  # mean and var are BatchStats.
  class M(nnx.Module):
    def __init__(self, rngs):
      self.bn = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
      y = nnx.relu(self.bn(x))
      return nnx.max_pool(y, (2, 2), strides=(2, 2)), nnx.avg_pool(y, (2, 2), strides=(2, 2))

  m = M(nnx.Rngs(0))
  m.eval()
  fn, state = jaxprune.functional(m)
  H, C = 8, 5
  c = jaxprune.cost(jaxprune.trace(fn, state, jnp.ones((2, H, H, C))))
  pooled = (H // 2) ** 2 * C
  assert float(c.macs) == 0 and float(c.volume) == 0
  assert float(c.params) == 2 * C
  assert float(c.flops) == 3 * H * H * C + H * H * C + 4 * pooled + (4 * pooled + pooled)
  assert float(jaxprune.cost(jaxprune.trace(fn, state, jnp.ones((2, H, H, C))), mode="paper").flops) == 0


def test_global_average_pool_and_plain_dict_params():
  # mean over H, W: one add per reduced element (+ one division per output);
  # with a plain dict every leaf is a parameter
  p = {"w": jnp.ones((4, 3)), "s": jnp.ones(4)}
  f = lambda p, x: (x * p["s"]).mean(axis=(1, 2)) @ p["w"]
  c = jaxprune.cost(jaxprune.trace(f, p, jnp.ones((2, 6, 6, 4))))
  assert float(c.params) == 16
  assert float(c.macs) == 12
  assert float(c.flops) == 36 * 4 + 36 * 4 + 4 + 2 * 12


# ---------------------------------------------------- masks: chains by hand ----


def _chain(groups2=1, depthwise=False):
  """conv1 (3 -> 8) -> relu -> conv2 (8 -> 6, `groups2` groups, or depthwise
  8 -> 8) -> relu -> conv3 (-> 4), 3x3 SAME, no bias, on 10x10."""
  c2 = 8 if depthwise else 6
  g2 = 8 if depthwise else groups2
  p = {
    "conv1": {"kernel": jnp.ones((3, 3, 3, 8))},
    "conv2": {"kernel": jnp.ones((3, 3, 8 // g2, c2))},
    "conv3": {"kernel": jnp.ones((3, 3, c2, 4))},
  }

  def f(p, x):
    conv = lambda x, k, g=1: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=g
    )
    x = jax.nn.relu(conv(x, p["conv1"]["kernel"]))
    x = jax.nn.relu(conv(x, p["conv2"]["kernel"], g2))
    return conv(x, p["conv3"]["kernel"])

  return f, p, jaxprune.trace(f, p, jnp.ones((2, 10, 10, 3)))


def test_soft_masks_conv_chain_by_hand():
  f, p, graph = _chain()
  assert [g.size for g in graph.groups] == [8, 6]
  rng = np.random.default_rng(0)
  g1, g2 = graph.groups
  m1, m2 = rng.uniform(size=8), rng.uniform(size=6)
  c = jaxprune.cost(graph, {g1.name: m1, g2.name: m2})
  HW, k2, s1, s2 = 100, 9, m1.sum(), m2.sum()
  macs = HW * k2 * (3 * s1 + s1 * s2 + s2 * 4)
  np.testing.assert_allclose(float(c.macs), macs, rtol=1e-5)
  np.testing.assert_allclose(float(c.params), k2 * (3 * s1 + s1 * s2 + s2 * 4), rtol=1e-5)
  np.testing.assert_allclose(float(c.volume), HW * (s1 + s2 + 4), rtol=1e-5)
  np.testing.assert_allclose(float(c.flops), 2 * macs + HW * (s1 + s2), rtol=1e-5)  # + 2 relus
  np.testing.assert_allclose(float(c.channels), s1 + s2, rtol=1e-6)
  np.testing.assert_allclose(float(c.per_layer["conv2"]["macs"]), HW * k2 * s1 * s2, rtol=1e-5)
  np.testing.assert_allclose(float(c.per_layer["conv2"]["params"]), k2 * s1 * s2, rtol=1e-5)
  cp = jaxprune.cost(graph, {g1.name: m1, g2.name: m2}, mode="paper")
  np.testing.assert_allclose(float(cp.flops), 2 * macs, rtol=1e-5)
  np.testing.assert_allclose(
    float(jaxprune.ratio(graph, {g1.name: m1, g2.name: m2}, "macs")), macs / (HW * k2 * (24 + 48 + 24)), rtol=1e-5
  )


def test_soft_masks_grouped_chain_by_hand():
  # conv2 has 2 groups of 4 inputs -> 3 outputs each: input c and c + 4 share
  # a kernel slice (group of 4), output o and o + 3 are kept together (group
  # of 3). MACs of conv2 = HW k^2 * sum over the 2 groups of (kept in) x (kept out).
  f, p, graph = _chain(groups2=2)
  assert [g.size for g in graph.groups] == [4, 3]
  g1, g2 = graph.groups
  m1, m2 = np.array([1.0, 0.2, 0.5, 0.0]), np.array([0.3, 1.0, 0.6])
  c = jaxprune.cost(graph, {g1.name: m1, g2.name: m2})
  s1, s2 = m1.sum(), m2.sum()
  np.testing.assert_allclose(float(c.macs), 100 * 9 * (3 * 2 * s1 + 2 * s1 * s2 + 2 * s2 * 4), rtol=1e-5)
  # params: conv1 3*9 per kept output (2 per mask entry), conv2's (4, 6)
  # kernel keeps s1 x 2*s2, conv3 keeps 2*s2 x 4
  np.testing.assert_allclose(float(c.params), 9 * (3 * 2 * s1 + s1 * 2 * s2 + 2 * s2 * 4), rtol=1e-5)


def test_soft_masks_depthwise_chain_by_hand():
  f, p, graph = _chain(depthwise=True)
  assert [g.size for g in graph.groups] == [8]  # depthwise ties its input and output
  m = np.linspace(0.0, 1.0, 8)
  c = jaxprune.cost(graph, {graph.groups[0].name: m})
  s = m.sum()
  np.testing.assert_allclose(float(c.macs), 100 * 9 * (3 * s + s + s * 4), rtol=1e-5)
  np.testing.assert_allclose(float(c.params), 9 * (3 * s + s + s * 4), rtol=1e-5)


# ------------------------------------------------------- literature counts ----


def resnet_cifar_hand(n):
  """MACs and params of a CIFAR ResNet (option A) from its definition."""
  macs = 32 * 32 * 9 * 3 * 16
  params = 9 * 3 * 16 + 2 * 16
  for hw, cin, c in ((32, 16, 16), (16, 16, 32), (8, 32, 64)):
    macs += hw * hw * 9 * (cin * c + c * c) + (n - 1) * 2 * hw * hw * 9 * c * c
    params += 9 * (cin * c + c * c) + (n - 1) * 2 * 9 * c * c + 2 * n * 2 * c
  return macs + 64 * 10, params + 64 * 10 + 10


@pytest.mark.parametrize(
  "name,n,lit_macs,lit_params",
  [
    # He et al. 2016 Table 6: 0.27M / 0.85M params; the MACs are the counts
    # quoted throughout the pruning literature (ResNet-56: 1.25E8 "FLOPs" in
    # Li et al. 2017, "Pruning Filters for Efficient ConvNets", Table 1).
    ("resnet20", 3, 40.6e6, 0.27e6),
    ("resnet56", 9, 125.5e6, 0.85e6),
  ],
)
def test_cifar_resnets_literature(name, n, lit_macs, lit_params):
  c = jit_cost(abstract_graph(name, 32, 10))(abstract_graph(name, 32, 10).ones())
  macs, params = resnet_cifar_hand(n)
  np.testing.assert_allclose(float(c["macs"]), macs, rtol=1e-6)
  np.testing.assert_allclose(float(c["params"]), params, rtol=1e-6)
  assert abs(float(c["macs"]) - lit_macs) < 0.1e6
  assert abs(float(c["params"]) - lit_params) < 0.005e6


def test_resnet50_imagenet_literature():
  # torchvision docs for resnet50 (IMAGENET1K_V1): 25,557,032 params,
  # 4.09 GFLOPS (their "FLOPS" are MACs) at 224x224.
  graph = abstract_graph("resnet50", 224, 1000)
  c = jit_cost(graph)(graph.ones())
  assert float(c["params"]) == 25_557_032
  assert abs(float(c["macs"]) - 4.09e9) < 0.01e9


def test_mobilenet_v1_literature():
  # Howard et al. 2017, Table 8: 1.0 MobileNet-224 has 569M mult-adds and
  # 4.2M parameters.
  graph = abstract_graph("mobilenet_v1", 224, 1000)
  c = jit_cost(graph)(graph.ones())
  assert abs(float(c["macs"]) - 569e6) < 1e6
  assert abs(float(c["params"]) - 4.2e6) < 0.05e6


def test_vgg16_cifar_literature():
  # Li et al. 2017, "Pruning Filters for Efficient ConvNets", Table 1:
  # VGG-16 on CIFAR-10 has 3.13E8 FLOPs (multiply-adds). Their head adds a
  # 512x512 linear layer (0.26M MACs) to this single-Linear VGG; the convs
  # are 313.2M by hand: sum of HW * 9 * cin * cout over the 13 layers.
  graph = abstract_graph("vgg16", 32, 10)
  c = jit_cost(graph)(graph.ones())
  convs, hw, cin = 0, 32, 3
  for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
    if item == "M":
      hw //= 2
    else:
      convs += hw * hw * 9 * cin * item
      cin = item
  np.testing.assert_allclose(float(c["macs"]), convs + 512 * 10, rtol=1e-6)
  assert abs(float(c["macs"]) - 313e6) < 0.5e6


# -------------------------------------------------------------- gradients ----


def _flat_fn(graph, unit):
  """cost in one unit as a function of one flat vector of all mask entries."""
  sizes = [g.size for g in graph.groups]
  cuts = np.cumsum(sizes)[:-1]

  def f(v):
    parts = jnp.split(v, cuts)
    return getattr(jaxprune.cost(graph, {g.name: p for g, p in zip(graph.groups, parts)}), unit)

  return jax.jit(f), sum(sizes)


@pytest.mark.parametrize("unit", ["macs", "params", "volume", "flops"])
def test_cost_gradient_matches_finite_differences(unit):
  # The cost is a polynomial of degree <= 2 in each mask entry (a conv whose
  # input and output are the same group, like a residual conv, gives a
  # square), so a central difference is exact up to float32 rounding.
  graph = custom_setup().graph
  f, n = _flat_fn(graph, unit)
  rng = np.random.default_rng(1)
  v = jnp.asarray(rng.uniform(0.2, 0.8, n), jnp.float32)
  grad = np.asarray(jax.jit(jax.grad(f))(v))
  eps = 0.25
  total = float(f(v))
  basis = np.eye(n, dtype=np.float32)
  fd = np.array([(float(f(v + eps * e)) - float(f(v - eps * e))) / (2 * eps) for e in basis])
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5 * total / eps)
  assert (grad > 0).all()  # every channel costs something in every unit here


# -------------------------------------------------------------- per sample ----


def test_per_sample_cost_vmap_equals_loop():
  graph = custom_setup().graph
  rng = np.random.default_rng(2)
  masks = {g.name: jnp.asarray(rng.uniform(size=(3, g.size)), jnp.float32) for g in graph.groups}
  batched = jax.jit(jax.vmap(lambda m: jaxprune.cost(graph, m)))(masks)
  for b in range(3):
    single = jaxprune.cost(graph, {k: v[b] for k, v in masks.items()})
    for unit in jaxprune.UNITS:
      np.testing.assert_allclose(float(getattr(batched, unit)[b]), float(getattr(single, unit)), rtol=1e-5)


def test_cost_rejects_batched_masks():
  graph = custom_setup().graph
  with pytest.raises(ValueError, match="vmap"):
    jaxprune.cost(graph, graph.ones((2,)))
  with pytest.raises(ValueError, match="mode"):
    jaxprune.cost(graph, mode="fast")
  with pytest.raises(ValueError, match="unit"):
    jaxprune.ratio(graph, graph.ones(), "joules")


# ----------------------------------------------------------------- jit ----


def test_cost_same_under_jit_and_no_recompile():
  graph = custom_setup().graph
  rng = np.random.default_rng(3)
  traces = []

  def f(masks):
    traces.append(1)
    c = jaxprune.cost(graph, masks)
    return {u: getattr(c, u) for u in jaxprune.UNITS}

  jitted = jax.jit(f)
  for _ in range(3):
    masks = {g.name: jnp.asarray(rng.uniform(size=g.size), jnp.float32) for g in graph.groups}
    eager = jaxprune.cost(graph, masks)
    jit_out = jitted(masks)
    for u in jaxprune.UNITS:
      np.testing.assert_allclose(float(jit_out[u]), float(getattr(eager, u)), rtol=1e-6)
  assert len(traces) == 1
  assert jitted._cache_size() == 1


# ------------------------------------------------------ property (hypothesis) ----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def masks_for(draw, graph, hard):
  out = {}
  for g in graph.groups:
    if hard:
      vals = [float(b) for b in draw(st.lists(st.booleans(), min_size=g.size, max_size=g.size))]
    else:
      vals = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=g.size, max_size=g.size))
    out[g.name] = np.asarray(vals, np.float32)
  return out


PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(data=st.data(), hard=st.booleans())
def test_property_cost_between_zero_and_dense(data, hard):
  graph = custom_setup().graph
  f = jit_cost(graph)
  dense = f(graph.ones())
  c = f(data.draw(masks_for(graph, hard)))
  for u in jaxprune.UNITS:
    assert 0.0 <= float(c[u]) <= float(dense[u]) * (1 + 1e-6), u


@PROPERTY
@given(data=st.data(), hard=st.booleans())
def test_property_more_channels_never_cost_less(data, hard):
  graph = custom_setup().graph
  f = jit_cost(graph)
  small = data.draw(masks_for(graph, hard))
  grow = data.draw(masks_for(graph, hard))
  # big >= small entrywise: hard -> union, soft -> move toward 1
  big = {k: v + grow[k] * (1 - v) for k, v in small.items()}
  c_small, c_big = f(small), f(big)
  for u in jaxprune.UNITS:
    assert float(c_big[u]) >= float(c_small[u]) * (1 - 1e-6) - 1e-3, u
