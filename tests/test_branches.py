"""Residual-branch groups (`trace(..., branches=True)`) and `jaxprune.gated`.

Checked against independent computations: a hand count of a small residual
network, the physically slimmed networks (the same code on smaller arrays),
finite differences, a loop over samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import build, input_, jit_masked, param_count, zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune.models.layers import expand_channels, gather_channels

HW, K = 8, 9  # image side, 3x3 kernel


def _conv(h, w):
  return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def res_net(v, x):
  """stem 3->4, two blocks (4 -> 3 -> 4) added to the stream, GAP, fc 4->2."""
  p, o = v["params"], v["other"]
  h = expand_channels(jax.nn.relu(_conv(x, p["stem"])), o["stem_idx"])
  for k in (1, 2):
    u = jax.nn.relu(_conv(gather_channels(h, o[f"in{k}"]), p[f"c{k}a"]))
    h = jax.nn.relu(h + expand_channels(_conv(u, p[f"c{k}b"]), o[f"out{k}"]))
  return gather_channels(h.mean((1, 2)), o["fc_idx"]) @ p["fc"]


@functools.lru_cache(maxsize=None)
def res_setup():
  rng = np.random.default_rng(0)
  w = lambda *s: jnp.asarray(rng.normal(0, 0.5, s), jnp.float32)
  v = {
    "params": {
      "stem": w(3, 3, 3, 4),
      "c1a": w(3, 3, 4, 3),
      "c1b": w(3, 3, 3, 4),
      "c2a": w(3, 3, 4, 3),
      "c2b": w(3, 3, 3, 4),
      "fc": w(4, 2),
    },
    "other": {
      n: jnp.arange(s, dtype=jnp.int32)
      for n, s in [("stem_idx", 4), ("in1", 4), ("out1", 4), ("in2", 4), ("out2", 4), ("fc_idx", 4)]
    },
  }
  x = input_((3, HW, HW, 3), seed=2)
  return v, x, jaxprune.trace(res_net, v, x[:1], branches=True)


def hand_count(m):
  """MACs and params of `res_net` under (soft) masks, from its definition."""
  ch, g1, g2 = m["stem"], m["c1a"], m["c2a"]
  b0, b1, b2 = m["stem:branch"], m["c1b:branch"], m["c2b:branch"]
  union = lambda *bs: 1 - np.prod([1 - b for b in bs], axis=0)
  live1, live2, live3 = ch * b0, ch * union(b0, b1), ch * union(b0, b1, b2)
  s = lambda a: float(np.sum(a))
  layers = {
    "stem": (3 * s(ch * b0), HW * HW * K),
    "c1a": (s(live1) * s(g1), HW * HW * K),
    "c1b": (s(g1) * s(ch * b1), HW * HW * K),
    "c2a": (s(live2) * s(g2), HW * HW * K),
    "c2b": (s(g2) * s(ch * b2), HW * HW * K),
    "fc": (s(live3) * 2, 1),
  }
  macs = sum(n * c for n, c in layers.values())
  params = sum(n * (K if name != "fc" else 1) for name, (n, _) in layers.items())
  return macs, params, {k: n * c for k, (n, c) in layers.items()}


def test_groups_of_the_small_residual_network():
  _, _, graph = res_setup()
  kinds = {g.name: (g.kind, g.size) for g in graph.groups}
  assert kinds == {
    "stem": ("channel", 4),
    "c1a": ("channel", 3),
    "c2a": ("channel", 3),
    "stem:branch": ("branch", 4),
    "c1b:branch": ("branch", 4),
    "c2b:branch": ("branch", 4),
  }
  # the identity path is never a branch: the stream after block 1 owns no group
  assert [n for _, n in graph.branches] != []


def test_cost_equals_hand_count_with_a_channel_refilled_by_a_later_branch():
  _, _, graph = res_setup()
  ones = {g.name: np.ones(g.size, np.float32) for g in graph.groups}
  cases = []
  m = dict(ones)
  m["stem:branch"] = np.array([0, 1, 1, 1], np.float32)  # channel 0 dies after the stem ...
  m["c1b:branch"] = np.array([1, 0, 1, 1], np.float32)  # ... block 1 writes it again
  cases.append(m)
  m2 = dict(m)
  m2["c1b:branch"] = np.array([0, 0, 1, 1], np.float32)  # now nobody refills it before block 2
  m2["stem"] = np.array([1, 1, 0, 1], np.float32)  # and stream channel 2 is gone
  cases.append(m2)
  rng = np.random.default_rng(3)
  cases += [{k: (rng.random(v.size) < 0.6).astype(np.float32) for k, v in ones.items()} for _ in range(4)]
  for masks in cases:
    c = jaxprune.cost(graph, masks)
    macs, params, per_layer = hand_count(masks)
    assert float(c.macs) == pytest.approx(macs)
    assert float(c.params) == pytest.approx(params)
    for name, want in per_layer.items():
      assert float(c.per_layer[name]["macs"]) == pytest.approx(want), name
  c = jaxprune.cost(graph, cases[0])
  assert float(c.per_layer["c1a"]["macs"]) == HW * HW * K * 3 * 3  # dead channel 0 skipped
  assert float(c.per_layer["c2a"]["macs"]) == HW * HW * K * 4 * 3  # refilled by block 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_soft_cost_is_the_multilinear_hand_count(data):
  _, _, graph = res_setup()
  masks = {
    g.name: np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=g.size, max_size=g.size)), np.float32)
    for g in graph.groups
  }
  macs, params, _ = hand_count(masks)
  c = jaxprune.cost(graph, masks)
  assert float(c.macs) == pytest.approx(macs, rel=1e-5, abs=1e-2)
  assert float(c.params) == pytest.approx(params, rel=1e-5, abs=1e-3)


def test_cost_gradient_matches_finite_differences():
  _, _, graph = res_setup()
  rng = np.random.default_rng(5)
  m0 = {g.name: jnp.asarray(rng.uniform(0.2, 0.8, g.size), jnp.float32) for g in graph.groups}
  f = jax.jit(lambda m: jaxprune.cost(graph, m).macs)
  grad = jax.grad(f)(m0)
  eps = 1e-2
  for name in ("stem:branch", "c1b:branch", "stem", "c2a"):
    for i in range(graph.group(name).size):
      up = {**m0, name: m0[name].at[i].add(eps)}
      dn = {**m0, name: m0[name].at[i].add(-eps)}
      fd = (float(f(up)) - float(f(dn))) / (2 * eps)
      assert float(grad[name][i]) == pytest.approx(fd, rel=2e-3, abs=1.0), (name, i)
  # exactly the hand count's derivative through the union of block 2's input
  h = lambda b0: hand_count({**{k: np.asarray(v) for k, v in m0.items()}, "stem:branch": b0})[0]
  b0 = np.asarray(m0["stem:branch"], np.float64)
  e0 = np.eye(4)[0] * 1e-3
  assert float(grad["stem:branch"][0]) == pytest.approx((h(b0 + e0) - h(b0 - e0)) / 2e-3, rel=1e-3)


def test_masked_equals_slimmed_and_hand_counted_params_on_the_small_network():
  v, x, graph = res_setup()
  rng = np.random.default_rng(11)
  for _ in range(5):
    masks = {
      g.name: jnp.asarray((rng.random(g.size) < 0.6).astype(np.float32)).at[rng.integers(g.size)].set(1.0)
      for g in graph.groups
    }
    small = jaxprune.slim(v, graph, masks)
    out_small = res_net(small, x)
    out_masked = jaxprune.masked(res_net, graph)(v, masks, x)
    np.testing.assert_allclose(np.asarray(out_small), np.asarray(out_masked), atol=1e-4)
    assert param_count(small) == hand_count({k: np.asarray(m) for k, m in masks.items()})[1]


# ----------------------------------------------------- zoo: masked == slimmed


def random_masks(graph, rng, p_keep=0.6):
  out = {}
  for g in graph.groups:
    m = (rng.random(g.size) < p_keep).astype(np.float32)
    m[rng.integers(g.size)] = 1.0
    out[g.name] = jnp.asarray(m)
  return out


@functools.lru_cache(maxsize=None)
def branch_setup(name: str, hw: int):
  from jaxprune import models

  if name == "wrn":
    model = build(lambda rngs: models.wide_resnet(14, 2, num_classes=10, rngs=rngs))
  elif name == "resnet20_b":
    model = build(lambda rngs: models.create("resnet20", num_classes=10, rngs=rngs, shortcut="B"))
  else:
    model = zoo(name, num_classes=10)
  fn, v = jaxprune.functional(model)
  x = input_((2, hw, hw, 3), seed=3)
  return model, fn, v, jaxprune.trace(fn, v, x[:1], branches=True), x


@pytest.mark.parametrize(
  "name,hw", [("resnet20", 32), ("resnet56", 16), ("wrn", 16), ("resnet50", 64), ("resnet18", 64), ("resnet20_b", 16)]
)
def test_masked_equals_slimmed_with_branch_masks(name, hw):
  model, fn, v, graph, x = branch_setup(name, hw)
  assert any(g.kind == "branch" for g in graph.groups)
  assert not graph.physical  # the bundled blocks carry their index vectors
  rng = np.random.default_rng(sum(map(ord, name)))
  masks = random_masks(graph, rng)
  out_masked = jit_masked(fn, graph)(v, masks, x)
  small_model = jaxprune.slim_module(model, graph, masks)
  out_small = small_model(x)
  scale = max(1.0, float(jnp.abs(out_masked).max()))
  assert float(jnp.abs(out_masked - out_small).max()) < 1e-4 * scale
  out_full = jit_masked(fn, graph)(v, graph.ones(), x)
  assert float(jnp.abs(out_full - out_small).max()) > 1e-3
  _, small = jaxprune.nnx_bridge.split(small_model)
  assert float(jaxprune.cost(graph, masks).params) == param_count(small)


def test_per_sample_branch_masks_equal_a_loop_over_samples():
  _, fn, v, graph, _ = branch_setup("resnet20", 32)
  x = input_((3, 32, 32, 3), seed=9)
  rng = np.random.default_rng(4)
  per = [random_masks(graph, rng) for _ in range(3)]
  stacked = {k: jnp.stack([m[k] for m in per]) for k in per[0]}
  out = jit_masked(fn, graph)(v, stacked, x)
  for i in range(3):
    ref = jit_masked(fn, graph)(v, per[i], x[i : i + 1])
    np.testing.assert_allclose(np.asarray(out[i : i + 1]), np.asarray(ref), atol=1e-5)
  costs = jax.vmap(lambda m: jaxprune.cost(graph, m).macs)(stacked)
  for i in range(3):
    assert float(costs[i]) == pytest.approx(float(jaxprune.cost(graph, per[i]).macs))


def test_branches_false_keeps_the_channel_groups_and_their_costs():
  _, fn, v, graph, x = branch_setup("resnet20", 32)
  plain = jaxprune.trace(fn, v, x[:1])
  assert [(g.name, g.size) for g in plain.groups] == [(g.name, g.size) for g in graph.groups if g.kind == "channel"]
  assert all(g.kind == "channel" for g in plain.groups)
  rng = np.random.default_rng(1)
  for _ in range(3):
    m = random_masks(plain, rng)
    full = {**m, **{g.name: jnp.ones(g.size) for g in graph.groups if g.kind == "branch"}}
    a, b = jaxprune.cost(plain, m), jaxprune.cost(graph, full)
    for unit in jaxprune.UNITS:  # channels: the channel groups' entries alone
      assert float(getattr(a, unit)) == float(getattr(b, unit)), unit


def test_slim_refuses_branch_masks_a_model_cannot_realise():
  # The custom model adds its residual branch without index vectors.
  from custom_models import Custom

  model = build(Custom)
  fn, v = jaxprune.functional(model)
  x = input_((2, 16, 16, 3))
  graph = jaxprune.trace(fn, v, x[:1], branches=True)
  assert graph.physical
  masks = {g.name: jnp.ones(g.size) for g in graph.groups}
  jaxprune.slim(v, graph, masks)  # branch entries == channel entries: fine
  b = next(g for g in graph.groups if g.kind == "branch")
  bad = {**masks, b.name: masks[b.name].at[0].set(0.0)}
  out = jax.jit(jaxprune.masked(fn, graph))(v, bad, x)  # masking still works
  assert out.shape[0] == 2
  with pytest.raises(ValueError, match="without an index vector"):
    jaxprune.slim(v, graph, bad)


def test_global_selection_ranks_branch_and_channel_groups_together():
  _, fn, v, graph, _ = branch_setup("resnet20", 32)
  scores = jaxprune.criteria.l1(v, graph)
  assert set(scores) == {g.name for g in graph.groups}
  masks = jaxprune.select.global_topk(scores, graph, budget=0.5, unit="macs")
  r = float(jaxprune.ratio(graph, masks, "macs"))
  assert r <= 0.5 + 1e-6
  kinds = {
    k: sum(float(np.asarray(masks[g.name]).sum() < g.size) for g in graph.groups if g.kind == k)
    for k in ("channel", "branch")
  }
  assert kinds["channel"] > 0 and kinds["branch"] > 0
  small = jaxprune.slim(v, graph, masks)
  assert param_count(small) == float(jaxprune.cost(graph, masks).params)


# ------------------------------------------------------------------ gated ----


def test_gated_equals_masked_with_the_same_per_sample_masks():
  model, fn, v, graph, _ = branch_setup("resnet20", 32)
  x = input_((4, 32, 32, 3), seed=12)
  prods = jaxprune.producers(fn, graph, v, x[:1])
  names = [g.name for g in graph.groups if g.name in prods and prods[g.name].op == "conv"]
  assert any(graph.group(n).kind == "branch" for n in names)
  rng = np.random.default_rng(0)
  params = {n: jnp.asarray(rng.normal(size=(prods[n].c_in, prods[n].size)), jnp.float32) for n in names}

  def gate(inp, w):
    s = inp.x.mean(inp.producer.spatial_axes) @ w
    return (s > 0).astype(jnp.float32).at[:, 0].set(1.0), s

  out, res = jax.jit(jaxprune.gated(fn, graph, gate, names))(v, params, x)
  masks = res.masks
  assert set(res.aux) == set(names)
  # the masks really differ across samples, and the network output equals masked's
  assert any(float(jnp.abs(masks[n][0] - masks[n][1]).sum()) > 0 for n in names)
  ref = jit_masked(fn, graph)(v, masks, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_gate_reads_its_producer_input_with_upstream_gates_applied():
  v, x, graph = res_setup()
  prods = jaxprune.producers(res_net, graph, v, x[:1])
  assert prods["c1a"].c_in == 4 and prods["c1b:branch"].c_in == 3
  seen = {}

  def gate(inp, p):
    seen[inp.producer.name] = inp.x
    return jnp.broadcast_to(p, (inp.x.shape[0], inp.producer.size)), None

  params = {"stem:branch": jnp.array([0.0, 1, 1, 1]), "c1a": jnp.array([1.0, 1, 0])}
  _ = jaxprune.gated(res_net, graph, gate, ["stem:branch", "c1a"])(v, params, x)
  # c1a's input is the stream after the stem's gate: channel 0 is zero
  assert float(jnp.abs(seen["c1a"][..., 0]).max()) == 0.0
  assert float(jnp.abs(seen["c1a"][..., 1]).max()) > 0.0


def test_no_copy_of_the_interpreter_outside_the_core():
  # Methods gate and mask through the core; the core evaluates jaxprs in one place.
  import pathlib

  root = pathlib.Path(jaxprune.__file__).parent
  for path in [*root.glob("*.py"), *(root / "methods").glob("*.py")]:
    if path.name == "interpret.py":
      continue
    text = path.read_text()
    assert "get_bind_params" not in text and "primitive.bind(" not in text, path
