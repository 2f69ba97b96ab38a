"""FTWT: targets, per-sample gating (== the per-sample slimmed network), cost, gradients."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import custom_setup, input_, tiny_setup, zoo_setup

import jaxprune
from jaxprune.methods import ftwt


def slow_targets(a: np.ndarray, r: float, eps: float = 1e-5) -> np.ndarray:
  """Python loops over samples and filters, straight from the spec (B3)."""
  out = np.zeros_like(a)
  for b in range(a.shape[0]):
    total = sum(a[b])
    if total <= 0:
      continue
    p = [v / total for v in a[b]]
    if r == 1.0:
      for f in range(len(p)):
        out[b, f] = 1.0 if p[f] > eps else 0.0
      continue
    order = sorted(range(len(p)), key=lambda f: -p[f])
    cum = 0.0
    for f in order:
      cum += p[f]
      if cum - r <= eps:
        out[b, f] = 1.0
  return out


@pytest.mark.parametrize("r", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_targets_equal_slow_reference(r):
  rng = np.random.default_rng(int(r * 100))
  a = np.abs(rng.normal(size=(6, 24))).astype(np.float32)
  a[1, :5] = 0.0  # dead filters
  a[2] = 0.0  # a dead layer: keeps nothing
  got = np.asarray(ftwt.targets({"g": jnp.asarray(a)}, r)["g"])
  np.testing.assert_array_equal(got, slow_targets(a.astype(np.float64), r))
  assert got[2].sum() == 0


def test_targets_poster_example():
  # sorted p = .3 .3 .2 .1 .1 -> cumsum .3 .6 .8 .9 1.0; r = .95 keeps k = 4
  a = jnp.array([[0.1, 0.3, 0.2, 0.3, 0.1]])
  assert float(ftwt.targets({"g": a}, 0.95)["g"].sum()) == 4


@pytest.mark.parametrize("r", [0.0, -0.1, 1.5, float("nan"), "0.9"])
def test_r_outside_unit_interval_is_an_error(r):
  with pytest.raises(ValueError, match="r"):
    ftwt.targets({"g": jnp.ones((1, 3))}, r)


def test_model_without_gate_points_is_an_error():
  mlp = lambda v, x: jnp.tanh(x @ v["w1"]) @ v["w2"]
  v = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 2))}
  x = jnp.ones((1, 4))
  graph = jaxprune.trace(mlp, v, x)
  with pytest.raises(ValueError, match="no gate points"):
    ftwt.gate_points(mlp, graph, v, x)


def test_bad_pool_and_mode_are_errors():
  _, fn, state, graph, x = tiny_setup()
  pts = ftwt.gate_points(fn, graph, state, x[:1])
  with pytest.raises(ValueError, match="pool"):
    ftwt.gated(fn, graph, pts, pool="median")
  with pytest.raises(ValueError, match="mode"):
    ftwt.gated(fn, graph, pts, mode="both")


def test_per_sample_cost_batch_mismatch_is_an_error():
  _, _, _, graph, _ = tiny_setup()
  masks = graph.ones((2,))
  masks[graph.groups[0].name] = jnp.ones((3, graph.groups[0].size))
  with pytest.raises(ValueError, match="batch"):
    ftwt.per_sample_cost(graph, masks)


# ------------------------------------------------------------ gated forward ----


def sharp_predictors(points, seed=0):
  """Predictors whose masks depend on the input; channel 0 of every gate stays open."""
  preds = ftwt.init_predictors(seed, points)
  return {k: {"kernel": 300.0 * p["kernel"], "bias": p["bias"].at[0].set(100.0)} for k, p in preds.items()}


@functools.lru_cache(maxsize=None)
def gated_run(name):
  setup = custom_setup() if name == "custom" else zoo_setup(name, 32)
  model, fn, state, graph, _ = setup
  x = input_((4 if name == "resnet20" else 2, *setup.x.shape[1:]), seed=7)
  pts = ftwt.gate_points(fn, graph, state, x[:1])
  preds = sharp_predictors(pts)
  out, aux = jax.jit(ftwt.gated(fn, graph, pts))(state, preds, x)
  return setup, x, pts, out, aux


# The networks the official code gates (VGG-16, ResNet, MobileNetV1) and the custom model.
@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mobilenet_v1_cifar", "custom"])
def test_gated_equals_each_samples_slimmed_network(name):
  (model, fn, state, graph, _), x, pts, out, aux = gated_run(name)
  assert {p.name for p in pts} <= {g.name for g in graph.groups}
  i = 3 if name == "resnet20" else 1
  m = {k: v[i] for k, v in aux.masks.items()}
  small = jaxprune.slim(state, graph, m)
  # eager: one batch-1 call is cheaper than compiling it
  ref = jaxprune.module(model, small)(x[i : i + 1])
  np.testing.assert_allclose(np.asarray(out[i : i + 1]), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_masks_differ_across_samples_and_are_hard():
  _, x, pts, _, aux = gated_run("resnet20")
  differ = [p.name for p in pts if np.any(np.asarray(aux.masks[p.name]).std(0) > 0)]
  assert len(differ) >= len(pts) // 2, differ
  for m in aux.masks.values():
    assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
  for p in pts:
    assert aux.logits[p.name].shape == (4, p.size) == aux.peaks[p.name].shape
    np.testing.assert_array_equal(np.asarray(aux.masks[p.name]), np.asarray(aux.logits[p.name] > 0, np.float32))


def test_per_sample_cost_equals_a_loop_and_predictor_macs():
  (_, _, _, graph, _), _, pts, _, aux = gated_run("resnet20")
  for mode in ("exact", "paper"):
    batched = ftwt.per_sample_cost(graph, aux.masks, mode=mode)
    for i in range(4):
      c = jaxprune.cost(graph, {k: v[i] for k, v in aux.masks.items()}, mode=mode)
      np.testing.assert_allclose(float(batched.macs[i]), float(c.macs), rtol=1e-6)
      np.testing.assert_allclose(float(batched.flops[i]), float(c.flops), rtol=1e-6)
  assert float(batched.macs.std()) > 0
  assert ftwt.predictor_macs(pts) == sum(p.c_in * p.size for p in pts)


def _plain_net(v, x):
  """conv 3->4 (8x8) -> conv 4->6 stride 2 (4x4) -> depthwise 6 (4x4) -> GAP -> dense 6->5."""
  p = v["params"]
  conv = functools.partial(jax.lax.conv_general_dilated, padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(conv(x, p["c1"], (1, 1)))
  h = jax.nn.relu(conv(h, p["c2"], (2, 2)))
  h = jax.nn.relu(conv(h, p["dw"], (1, 1), feature_group_count=6))
  return h.mean((1, 2)) @ p["fc"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_macs_equal_the_official_formula_by_hand(seed):
  rng = np.random.default_rng(seed)
  v = {
    "params": {
      "c1": jnp.ones((3, 3, 3, 4)),
      "c2": jnp.ones((3, 3, 4, 6)),
      "dw": jnp.ones((3, 3, 1, 6)),
      "fc": jnp.ones((6, 5)),
    }
  }
  graph = jaxprune.trace(_plain_net, v, jnp.zeros((1, 8, 8, 3)))
  masks = {g.name: jnp.asarray(rng.random((5, g.size)) < 0.6, jnp.float32) for g in graph.groups}
  masks = {k: m.at[0].set(1.0) for k, m in masks.items()}  # sample 0 dense
  got = np.asarray(ftwt.legacy_macs(graph, masks))
  a1, a2 = (np.asarray(masks[g.name]).sum(-1) for g in graph.groups)  # c1 and c2 (= dw) groups
  # a_l * HW_out * (a_prev // groups) * k^2, summed in program order; no fc.
  want = 64 * 9 * a1 * 3 + 16 * 9 * a2 * a1 + 16 * 9 * a2 * (a2 // 6)
  np.testing.assert_allclose(got, want)
  assert got[0] == 64 * 9 * 4 * 3 + 16 * 9 * 6 * 4 + 16 * 9 * 6 == ftwt.legacy_base(graph) - 30
  assert np.all((got[1:] < got[0]) | (a2[1:] == 6))


def test_legacy_macs_of_dense_resnet20_are_its_conv_macs():
  (_, _, _, graph, _), _, pts, _, aux = gated_run("resnet20")
  ones = graph.ones((2,))
  np.testing.assert_allclose(np.asarray(ftwt.legacy_macs(graph, ones)), ftwt.legacy_base(graph) - 64 * 10, rtol=1e-7)
  by_hand = (
    32 * 32 * 9 * 3 * 16
    + 6 * 32 * 32 * 9 * 16 * 16  # stem, stage 1
    + 16 * 16 * 9 * 16 * 32
    + 5 * 16 * 16 * 9 * 32 * 32  # stage 2
    + 8 * 8 * 9 * 32 * 64
    + 5 * 8 * 8 * 9 * 64 * 64  # stage 3
    + 64 * 10
  )  # fc
  assert ftwt.legacy_base(graph) == by_hand
  red = 1 - np.asarray(ftwt.legacy_macs(graph, aux.masks)) / ftwt.legacy_base(graph)
  assert np.all(red > 0)


# ---------------------------------------------------------------- gradients ----


def grads(mode):
  _, fn, state, graph, x = tiny_setup()
  pts = ftwt.gate_points(fn, graph, state, x[:1])
  preds = ftwt.init_predictors(1, pts)
  g = ftwt.gated(fn, graph, pts, mode=mode)

  def mask_loss(state, preds):
    _, aux = g(state, preds, x)
    return ftwt.mask_loss(aux.logits, ftwt.targets(aux.peaks, 0.8))

  def task(state, preds):
    out, _ = g(state, preds, x)
    return jnp.sum(out**2)

  both = jax.jit(lambda s, p: (jax.grad(mask_loss, (0, 1))(s, p), jax.grad(task, (0, 1))(s, p)))
  return both(state, preds)


def norm(tree):
  return sum(float(jnp.abs(a).sum()) for a in jax.tree_util.tree_leaves(tree))


def test_decoupled_mask_loss_does_not_reach_the_backbone():
  (d_backbone, d_pred), (t_backbone, t_pred) = grads("decoupled")
  assert norm(d_backbone) == 0.0
  assert norm(d_pred) > 0.0
  assert norm(t_pred) == 0.0  # the task loss never reaches the predictors
  assert norm(t_backbone) > 0.0


def test_joint_mask_loss_reaches_the_backbone():
  (j_backbone, j_pred), (_, t_pred) = grads("joint")
  assert norm(j_backbone) > 0.0 and norm(j_pred) > 0.0
  assert norm(t_pred) == 0.0


# ------------------------------------------------------------------ pipeline ----


def test_pipeline_end_to_end(tmp_path):
  from experiments import train as train_lib
  from experiments.configs import ftwt_cifar10_subset_resnet20 as cfg

  c = cfg.get_config("quick")
  c.train.epochs = 0  # no pretraining steps: saves a compile
  c.train.max_steps_per_epoch = 2  # the FTWT phase: 2 steps
  c.data.batch_size = 32
  c.data.eval_batch_size = 1024  # one eval batch: one compile
  c.method.epochs = 1
  c.method.r = 0.8
  c.model.kwargs.widths = (4, 8, 16)  # ResNet-20's structure, less arithmetic
  c.data.augment = False
  c.progress = False
  r = train_lib.train_and_evaluate(c, str(tmp_path))
  saved = json.load(open(os.path.join(tmp_path, "results.json")))
  d = saved["dynamic"]
  assert saved["macs"] == r["macs"] == d["macs_mean"]
  assert d["count"] == 1017 and 0.0 <= d["accuracy"] <= 1.0
  assert d["macs_min"] <= d["macs_mean"] <= d["macs_max"] < d["dense_macs"]
  assert d["predictor_macs"] > 0 and d["macs_with_predictors_mean"] > d["macs_mean"]
  assert os.path.isdir(os.path.join(tmp_path, "ftwt"))
  per = np.load(os.path.join(tmp_path, "per_sample.npz"))
  assert per["macs"].shape == per["correct"].shape == per["label"].shape == (1017,)
  np.testing.assert_allclose(per["macs"].mean(), d["macs_mean"], rtol=1e-6)
  assert per["correct"].mean() == pytest.approx(d["accuracy"])
  np.testing.assert_allclose(1 - per["macs_legacy"].mean() / d["legacy_base"], d["reduction_legacy"])


def test_oracle_masks_keep_the_strongest_channel_and_follow_r():
  _, fn, state, graph, x = tiny_setup()
  pts = ftwt.gate_points(fn, graph, state, x[:1])
  g = jax.jit(ftwt.gated(fn, graph, pts))  # one compile for both calls
  lo, hi = (ftwt.oracle_masks(g, pts, state, x, r) for r in (0.3, 1.0))
  for p in pts:
    assert np.all(np.asarray(lo[p.name]).sum(-1) >= 1)
    assert np.all(np.asarray(lo[p.name]) <= np.asarray(hi[p.name]))


# ------------------------------------------------------ official (branch) units ----


@functools.lru_cache(maxsize=None)
def branch_run(name="resnet20", batch=4):
  from test_branches import branch_setup

  model, fn, state, graph, _ = branch_setup(name, 32 if name == "resnet20" else 16)
  x = input_((batch, *((32, 32, 3) if name == "resnet20" else (16, 16, 3))), seed=7)
  pts = ftwt.gate_points(fn, graph, state, x[:1])
  out, aux = jax.jit(ftwt.gated(fn, graph, pts))(state, sharp_predictors(pts), x)
  return model, fn, state, graph, x, pts, out, aux


def test_branch_gate_points_are_the_official_set():
  # The stem, both convs of every block (the second one's branch, before the add);
  # never the residual stream itself or a projection shortcut.
  _, _, _, graph, _, pts, _, _ = branch_run()
  want = ["conv1:branch"] + [
    f"layer{s}.{i}.{c}" for s in (1, 2, 3) for i in range(3) for c in ("conv1", "conv2:branch")
  ]
  assert [p.name for p in pts] == want
  assert {p.c_in for p in pts if p.name.endswith("conv2:branch")} == {16, 32, 64}
  # option-B shortcuts exist but are not gated
  _, _, _, graph_b, _, pts_b, _, _ = branch_run("resnet20_b", 2)
  assert any("downsample" in n for n, _ in graph_b.branches)
  assert len(pts_b) == 19 and not any("downsample" in p.name for p in pts_b)


def test_units_must_match_the_graph():
  _, fn, state, graph, x = zoo_setup("resnet20", 32)
  with pytest.raises(ValueError, match="branches=True"):
    ftwt.gate_points(fn, graph, state, x[:1], units="branch")
  _, fn_b, state_b, graph_b, x_b, *_ = branch_run()
  with pytest.raises(ValueError, match="units='stream'"):
    ftwt.gate_points(fn_b, graph_b, state_b, x_b[:1], units="stream")


def test_branch_gated_equals_each_samples_slimmed_network():
  model, fn, state, graph, x, pts, out, aux = branch_run()
  for i in (0, 2):
    m = {k: v[i] for k, v in aux.masks.items()}
    small = jaxprune.slim(state, graph, m)
    ref = jaxprune.module(model, small)(x[i : i + 1])
    np.testing.assert_allclose(np.asarray(out[i : i + 1]), np.asarray(ref), atol=1e-4, rtol=1e-4)
  # branch gates really vary per sample, and the stream is never gated
  b = aux.masks["layer2.1.conv2:branch"]
  assert float(jnp.abs(b - b[:1]).sum()) > 0
  assert graph.streams()
  for name in graph.streams():
    assert float(aux.masks[name].min()) == 1.0


def test_legacy_count_by_hand_on_a_two_block_toy():
  # The official count charges a block's first conv against the previous
  # block's *branch* gates (its conv2), not the residual stream it reads.
  from test_branches import HW, K, res_setup

  v, x, graph = res_setup()
  rng = np.random.default_rng(0)
  masks = {g.name: jnp.asarray(rng.random((5, g.size)) < 0.6, jnp.float32) for g in graph.groups}
  got = np.asarray(ftwt.legacy_macs(graph, masks))
  a = {k: np.asarray(m).sum(-1) for k, m in masks.items()}
  ch = np.asarray(masks["stem"])
  out = lambda br: (ch * np.asarray(masks[br])).sum(-1)  # a producer's open, kept channels
  hw = HW * HW * K
  want = (
    hw * out("stem:branch") * 3
    + hw * a["c1a"] * out("stem:branch")
    + hw * out("c1b:branch") * a["c1a"]
    + hw * a["c2a"] * out("c1b:branch")
    + hw * out("c2b:branch") * a["c2a"]
  )
  np.testing.assert_allclose(got, want)
  # the exact count differs: block 2's first conv reads the union of both producers
  exact = ftwt.per_sample_cost(graph, masks).per_layer["c2a"]["macs"]
  union = (ch * (1 - (1 - np.asarray(masks["stem:branch"])) * (1 - np.asarray(masks["c1b:branch"])))).sum(-1)
  np.testing.assert_allclose(np.asarray(exact), hw * a["c2a"] * union)
  assert np.any(union != out("c1b:branch"))


def test_all_gates_closed_and_r_one_on_branch_units():
  _, fn, state, graph, x, pts, _, _ = branch_run()
  closed = {p.name: {"kernel": jnp.zeros((p.c_in, p.size)), "bias": -jnp.ones((p.size,))} for p in pts}
  out, aux = jax.jit(ftwt.gated(fn, graph, pts))(state, closed, x)
  assert bool(jnp.all(jnp.isfinite(out)))
  for p in pts:
    assert float(aux.masks[p.name].max()) == 0.0
  # with every gate closed only the ungated stream/classifier work is left
  macs = np.asarray(ftwt.per_sample_cost(graph, aux.masks).macs)
  assert np.all(macs < 0.01 * float(jaxprune.cost(graph).macs))
  # r = 1 keeps exactly the channels that are not dead
  t = ftwt.targets(aux.peaks, 1.0)
  for p in pts:
    pk = np.asarray(aux.peaks[p.name])
    share = pk / np.maximum(pk.sum(-1, keepdims=True), 1e-30)
    np.testing.assert_array_equal(
      np.asarray(t[p.name]), ((share > 1e-5) & (pk.sum(-1, keepdims=True) > 0)).astype(np.float32)
    )


def test_backbone_schedule_drops_at_the_official_milestones():
  # 200 epochs of 10 steps: x0.1 at epochs 81, 122, 151 (steps 810, 1220, 1510)
  s = ftwt.backbone_schedule(200, 10, 0.01)
  got = [float(s(k)) for k in (0, 809, 810, 1219, 1220, 1509, 1510, 1999)]
  np.testing.assert_allclose(got, [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)
  # explicit epochs, scaled: 20 epochs of 5 steps, x0.5 at epochs 10 and 15; milestones outside dropped
  s = ftwt.backbone_schedule(20, 5, 0.1, decay_epochs=(10, 15, 25), decay_factor=0.5)
  np.testing.assert_allclose([float(s(k)) for k in (49, 50, 74, 75, 99)], [0.1, 0.05, 0.05, 0.025, 0.025], rtol=1e-6)
