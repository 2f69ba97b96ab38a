"""`masked` and `slim`: the masked network equals the physically slimmed one.

The two are computed independently (multiplying activations by masks inside
the original network vs. running the original code on smaller arrays), so
their equality checks both; the slimmed parameter count is counted from the
slimmed arrays themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import custom_setup, jit_masked, jit_merged, param_count, random_hard_masks, zoo_setup
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxprune


def assert_close(a, b, scale=None):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(1.0, float(np.abs(b).max())) if scale is None else scale
  assert a.shape == b.shape
  assert np.abs(a - b).max() < 1e-4 * scale, (np.abs(a - b).max(), scale)


def check_masked_equals_slimmed(setup, seed):
  model, fn, state, graph, x = setup
  masks = random_hard_masks(graph, np.random.default_rng(seed))
  out_masked = jit_masked(fn, graph)(state, masks, x)
  small = jaxprune.slim(state, graph, masks)
  # the slimmed model, built with nnx.merge, runs and gives the same outputs
  out_small = jit_merged(nnx.graphdef(model))(small, x)
  assert_close(out_masked, out_small)
  # the masks matter: the output moved
  out_full = jit_masked(fn, graph)(state, graph.ones(), x)
  assert np.abs(np.asarray(out_full) - np.asarray(out_small)).max() > 1e-3
  # cost's parameter count == the slimmed nnx.Param elements, and something went
  assert float(jaxprune.cost(graph, masks).params) == param_count(small)
  assert param_count(small) < param_count(state)
  return masks, small


ZOO = [
  ("resnet20", 32),
  ("resnet32", 32),
  ("vgg11", 32),
  ("mobilenet_v1_cifar", 32),
  ("resnet18", 64),
  ("mobilenet_v1", 64),
]


@pytest.mark.parametrize("name,hw", ZOO)
def test_masked_equals_slimmed_zoo(name, hw):
  check_masked_equals_slimmed(zoo_setup(name, hw), seed=sum(map(ord, name)))


def test_masked_equals_slimmed_wide_resnet():
  # ChipNet's WRN family at depth 14, width 2: projection shortcuts on every stage
  # (16 -> 16 included only when the width changes) instead of option-A padding.
  from custom_models import Setup, build, input_

  from jaxprune import models

  model = build(lambda rngs: models.wide_resnet(14, 2, num_classes=10, rngs=rngs))
  fn, state = jaxprune.functional(model)
  x = input_((2, 16, 16, 3))
  graph = jaxprune.trace(fn, state, x)
  # Projections decouple each stage's residual stream from the one before: groups are
  # the stem, the 3 streams and each block's inner conv (2 blocks x 3 stages).
  assert sorted(g.size for g in graph.groups) == [16, 32, 32, 32, 64, 64, 64, 128, 128, 128]
  check_masked_equals_slimmed(Setup(model, fn, state, graph, x), seed=14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_equals_slimmed_custom(seed):
  check_masked_equals_slimmed(custom_setup(), seed)


def test_custom_slim_keeps_pad_and_split_channels():
  setup = custom_setup()
  graph = setup.graph
  masks = random_hard_masks(graph, np.random.default_rng(5))
  _, small = check_masked_equals_slimmed(setup, 5)
  # p's input axis: the 8 residual-stream channels (4 mask entries, each a
  # pair o, o + 4 of the grouped conv's outputs) that remain, plus the 3
  # channels facing the static pad
  (stream,) = [g for g in graph.groups if any(m.leaf == "p" and m.axis == 1 for m in g.members)]
  kept = int(np.asarray(masks[stream.name]).sum())
  assert small["params"]["p"].shape[1] == 2 * kept + 3
  # q's outputs pass a static split: never slimmed
  assert small["params"]["q"]["kernel"].shape[-1] == 4 and small["params"]["qq"]["kernel"].shape[2] == 4
  # ZeroPad vectors are slimmed with the stream they pad
  for leaf in ("lo", "hi"):
    (grp,) = [g for g in graph.groups if any(m.leaf == leaf for m in g.members)]
    assert small["other"][leaf].shape[0] == int(np.asarray(masks[grp.name]).sum())


def test_expand_zeroes_exactly_the_removed_weights():
  # Zeroing every weight of the removed channels (BN statistics included)
  # silences them the same way the masks do; expand is jit-able.
  _, fn, state, graph, x = custom_setup()
  masks = random_hard_masks(graph, np.random.default_rng(7))
  zero = jax.jit(lambda s, m: jax.tree.map(lambda v, e: v * e, s, jaxprune.expand(graph, m)))
  zeroed = zero(state, masks)
  out = jit_masked(fn, graph)(zeroed, graph.ones(), x)
  assert_close(out, jit_masked(fn, graph)(state, masks, x))
  # expand of hard masks is 0/1; its ones over the parameter leaves are the
  # parameters that remain
  leaves = jax.tree_util.tree_leaves(jaxprune.expand(graph, masks))
  assert all(set(np.unique(np.asarray(e))) <= {0.0, 1.0} for e in leaves)
  kept = sum(float(np.asarray(e).sum()) for e, p in zip(leaves, graph.is_param) if p)
  assert kept == float(jaxprune.cost(graph, masks).params)


# -------------------------------------------------------------- per sample ----


def test_per_sample_masks_equal_each_sample_alone():
  model, fn, state, graph, _ = custom_setup()
  x = jnp.asarray(np.random.default_rng(11).normal(size=(3, 16, 16, 3)), jnp.float32)
  rng = np.random.default_rng(12)
  per = [random_hard_masks(graph, rng) for _ in range(3)]
  batched = {k: jnp.stack([m[k] for m in per]) for k in per[0]}
  g = jit_masked(fn, graph)
  out = g(state, batched, x)
  graphdef = nnx.graphdef(model)
  for b in range(3):
    alone = g(state, per[b], x[b : b + 1])
    assert_close(out[b : b + 1], alone)
    small = jaxprune.slim(state, graph, per[b])
    assert_close(out[b : b + 1], jit_merged(graphdef)(small, x[b : b + 1]))
  # and the samples really got different networks
  assert np.abs(np.asarray(out[0]) - np.asarray(g(state, per[1], x[:1])[0])).max() > 1e-3


def test_per_sample_soft_masks_scale_activations_per_sample():
  _, fn, state, graph, x = custom_setup()
  rng = np.random.default_rng(13)
  soft = [{g.name: jnp.asarray(rng.uniform(size=g.size), jnp.float32) for g in graph.groups} for _ in range(2)]
  batched = {k: jnp.stack([m[k] for m in soft]) for k in soft[0]}
  g = jit_masked(fn, graph)
  out = g(state, batched, x)
  for b in range(2):
    assert_close(out[b : b + 1], g(state, soft[b], x[b : b + 1]))


def test_per_sample_batch_mismatch_is_a_clear_error():
  _, fn, state, graph, x = custom_setup()  # batch 2
  with pytest.raises(ValueError, match="batch"):
    jaxprune.masked(fn, graph)(state, graph.ones((3,)), x)
  with pytest.raises(ValueError, match="at most one batch axis"):
    jaxprune.masked(fn, graph)(state, graph.ones((2, 2)), x)


# -------------------------------------------------------------- gradients ----


def test_gradient_reaches_every_group_through_masked():
  _, fn, state, graph, x = custom_setup()
  g = jaxprune.masked(fn, graph)
  rng = np.random.default_rng(14)
  masks = {k.name: jnp.asarray(rng.uniform(0.3, 1.0, k.size), jnp.float32) for k in graph.groups}
  grads = jax.jit(jax.grad(lambda m: (g(state, m, x) ** 2).sum()))(masks)
  for name, v in grads.items():
    assert np.isfinite(np.asarray(v)).all()
    assert np.abs(np.asarray(v)).max() > 0, name


def test_gradient_through_masked_matches_finite_difference():
  # d/dm of sum(out * r) (random direction r) for the first entry of every
  # group, against a one-sided difference below m = 1 (ReLU and max-pool
  # kinks make larger steps unreliable; 1e-3 is fine in float32 here)
  _, fn, state, graph, x = custom_setup()
  g = jit_masked(fn, graph)
  r = jnp.asarray(np.random.default_rng(15).normal(size=(2, 10)), jnp.float32)
  loss = lambda m: (g(state, m, x) * r).sum()
  base = graph.ones()
  grads = jax.grad(loss)(base)
  eps = 1e-3
  for grp in graph.groups:
    down = {**base, grp.name: base[grp.name].at[0].add(-eps)}
    fd = (float(loss(base)) - float(loss(down))) / eps
    np.testing.assert_allclose(float(grads[grp.name][0]), fd, rtol=1e-2, atol=5e-3)


# ----------------------------------------------------------------- jit ----


def test_masked_same_under_jit_and_no_recompile_on_new_values():
  _, fn, state, graph, x = custom_setup()
  calls = []

  def counting_fn(s, x):
    calls.append(1)
    return fn(s, x)

  masked = jaxprune.masked(counting_fn, graph)
  jitted = jax.jit(masked)
  rng = np.random.default_rng(16)
  all_masks = [
    random_hard_masks(graph, rng)
    if i % 2
    else {k.name: jnp.asarray(rng.uniform(size=k.size), jnp.float32) for k in graph.groups}
    for i in range(3)
  ]
  outs = [jitted(state, m, x) for m in all_masks]
  # new mask values: no new trace of fn, no new executable
  assert len(calls) == 1
  assert jitted._cache_size() == 1
  for m, out in zip(all_masks[:2], outs):
    assert_close(out, masked(state, m, x))


# ---------------------------------------------------------------- errors ----


def test_wrong_mask_names_and_shapes():
  _, fn, state, graph, x = custom_setup()
  name = graph.groups[0].name
  bad = dict(graph.ones())
  bad["nonexistent"] = bad.pop(name)
  for f in (
    lambda m: jaxprune.cost(graph, m),
    lambda m: jaxprune.masked(fn, graph)(state, m, x),
    lambda m: jaxprune.slim(state, graph, m),
  ):
    with pytest.raises(ValueError, match="nonexistent") as err:
      f(bad)
    assert name in str(err.value)  # the missing one is named too
  wrong = {**graph.ones(), name: jnp.ones(graph.groups[0].size + 1)}
  with pytest.raises(ValueError, match=rf"{name}.*expected \(\.\.\., {graph.groups[0].size}\)"):
    jaxprune.cost(graph, wrong)
  with pytest.raises(TypeError, match="dict"):
    jaxprune.cost(graph, [1.0])


def test_slim_rejects_soft_batched_and_fully_masked():
  _, fn, state, graph, x = custom_setup()
  soft = {g.name: jnp.full(g.size, 0.5) for g in graph.groups}
  with pytest.raises(ValueError, match="hard"):
    jaxprune.slim(state, graph, soft)
  with pytest.raises(ValueError, match="per-sample|batch"):
    jaxprune.slim(state, graph, graph.ones((2,)))
  target = graph.groups[2]
  dead = {**graph.ones(), target.name: jnp.zeros(target.size)}
  with pytest.raises(ValueError, match=target.name):
    jaxprune.slim(state, graph, dead)


def test_slim_rejects_other_variables():
  _, fn, state, graph, x = custom_setup()
  small = jaxprune.slim(state, graph, random_hard_masks(graph, np.random.default_rng(0)))
  with pytest.raises(ValueError, match="shape"):
    jaxprune.slim(small, graph, graph.ones())


# ------------------------------------------------------ property (hypothesis) ----


@st.composite
def hard_masks(draw, graph):
  out = {}
  for g in graph.groups:
    bits = draw(st.lists(st.booleans(), min_size=g.size, max_size=g.size))
    keep = draw(st.integers(0, g.size - 1))
    bits[keep] = True  # every group keeps one
    out[g.name] = jnp.asarray(np.array(bits, np.float32))
  return out


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_masked_equals_slimmed(data):
  model, fn, state, graph, x = custom_setup()
  masks = data.draw(hard_masks(graph))
  out_masked = jit_masked(fn, graph)(state, masks, x)
  small = jaxprune.slim(state, graph, masks)
  out_small = jit_merged(nnx.graphdef(model))(small, x)
  assert_close(out_masked, out_small)
  assert float(jaxprune.cost(graph, masks).params) == param_count(small)


# ---------------------------------------------------------- nested jaxprs ----


@pytest.mark.parametrize("kind", ["jit", "checkpoint", "custom_vjp"])
def test_masked_reaches_inside_nested_calls(kind):
  _, fn, state, graph, x = custom_setup()
  if kind == "jit":
    wrapped = jax.jit(fn)
  elif kind == "checkpoint":
    wrapped = jax.checkpoint(fn)
  else:
    wrapped = jax.custom_vjp(lambda s, x: fn(s, x))
    wrapped.defvjp(lambda s, x: jax.vjp(fn, s, x), lambda vjp, g: vjp(g))
  wgraph = jaxprune.trace(wrapped, state, x)
  masks = random_hard_masks(graph, np.random.default_rng(21))
  out = jax.jit(jaxprune.masked(wrapped, wgraph))(state, masks, x)
  assert_close(out, jit_masked(fn, graph)(state, masks, x))


def test_static_channel_pad_on_a_residual_shortcut():
  # The PyTorch-style option-A shortcut, jnp.pad(x, 2 zeros each side of the
  # channel axis), added to a conv with 12 outputs: the conv's outputs 0, 1,
  # 10, 11 face the pad and stay; 2..9 are the stem's 8 channels, prunable
  # together with it. A pure function of a dict: every leaf is a parameter.
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def f(p, x):
    h = jax.nn.relu(conv(x, p["stem"]) + p["b0"])
    y = conv(h, p["conv"]) + jnp.pad(h, ((0, 0), (0, 0), (0, 0), (2, 2)))
    return jax.nn.relu(y).mean(axis=(1, 2)) @ p["fc"]

  rng = np.random.default_rng(0)
  p = {
    "stem": rng.normal(size=(3, 3, 3, 8)),
    "b0": rng.normal(size=8),
    "conv": rng.normal(size=(3, 3, 8, 12)) * 0.2,
    "fc": rng.normal(size=(12, 5)),
  }
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  graph = jaxprune.trace(f, p, x)
  (grp,) = graph.groups
  places = {(m.leaf, m.axis, int(i)) for m in grp.members for i in m.index}
  assert places == (
    {("stem", 3, c) for c in range(8)}
    | {("b0", 0, c) for c in range(8)}
    | {("conv", 2, c) for c in range(8)}
    | {("conv", 3, c) for c in range(2, 10)}
    | {("fc", 0, c) for c in range(2, 10)}
  )
  mask = np.ones(8, np.float32)
  mask[[1, 4, 5]] = 0.0
  masks = {grp.name: jnp.asarray(mask)}
  small = jaxprune.slim(p, graph, masks)
  assert small["conv"].shape == (3, 3, 5, 9) and small["fc"].shape == (9, 5)
  assert_close(jax.jit(f)(small, x), jax.jit(jaxprune.masked(f, graph))(p, masks, x))
  assert float(jaxprune.cost(graph, masks).params) == sum(np.size(v) for v in jax.tree.leaves(small))


def test_mask_values_and_dtypes_are_checked():
  setup = custom_setup()
  graph = setup.graph
  g0 = graph.groups[0]
  for bad, msg in ((1.5, "outside"), (-0.1, "outside"), (np.nan, "non-finite")):
    masks = {**graph.ones(), g0.name: jnp.ones(g0.size).at[0].set(bad)}
    with pytest.raises(ValueError, match=msg):
      jaxprune.cost(graph, masks)
  with pytest.raises(TypeError, match="dtype"):
    jaxprune.cost(graph, {**graph.ones(), g0.name: np.array(["a"] * g0.size)})
  ok = {**graph.ones(), g0.name: np.ones(g0.size, bool)}
  assert float(jaxprune.cost(graph, ok).macs) == float(jaxprune.cost(graph).macs)
