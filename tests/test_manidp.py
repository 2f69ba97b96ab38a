"""ManiDP: thresholds, kept-rate schedule, complexity weights, similarity term,
gating (== each sample's slimmed network with its saliencies folded into BN)."""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import input_

import jaxprune
from jaxprune.methods import manidp


def test_thresholds_equal_a_slow_reference():
  rng = np.random.default_rng(0)
  for rate in (0.1, 0.5, 0.65, 0.99, 1.0):
    m = {f"l{i}": rng.random(n).astype(np.float32) for i, n in enumerate((5, 16, 17))}
    got = manidp.thresholds({k: jnp.asarray(v) for k, v in m.items()}, rate)
    for k, v in m.items():
      k_keep = math.ceil(rate * len(v))
      want = sorted(v.tolist(), reverse=True)[k_keep - 1]
      assert float(got[k]) == pytest.approx(want)
      assert int((v >= float(got[k])).sum()) == k_keep  # distinct values: exactly k kept


def test_kept_rate_is_the_official_cosine():
  E, t = 10, 0.65
  assert manidp.kept_rate(E - 1, E, t) == pytest.approx(t)
  assert manidp.kept_rate(-1, E, t) == pytest.approx(1.0)
  assert manidp.kept_rate(E // 2 - 1, E, t) == pytest.approx((1 + t) / 2)
  vals = [manidp.kept_rate(e, E, t) for e in range(E)]
  assert all(a > b for a, b in zip(vals, vals[1:]))
  for bad in (0.0, 1.5, -0.1, True):
    with pytest.raises(ValueError, match="kept rate"):
      manidp.kept_rate(0, E, bad)


def test_complexity_weights_by_hand_and_detach():
  ce = jnp.array([0.0, 0.1, 0.3, 0.4, 1.0])
  c = 0.4
  want = [1.0, 0.75, 0.25, 0.0, 0.0]
  np.testing.assert_allclose(np.asarray(manidp.complexity_weights(ce, c)), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(manidp.complexity_weights(ce, c, gamma=2.0)), np.square(want), atol=1e-6)
  g = jax.grad(lambda ce: manidp.complexity_weights(ce, c).sum())(ce)
  assert float(jnp.abs(g).sum()) == 0.0
  g = jax.grad(lambda ce: manidp.complexity_weights(ce, c, detach=False).sum())(ce)
  np.testing.assert_allclose(np.asarray(g)[:3], -1 / c, rtol=1e-5)  # the official code's gradient


def test_similarity_term_equals_a_numpy_reference():
  rng = np.random.default_rng(1)
  feats = {"a": rng.normal(size=(6, 5)), "b": rng.normal(size=(6, 3))}
  sal = {"a": np.abs(rng.normal(size=(6, 5))), "b": np.abs(rng.normal(size=(6, 3)))}
  want = 0.0
  for k in feats:

    def gram(f):
      f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
      return np.array([[f[i] @ f[j] for j in range(6)] for i in range(6)])

    want += ((gram(feats[k]) - gram(sal[k])) ** 2).sum() / 36
  got = manidp.similarity_loss(
    {k: jnp.asarray(v, jnp.float32) for k, v in feats.items()}, {k: jnp.asarray(v, jnp.float32) for k, v in sal.items()}
  )
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(
    manidp.similarity_loss(feats | {}, {k: jnp.asarray(feats[k], jnp.float32) for k in feats})
  ) == pytest.approx(0, abs=1e-6)


def test_sparsity_term_by_hand():
  s = {"a": jnp.array([[1.0, 3.0], [2.0, 2.0]]), "b": jnp.array([[4.0], [0.0]])}
  w = jnp.array([1.0, 0.5])
  want = (1 * 2 + 0.5 * 2) / 2 + (1 * 4 + 0.5 * 0) / 2
  assert float(manidp.sparsity_loss(s, w)) == pytest.approx(want)


@functools.lru_cache(maxsize=None)
def setup():
  from test_branches import branch_setup

  model, fn, v, graph, _ = branch_setup("resnet20", 32)
  x = input_((3, 32, 32, 3), seed=21)
  layers = manidp.gate_layers(fn, graph, v, x[:1])
  # Small weights: saliencies near their bias 1, so an untrained network stays finite
  # under gates that scale channels (a trained ManiDP learns that balance).
  params = {
    k: {"w1": 0.05 * p["w1"], "w2": 0.05 * p["w2"], "b2": p["b2"]} for k, p in manidp.init_gates(0, layers).items()
  }
  return model, fn, v, graph, x, layers, params


def spread_thresholds(fn, v, graph, x, layers, params, q=40):
  """Per layer, the q-th percentile of this batch's saliencies: some channels off."""
  g = jax.jit(manidp.gated(fn, graph, layers))
  _, res = g(v, params, manidp.init(layers).thresholds, x)
  return {l.name: jnp.float32(np.percentile(np.asarray(res.aux[l.name]), q)) for l in layers}


def test_gate_layers_are_both_convs_of_every_block():
  _, _, _, graph, _, layers, _ = setup()
  want = [f"layer{s}.{i}.{c}" for s in (1, 2, 3) for i in range(3) for c in ("conv1", "conv2:branch")]
  assert [l.name for l in layers] == want
  assert [l.hidden for l in layers[:2]] == [16, 16]  # C < 80: no squeeze
  assert manidp.hidden_size(128) == 64 and manidp.hidden_size(64) == 64


def test_gated_equals_each_samples_slimmed_network_with_saliencies_folded():
  model, fn, v, graph, x, layers, params = setup()
  thre = spread_thresholds(fn, v, graph, x, layers, params)
  out, res = jax.jit(manidp.gated(fn, graph, layers))(v, params, thre, x)
  # some channels are off, some scaled, per sample
  m = res.masks["layer2.0.conv1"]
  assert 0 < float((m == 0).mean()) < 1 and float(jnp.abs(m[0] - m[1]).sum()) > 0
  b = "layer1.1.conv2:branch"
  np.testing.assert_allclose(np.asarray(res.masks[b]), np.asarray(res.aux[b] * (res.aux[b] >= thre[b])), rtol=1e-6)
  # a sample may switch a whole layer off (then it has no slimmed network): test the others
  full = [i for i in range(x.shape[0]) if all(float((res.masks[l.name][i] > 0).sum()) > 0 for l in layers)]
  assert full
  for i in full[:2]:
    mi = {k: np.asarray(v_[i]) for k, v_ in res.masks.items()}
    hard = {k: jnp.asarray((v_ > 0).astype(np.float32)) for k, v_ in mi.items()}
    small = jaxprune.slim(v, graph, hard)
    # fold each kept channel's saliency into the BN that produces it
    for l in layers:
      block = l.name.split(".conv")[0]
      bn = "bn1" if l.name.endswith("conv1") else "bn2"
      s, o = jnp.asarray(mi[l.name][mi[l.name] > 0]), small["params"]
      node = o
      for key in block.split("."):
        node = node[int(key)] if key.isdigit() else node[key]
      node[bn] = {"scale": node[bn]["scale"] * s, "bias": node[bn]["bias"] * s}
    ref = jaxprune.module(model, small)(x[i : i + 1])
    np.testing.assert_allclose(np.asarray(out[i : i + 1]), np.asarray(ref), atol=2e-4, rtol=2e-4)


def test_thresholds_refresh_from_epoch_one_and_sums_restart():
  _, fn, v, graph, x, layers, params = setup()
  state = manidp.init(layers)
  g = jax.jit(manidp.gated(fn, graph, layers))
  _, res = g(v, params, state.thresholds, x)
  state = manidp.accumulate(state, res.aux)
  assert float(state.count) == 3
  s0 = manidp.refresh(state, 0, 10, 0.5)
  assert float(s0.thresholds[layers[0].name]) == manidp.THRESHOLD_INIT  # epoch 0: kept
  assert float(s0.count) == 0 and float(s0.sal_sum[layers[0].name].sum()) == 0
  s1 = manidp.refresh(state, 1, 10, 0.5)
  mean = np.asarray(res.aux[layers[0].name]).mean(0)
  k = math.ceil(manidp.kept_rate(1, 10, 0.5) * mean.size)
  assert float(s1.thresholds[layers[0].name]) == pytest.approx(np.sort(mean)[::-1][k - 1], rel=1e-6)


def test_per_sample_cost_counts_conv_b_from_conv_a_gates():
  _, fn, v, graph, x, layers, params = setup()
  thre = spread_thresholds(fn, v, graph, x, layers, params)
  _, res = jax.jit(manidp.gated(fn, graph, layers))(v, params, thre, x)
  c = manidp.per_sample_cost(graph, res.masks)
  dense = float(jaxprune.cost(graph).macs)
  assert np.all(np.asarray(c.macs) < dense)
  n1 = np.asarray((res.masks["layer2.1.conv1"] > 0).sum(-1))
  n2 = np.asarray((res.masks["layer2.1.conv2:branch"] > 0).sum(-1))
  np.testing.assert_allclose(np.asarray(c.per_layer["layer2.1.conv2"]["macs"]), 16 * 16 * 9 * n1 * n2)
  # stage 1 starts from the (ungated) stem, so a block reads all 16 channels
  m1 = np.asarray((res.masks["layer1.1.conv1"] > 0).sum(-1))
  np.testing.assert_allclose(np.asarray(c.per_layer["layer1.1.conv1"]["macs"]), 32 * 32 * 9 * 16 * m1)
  # stage 2's option-A zero channels live only where layer2.0's branch keeps them
  live = 16 + np.asarray((res.masks["layer2.0.conv2:branch"][:, list(range(8)) + list(range(24, 32))] > 0).sum(-1))
  np.testing.assert_allclose(np.asarray(c.per_layer["layer2.1.conv1"]["macs"]), 16 * 16 * 9 * live * n1)
  # the official count reads every block input dense
  by_hand = float(jaxprune.cost(graph).macs) + sum(
    (16 * 16 if s == 2 else 32 * 32 if s == 1 else 8 * 8)
    * 9
    * w
    * (np.asarray((res.masks[f"layer{s}.{b}.conv1"] > 0).sum(-1)) - w)
    for s, w in ((1, 16), (2, 32), (3, 64))
    for b in range(3)
    if not (b == 0 and s > 1)
  )
  for s, w in ((2, 32), (3, 64)):  # the strided first blocks: input width w // 2
    hw = 16 * 16 if s == 2 else 8 * 8
    by_hand += hw * 9 * (w // 2) * (np.asarray((res.masks[f"layer{s}.0.conv1"] > 0).sum(-1)) - w)
  by_hand = by_hand + sum(
    np.asarray(c.per_layer[f"layer{s}.{b}.conv2"]["macs"])
    - float(jaxprune.cost(graph).per_layer[f"layer{s}.{b}.conv2"]["macs"])
    for s in (1, 2, 3)
    for b in range(3)
  )
  np.testing.assert_allclose(np.asarray(manidp.paper_macs(graph, layers, res.masks)), by_hand, rtol=1e-6)
  assert np.all(np.asarray(manidp.paper_macs(graph, layers, res.masks)) >= np.asarray(c.macs))
  assert manidp.gate_macs(layers) == sum(l.c_in * l.hidden + l.hidden * l.size for l in layers)


def test_bad_input_is_a_clear_error():
  _, fn, v, _, x, _, _ = setup()
  plain = jaxprune.trace(fn, v, x[:1])
  with pytest.raises(ValueError, match="branches=True"):
    manidp.gate_layers(fn, plain, v, x[:1])
  vgg = lambda w, x: jax.nn.relu(x @ w["a"]) @ w["b"]  # noqa: E731
  w = {"a": jnp.ones((4, 6)), "b": jnp.ones((6, 2))}
  g = jaxprune.trace(vgg, w, jnp.ones((1, 4)), branches=True)
  with pytest.raises(ValueError, match="no gate points"):
    manidp.gate_layers(vgg, g, w, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="lambda_sparse"):
    manidp.check_weights(lambda_sparse=-1.0)
  with pytest.raises(ValueError, match="kept rate"):
    manidp.check_rate(1.5)


def test_similarity_spans_the_global_batch_on_several_devices():
  code = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxprune.methods import manidp
rng = np.random.default_rng(0)
f = {"a": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)}
s = {"a": jnp.asarray(np.abs(rng.normal(size=(8, 5))), jnp.float32)}
one = float(manidp.similarity_loss(f, s))
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sh = NamedSharding(mesh, P("data"))
fs = {k: jax.device_put(v, sh) for k, v in f.items()}
ss = {k: jax.device_put(v, sh) for k, v in s.items()}
four = float(jax.jit(manidp.similarity_loss)(fs, ss))
per_device = np.mean([float(manidp.similarity_loss({"a": f["a"][i:i+2]}, {"a": s["a"][i:i+2]}))
                      for i in range(0, 8, 2)])
assert len(jax.devices()) == 4
print(one, four, per_device)
assert abs(one - four) < 1e-5 * max(1, abs(one)), (one, four)
assert abs(one - per_device) > 1e-3
'''
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
