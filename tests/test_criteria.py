"""`jaxprune.criteria` against hand computations on a tiny network.

Tiny: conv1 (3x3, 3 -> 4, no bias) + BN + ReLU -> conv2 (3x3, 4 -> 5, bias)
+ ReLU -> global mean -> fc (5 -> 3). By hand, its groups are conv1's 4
output channels (conv1.kernel axis 3, bn1.*, conv2.kernel axis 2) and
conv2's 5 (conv2.kernel axis 3, conv2.bias, fc.kernel axis 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import Tiny, build, custom_setup, tiny_setup

import jaxprune
from jaxprune import criteria

DN = ("NHWC", "HWIO", "NHWC")


def jitted(crit, graph):
  """The criterion compiled once (eagerly, every small op compiles on its own)."""
  return jax.jit(lambda variables: crit(variables, graph))


def positions(graph, group_name, leaf, axis):
  """Group position of each index of `leaf` along `axis` (channel -> mask entry)."""
  for m in graph.group(group_name).members:
    if m.leaf == leaf and m.axis == axis:
      out = np.full(graph.leaf_shapes[graph.leaf_names.index(leaf)][axis], -1)
      out[m.index] = m.position
      return out
  raise AssertionError(f"{leaf} axis {axis} not in {group_name}")


def by_position(graph, group_name, leaf, axis, per_index):
  """Reorder a per-channel-index vector into group positions."""
  pos = positions(graph, group_name, leaf, axis)
  out = np.zeros(graph.group(group_name).size)
  out[pos] = per_index
  return out


@pytest.fixture(scope="module")
def tiny():
  setup = tiny_setup()
  graph = setup.graph
  assert sorted(g.size for g in graph.groups) == [4, 5]
  g1 = next(g.name for g in graph.groups if g.size == 4)
  g2 = next(g.name for g in graph.groups if g.size == 5)
  return setup, g1, g2


def _np(setup):
  m = setup.model
  return {
    "k1": np.asarray(m.conv1.kernel[...]),
    "k2": np.asarray(m.conv2.kernel[...]),
    "wfc": np.asarray(m.fc.kernel[...]),
    "gamma": np.asarray(m.bn1.scale[...]),
  }


def test_l1_and_l2_by_hand(tiny):
  setup, g1, g2 = tiny
  w = _np(setup)
  graph = setup.graph
  for crit, red in ((criteria.l1, lambda a: np.abs(a).sum(1)), (criteria.l2, lambda a: np.sqrt((a**2).sum(1)))):
    scores = jitted(crit, graph)(setup.state)
    # group 1: conv1's filters (out axis) and conv2's input slices, each
    # normalized by its own mean; the 1-D BN vectors are not kernels
    s1 = red(np.moveaxis(w["k1"], 3, 0).reshape(4, -1))
    s2 = red(np.moveaxis(w["k2"], 2, 0).reshape(4, -1))
    hand = s1 / s1.mean() + s2 / s2.mean()
    np.testing.assert_allclose(np.asarray(scores[g1]), by_position(graph, g1, "conv1.kernel", 3, hand), rtol=1e-5)
    # group 2: conv2's filters and fc's rows (the bias is 1-D)
    t1 = red(np.moveaxis(w["k2"], 3, 0).reshape(5, -1))
    t2 = red(w["wfc"])
    hand = t1 / t1.mean() + t2 / t2.mean()
    np.testing.assert_allclose(np.asarray(scores[g2]), by_position(graph, g2, "conv2.kernel", 3, hand), rtol=1e-5)


def test_bn_scale_picks_abs_gamma(tiny):
  setup, g1, g2 = tiny
  graph = setup.graph
  state = jax.tree.map(lambda v: v, setup.state)
  gamma = np.array([0.7, -1.9, 0.05, 1.2], np.float32)  # a negative and a tiny one
  state["params"]["bn1"]["scale"] = jnp.asarray(gamma)
  scores = jitted(criteria.bn_scale, graph)(state)
  hand = np.abs(gamma) / np.abs(gamma).mean()
  np.testing.assert_allclose(np.asarray(scores[g1]), by_position(graph, g1, "bn1.scale", 0, hand), rtol=1e-5)
  # group 2 has no BatchNorm: falls back to l1
  np.testing.assert_allclose(np.asarray(scores[g2]), np.asarray(jitted(criteria.l1, graph)(state)[g2]), rtol=1e-6)


def test_fpgm_lowest_at_geometric_median():
  # Channel 2's weights sit at the origin of a point set symmetric around it
  # (a, -a, 0, b with b orthogonal to a), in both conv1's filters and conv2's
  # input slices: it is the geometric median, closest to all others.
  model = build(Tiny, seed=5)
  rng = np.random.default_rng(0)
  a1, b1 = rng.normal(size=27), rng.normal(size=27)
  b1 -= a1 * (a1 @ b1) / (a1 @ a1)
  a2, b2 = rng.normal(size=45), rng.normal(size=45)
  b2 -= a2 * (a2 @ b2) / (a2 @ a2)
  k1 = np.stack([a1, -a1, np.zeros(27), b1], -1).reshape(3, 3, 3, 4)
  k2 = np.moveaxis(np.stack([a2, -a2, np.zeros(45), b2], 0).reshape(4, 3, 3, 5), 0, 2)
  model.conv1.kernel[...] = jnp.asarray(k1, jnp.float32)
  model.conv2.kernel[...] = jnp.asarray(k2, jnp.float32)
  fn, state = jaxprune.functional(model)
  graph = jaxprune.trace(fn, state, jnp.ones((1, 8, 8, 3)))
  g1 = next(g.name for g in graph.groups if g.size == 4)
  scores = np.asarray(jitted(criteria.fpgm, graph)(state)[g1])
  pos = positions(graph, g1, "conv1.kernel", 3)
  assert np.argmin(scores) == pos[2]
  # by hand: features = [conv1 filter / ||k1||, conv2 slice / ||k2||], score =
  # sum of Euclidean distances to the other channels
  f = np.concatenate(
    [
      np.moveaxis(k1, 3, 0).reshape(4, -1) / np.linalg.norm(k1),
      np.moveaxis(k2, 2, 0).reshape(4, -1) / np.linalg.norm(k2),
    ],
    1,
  )
  hand = np.array([sum(np.linalg.norm(f[i] - f[j]) for j in range(4)) for i in range(4)])
  np.testing.assert_allclose(scores, by_position(graph, g1, "conv1.kernel", 3, hand), rtol=1e-4)


def test_taylor_by_hand(tiny):
  # |dL_b/du| for a multiplier u on each channel's activation where the next
  # layer reads it (= sum over the channel of activation x gradient),
  # averaged over the batch.
  setup, g1, g2 = tiny
  m, graph, x = setup.model, setup.graph, setup.x
  y = jnp.array([0, 2])
  loss_fn = lambda logits: -jax.nn.log_softmax(logits)[jnp.arange(2), y]

  def forward(u, v):
    conv = lambda h, k: jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=DN)
    bn = m.bn1
    h = conv(x, m.conv1.kernel[...])
    h = (h - bn.mean[...]) * (jax.lax.rsqrt(bn.var[...] + bn.epsilon) * bn.scale[...]) + bn.bias[...]
    h = jax.nn.relu(h) * u[:, None, None, :]
    z = jax.nn.relu(conv(h, m.conv2.kernel[...]) + m.conv2.bias[...])
    p = z.mean(axis=(1, 2)) * v
    return p @ m.fc.kernel[...] + m.fc.bias[...]

  # sanity: the hand forward is the model
  np.testing.assert_allclose(
    np.asarray(jax.jit(forward)(jnp.ones((2, 4)), jnp.ones((2, 5)))),
    np.asarray(jax.jit(setup.fn)(setup.state, x)),
    rtol=1e-5,
    atol=1e-6,
  )
  gu, gv = jax.jit(jax.grad(lambda u, v: loss_fn(forward(u, v)).sum(), argnums=(0, 1)))(
    jnp.ones((2, 4)), jnp.ones((2, 5))
  )
  scores = jax.jit(lambda s, x: criteria.taylor(setup.fn, s, graph, loss_fn, x))(setup.state, x)
  np.testing.assert_allclose(
    np.asarray(scores[g1]),
    by_position(graph, g1, "conv1.kernel", 3, np.abs(np.asarray(gu)).mean(0)),
    rtol=1e-4,
    atol=1e-7,
  )
  np.testing.assert_allclose(
    np.asarray(scores[g2]),
    by_position(graph, g2, "conv2.kernel", 3, np.abs(np.asarray(gv)).mean(0)),
    rtol=1e-4,
    atol=1e-7,
  )


def test_random_is_deterministic_per_key(tiny):
  setup, g1, g2 = tiny
  graph = setup.graph
  a = criteria.random(jax.random.key(0), graph)
  b = criteria.random(jax.random.key(0), graph)
  c = criteria.random(jax.random.key(1), graph)
  for g in graph.groups:
    assert a[g.name].shape == (g.size,)
    np.testing.assert_array_equal(np.asarray(a[g.name]), np.asarray(b[g.name]))
    assert not np.array_equal(np.asarray(a[g.name]), np.asarray(c[g.name]))
    assert ((np.asarray(a[g.name]) >= 0) & (np.asarray(a[g.name]) < 1)).all()


def test_criteria_cover_every_group_of_the_custom_graph():
  # one finite score per channel of every group, through concat, grouped and
  # depthwise convs, the flatten and the ZeroPad vectors
  setup = custom_setup()
  both = jax.jit(lambda s: (criteria.l1(s, setup.graph), criteria.fpgm(s, setup.graph)))
  for scores in both(setup.state):
    assert set(scores) == {g.name for g in setup.graph.groups}
    for g in setup.graph.groups:
      v = np.asarray(scores[g.name])
      assert v.shape == (g.size,) and np.isfinite(v).all()
