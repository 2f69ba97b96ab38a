"""ChipNet: mask functions, losses, budgets, threshold, schedules, and short pipeline runs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from custom_models import Tiny, abstract_graph, jit_cost, tiny_setup
from flax import nnx

import jaxprune
from jaxprune import training as T
from jaxprune.methods import chipnet

UNITS = ("channels", "volume", "params", "macs")
BUDGET_TYPES = ("channels", "volume", "params", "flops")


@pytest.fixture(scope="module")
def r20():
  return abstract_graph("resnet20", 32, 10)


def binary_zeta(masks):
  """ζ whose projected mask is exactly the given 0/1 mask (σ(±100) is 0 or 1 in float32)."""
  return {k: jnp.where(jnp.asarray(v) > 0, 100.0, -100.0) for k, v in masks.items()}


def random_binary(graph, seed, p=0.5):
  rng = np.random.default_rng(seed)
  out = {}
  for g in graph.groups:
    m = (rng.uniform(size=g.size) < p).astype(np.float32)
    m[rng.integers(g.size)] = 1.0  # no empty group
    out[g.name] = jnp.asarray(m)
  return out


# ------------------------------------------------------------ mask functions


def test_heaviside_endpoints_monotone_and_step_limit():
  x = jnp.linspace(0.0, 1.0, 201)
  for gamma in (1.0, 2.0, 16.0, 256.0):
    h = chipnet.heaviside(x, gamma)
    assert float(h[0]) == 0.0 and abs(float(h[-1]) - 1.0) < 1e-6
    assert bool(jnp.all(jnp.diff(h) >= 0))  # float32 saturates at 1 near x = 1 for large γ
    if gamma <= 4:
      assert bool(jnp.all(jnp.diff(h) > 0))
    assert bool(jnp.all(h >= x - 1e-7))  # concave: above the diagonal
  # Tends to a step: every x > 0 goes to 1 as gamma grows.
  for xi in (0.01, 0.1, 0.5):
    vals = [float(chipnet.heaviside(xi, g)) for g in (2.0, 32.0, 1024.0)]
    assert vals[0] < vals[1] <= vals[2] and vals[2] > 0.9999
  assert not np.isnan(float(chipnet.heaviside(0.3, 1e4)))  # exp(-gamma) underflow is harmless
  # the paper's starting value: ẑ = 0.5, γ = 2 -> z ≈ 0.70
  assert abs(float(chipnet.heaviside(0.5, 2.0)) - 0.7) < 2e-3


def test_crispness_zero_only_at_binary_masks():
  zero = chipnet.crispness({"a": jnp.array([0.0, 1.0, 1.0]), "b": jnp.array([0.0])}, 4.0)
  assert float(zero) == 0.0
  for v in (1e-3, 0.2, 0.5, 0.9, 0.999):
    c = chipnet.crispness({"a": jnp.array([0.0, 1.0, v]), "b": jnp.array([1.0])}, 4.0)
    assert float(c) > 0.0, v
  # mean over all channels together, not per group
  c = chipnet.crispness({"a": jnp.array([0.5]), "b": jnp.zeros(3)}, 2.0)
  assert np.isclose(float(c), (float(chipnet.heaviside(0.5, 2.0)) - 0.5) ** 2 / 4)


def test_soft_round_is_exact_at_0_and_1():
  for s in (10.0, 33.0, 60.0):
    r = chipnet.soft_round(jnp.array([0.0, 0.5, 1.0]), s)
    assert np.allclose(np.asarray(r), [0.0, 0.5, 1.0], atol=1e-6)


# ------------------------------------------------------------------- budgets


@pytest.mark.parametrize("unit", UNITS)
def test_soft_budget_is_the_exact_cost_ratio_at_binary_masks(r20, unit):
  for seed in range(2):
    hard = random_binary(r20, seed)
    for step in (0, 5000):  # any s, beta, gamma
      v = chipnet.soft_budget(r20, binary_zeta(hard), chipnet.hparams(step), unit)
      exact = float(jaxprune.ratio(r20, hard, unit))
      assert abs(float(v) - exact) < 1e-5, (unit, seed, float(v), exact)


def test_soft_budget_keeps_min_channels_per_group(r20):
  hard = random_binary(r20, 0)
  hard["conv1"] = jnp.zeros(16)  # the stem and residual stream, all off
  zeta = binary_zeta(hard)
  zeta["conv1"] = zeta["conv1"].at[5].set(-50.0)  # its best channel
  v = chipnet.soft_budget(r20, zeta, chipnet.hparams(0), "volume", min_channels=1)
  expect = dict(hard, conv1=jnp.zeros(16).at[5].set(1.0))
  assert abs(float(v) - float(jaxprune.ratio(r20, expect, "volume"))) < 1e-5


def test_soft_budget_matches_hand_count_on_tiny_net():
  """Tiny: conv1 3->4 (3x3, no bias) + BN, conv2 4->5 (3x3, bias), GAP, fc 5->3, on 8x8."""
  _, _, _, graph, _ = tiny_setup()
  assert sorted(g.size for g in graph.groups) == [4, 5]
  g1, g2 = sorted(graph.groups, key=lambda g: g.size)
  n1, n2, hw = 2, 3, 64
  hard = {g1.name: jnp.array([1.0, 0, 1, 0]), g2.name: jnp.array([0.0, 1, 1, 0, 1])}
  hand = {
    "channels": (n1 + n2) / 9,
    "volume": (hw * n1 + hw * n2 + 3) / (hw * 4 + hw * 5 + 3),
    "params": (27 * n1 + 2 * n1 + 9 * n1 * n2 + n2 + 3 * n2 + 3) / (27 * 4 + 2 * 4 + 9 * 4 * 5 + 5 + 3 * 5 + 3),
    "macs": (hw * 27 * n1 + hw * 9 * n1 * n2 + 3 * n2) / (hw * 27 * 4 + hw * 9 * 4 * 5 + 3 * 5),
  }
  for unit, want in hand.items():
    v = chipnet.soft_budget(graph, binary_zeta(hard), chipnet.hparams(0), unit)
    assert abs(float(v) - want) < 1e-6, (unit, float(v), want)


def test_gradient_reaches_zeta(r20):
  zeta = chipnet.init(jax.random.key(0), r20)
  loss = lambda z: chipnet.penalty(r20, z, chipnet.hparams(0), budget=0.3, unit="volume")[0]
  grads = jax.grad(loss)(zeta)
  for name, g in grads.items():
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0, name
  # the budget pushes every ζ down when the network is over budget
  assert all(float(g.mean()) > 0 for g in grads.values())


def test_bad_budgets_raise_clear_errors(r20):
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    chipnet.check_budget(r20, 0.0, "volume")
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    chipnet.check_budget(r20, 1.5, "flops")
  with pytest.raises(ValueError, match="unknown budget type.*volume"):
    chipnet.check_budget(r20, 0.5, "latency")
  floor = chipnet.budget_floor(r20, "volume", min_channels=4)
  with pytest.raises(ValueError, match="min_channels|per group"):
    chipnet.check_budget(r20, floor / 2, "volume", min_channels=4)
  with pytest.raises(ValueError, match="per group"):
    chipnet.threshold(chipnet.init(jax.random.key(0), r20), r20, floor / 2, "volume", min_channels=4)
  assert chipnet.check_budget(r20, 0.5, "flops") == "macs"


# ----------------------------------------------------------------- threshold


@pytest.mark.parametrize("budget_type,budget", [("channels", 0.4), ("volume", 0.25), ("params", 0.3), ("flops", 0.125)])
def test_threshold_meets_budget_within_one_channel(r20, budget_type, budget):
  unit = chipnet.unit_of(budget_type)
  zeta = {k: v - 0.5 for k, v in chipnet.init(jax.random.key(3), r20, high=1.0).items()}
  hard = chipnet.hard_masks(zeta, r20, budget=budget, budget_type=budget_type)
  f = jit_cost(r20)
  full, got = float(f(r20.ones())[unit]), float(f(hard)[unit])
  assert got <= budget * full * (1 + 1e-6)
  for name, m in hard.items():
    m, s = np.asarray(m), np.asarray(zeta[name])
    assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() >= 1
    if 0 < m.sum() < m.size:  # a global threshold: kept channels outscore removed ones
      assert s[m == 1].min() >= s[m == 0].max() or m.sum() == 1
  # Restoring the best removed channel (not a group's protected one) breaks the budget.
  removed = [(float(zeta[n][i]), n, i) for n, m in hard.items() for i in np.nonzero(np.asarray(m) == 0)[0]]
  _, name, i = max(removed)
  restored = dict(hard, **{name: hard[name].at[i].set(1.0)})
  assert float(f(restored)[unit]) > budget * full * (1 + 1e-6)


def test_threshold_is_global_not_per_group_normalised():
  _, _, _, graph, _ = tiny_setup()
  g1, g2 = sorted(graph.groups, key=lambda g: g.size)
  # Group 1 is uniformly high, group 2 has one high and four low channels:
  # per-group normalisation would keep group 2's lows over group 1's highs.
  scores = {g1.name: jnp.array([0.9, 0.8, 0.85, 0.95]), g2.name: jnp.array([0.99, 0.1, 0.2, 0.15, 0.05])}
  hard = chipnet.threshold(scores, graph, 6 / 9, "channels")
  assert np.asarray(hard[g1.name]).sum() == 4 and np.asarray(hard[g2.name]).tolist() == [1, 0, 1, 0, 0]


# ----------------------------------------------------------------- schedules


def test_schedules_are_per_step():
  spe = 100.0
  sched = chipnet.Schedule(steps_per_epoch=spe)
  hp = [chipnet.hparams(t, sched) for t in (0, 50, 100, 200, 1000, 10**7)]
  assert [round(float(h.gamma), 4) for h in hp[:4]] == [2.0, round(2 * 2**0.25, 4), round(2 * 2**0.5, 4), 4.0]
  assert np.isclose(float(hp[1].beta), 1.01) and np.isclose(float(hp[1].s), 12.5)
  assert float(hp[-1].gamma) == 256.0 and float(hp[-1].beta) == 6.0 and float(hp[-1].s) == 60.0
  assert all(a.gamma <= b.gamma and a.beta <= b.beta and a.s <= b.s for a, b in zip(hp, hp[1:]))
  # default: the paper's full-data epochs, 45,000 / 32 steps
  assert np.isclose(float(chipnet.hparams(45000 / 32).gamma), 2 * 2**0.5)


def test_train_step_trains_zeta_without_recompiling():
  """One jitted ChipNet step (soft masks through `masked`), fed new β/γ/s each step."""
  from experiments import chipnet as E

  model = Tiny(nnx.Rngs(0))
  graphdef, state = T.create_train_state(model, optax.identity(), 0)
  graph = E.trace_state(graphdef, state, (8, 8, 3))
  soft_apply, _ = E.make_apply_fns(graphdef, graph)
  tx = T.partition({"params": optax.adamw(1e-3, weight_decay=1e-3), "zeta": optax.adam(1e-2), "hard": None})
  zeta0 = chipnet.init(jax.random.key(1), graph)
  extra = {"zeta": zeta0, "hard": graph.ones()}
  state = state._replace(extra=extra, opt_state=tx.init({"params": state.params, "extra": extra}))
  loss = lambda v, b, f, *, rng, hparams: chipnet.penalty(graph, v.extra["zeta"], hparams, budget=0.5, unit="macs")
  step = T.make_train_step(soft_apply, tx, extra_loss=loss, donate=False)
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, 3, 4), jnp.int32),
  }
  for t in range(3):
    state, metrics = step(state, batch, None, chipnet.hparams(t * 5000.0))
  assert step._cache_size() == 1  # hparams are traced scalars
  for name, z in state.extra["zeta"].items():
    assert float(jnp.abs(z - zeta0[name]).max()) > 1e-3, name  # ζ was trained
  assert np.all(np.asarray(state.extra["hard"][graph.groups[0].name]) == 1)  # frozen
  assert {"budget_loss", "crispness", "soft_budget"} <= set(metrics)


# ------------------------------------------------------------- the pipeline


def _config(**method):
  from experiments.configs import chipnet_cifar10_subset_resnet20 as cfg

  c = cfg.get_config("quick")
  c.progress = False
  c.train.max_steps_per_epoch = 15
  c.method.soft.epochs = 2
  c.method.select_size = 128
  for k, v in method.items():
    setattr(c.method, k, v)
  return c


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  from experiments import train as train_lib

  wd = str(tmp_path_factory.mktemp("chipnet"))
  c = _config(budget=0.5, budget_type="flops")
  c.train.epochs = 2  # a dense start that beats chance
  # 15 finetune steps on the slimmed net are noise (11.7% measured); 45 recover it (27.7%)
  c.method.finetune.epochs = 3
  return wd, train_lib.train_and_evaluate(c, wd)


def test_quick_run_meets_budget_after_slimming_and_beats_chance(quick_run):
  wd, r = quick_run
  assert r["ratios"]["macs"] <= 0.5 + 1e-6 and r["achieved"] == r["ratios"]["macs"]
  assert r["ratios"]["macs"] > 0.3  # no more pruned than the budget asks
  assert all(v >= 1 for v in r["kept_per_group"].values())
  assert r["test_accuracy"] > 0.15, r["test_accuracy"]  # chance is 0.10
  assert r["test_accuracy"] > r["pruned_accuracy_before_finetune"]  # finetuning recovers
  assert r["speedup"]["speedup"] > 0
  saved = json.load(open(os.path.join(wd, "chipnet_masks.json")))
  assert sum(sum(m) for k, m in saved["masks"].items() if not k.endswith(":branch")) == r["pruned"]["channels"]
  sel = [json.loads(l) for l in open(os.path.join(wd, "soft_prune", "selection.jsonl"))]
  assert len(sel) == 2 and all(s["hard_ratio"] <= 0.5 + 1e-6 for s in sel)


def test_transfer_masks_to_mnist(quick_run, tmp_path):
  from experiments import train as train_lib

  src, r = quick_run
  c = _config(transfer_from=src)
  c.data.name = "mnist_subset_32x3"
  c.train.max_steps_per_epoch = 5
  out = train_lib.train_and_evaluate(c, str(tmp_path))
  assert out["pruned"]["macs"] == r["pruned"]["macs"]  # the same slimmed architecture
  assert out["kept_per_group"] == r["kept_per_group"] and out["test_accuracy"] is not None
  assert out["source"]["data"] == "cifar10_subset"


def test_bn_recalibrated_selection_keeps_the_candidate_it_evaluated(quick_run, tmp_path, monkeypatch):
  from experiments import chipnet as E
  from experiments import phases
  from experiments import train as train_lib

  c = _config(budget=0.5, budget_type="flops", select_bn_batches=3, pretrained=quick_run[0])
  c.method.soft.epochs, c.method.finetune.epochs = 1, 1
  calls, make = [], phases.bn_recalibration

  def counted(apply_fn):
    recalibrate = make(apply_fn)
    return lambda state, batches: calls.append(len(batches)) or recalibrate(state, batches)

  monkeypatch.setattr(phases, "bn_recalibration", counted)
  train_lib.train_and_evaluate(c, str(tmp_path))
  assert calls == [3]  # one candidate (one epoch), three batches
  best = phases.load_tree(os.path.join(tmp_path, "soft_prune", "best.msgpack"))
  # The hard-masked network as stored, evaluated here through jaxprune.masked alone.
  graphdef, state = T.create_train_state(phases.build_model(c), optax.identity(), 0)
  graph = E.trace_state(graphdef, state, (32, 32, 3), branches=c.method.units == "branch")
  fn = jaxprune.masked(jaxprune.nnx_bridge.apply_fn(graphdef), graph)
  v, hard = best["variables"], {k: jnp.asarray(m) for k, m in best["hard"].items()}
  batches = phases.eval_slice(c, "train", c.method.select_size, seed=c.seed)
  correct = sum(int((np.argmax(fn(v, hard, b["image"]), -1) == b["label"]).sum()) for b in batches)
  assert correct / c.method.select_size == pytest.approx(float(best["accuracy"]), abs=1e-6)


def test_pipeline_rejects_bad_config_before_training(tmp_path):
  from experiments import train as E

  for kw, match in [
    ({"budget": 0.0}, r"\(0, 1\]"),
    ({"budget_type": "energy"}, "budget type"),
    ({"budget": 1e-4}, "per group"),
    ({"select_on": "val"}, "select_on"),
  ]:
    with pytest.raises(ValueError, match=match):
      E.pipeline(_config(**kw), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "pretrain"))
  with pytest.raises(FileNotFoundError):
    E.pipeline(_config(transfer_from=str(tmp_path)), str(tmp_path))


# ------------------------------------------------------ official (branch) units ----


def _toy_with_projection(v, x):
  """stem 3->4 (8x8); block 1: 4->3->4 added to the stream; block 2: stride-2
  4->3->4 (4x4) added to a stride-2 1x1 projection of the stream; GAP; fc."""
  from jaxprune.models.layers import expand_channels, gather_channels

  p, o = v["params"], v["other"]
  conv = lambda h, w, s=1: jax.lax.conv_general_dilated(  # noqa: E731
    h, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  h = expand_channels(jax.nn.relu(conv(x, p["stem"])), o["stem_i"])
  u = jax.nn.relu(conv(gather_channels(h, o["in1"]), p["c1a"]))
  h = jax.nn.relu(h + expand_channels(conv(u, p["c1b"]), o["out1"]))
  g = gather_channels(h, o["in2"])
  u = jax.nn.relu(conv(g, p["c2a"], 2))
  h = jax.nn.relu(expand_channels(conv(u, p["c2b"]), o["out2"]) + expand_channels(conv(g, p["ds"], 2), o["ds_i"]))
  return gather_channels(h.mean((1, 2)), o["fc_i"]) @ p["fc"]


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  w = lambda *s: jnp.asarray(rng.normal(0, 0.5, s), jnp.float32)  # noqa: E731
  v = {
    "params": {
      "stem": w(3, 3, 3, 4),
      "c1a": w(3, 3, 4, 3),
      "c1b": w(3, 3, 3, 4),
      "c2a": w(3, 3, 4, 3),
      "c2b": w(3, 3, 3, 4),
      "ds": w(1, 1, 4, 4),
      "fc": w(4, 2),
    },
    "other": {n: jnp.arange(4, dtype=jnp.int32) for n in ("stem_i", "in1", "out1", "in2", "out2", "ds_i", "fc_i")},
  }
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  return v, x, jaxprune.trace(_toy_with_projection, v, x[:1], branches=True)


def test_branch_units_are_the_official_set(toy):
  _, _, graph = toy
  assert chipnet.unit_groups(graph) == ["c1a", "c2a", "stem:branch", "c1b:branch", "c2b:branch", "ds:branch"]
  assert graph.streams() == ["stem", "c2b"]  # the two residual streams stay whole
  # ResNet-20 with projection shortcuts, as the official code builds it
  from test_branches import branch_setup

  g = branch_setup("resnet20_b", 16)[3]
  units = chipnet.unit_groups(g)
  want = (
    ["conv1:branch"]
    + [f"layer{s}.{i}.{c}" for s in (1, 2, 3) for i in range(3) for c in ("conv1", "conv2:branch")]
    + ["layer2.0.downsample.conv:branch", "layer3.0.downsample.conv:branch"]
  )
  assert sorted(units) == sorted(want)
  assert not set(units) & set(g.streams())


def test_volume_paper_by_hand(toy):
  _, _, graph = toy
  rng = np.random.default_rng(1)
  units = chipnet.unit_groups(graph)
  for _ in range(3):
    m = {n: (rng.random(graph.group(n).size) < 0.5).astype(np.float32) for n in units}
    s = {n: m[n].sum() for n in units}
    # stem, block 1 at 8x8 = 64; block 2 and the projection at 4x4 = 16
    want = (
      64 * (s["stem:branch"] + s["c1a"] + s["c1b:branch"]) + 16 * (s["c2a"] + s["c2b:branch"] + s["ds:branch"])
    ) / (64 * (4 + 3 + 4) + 16 * (3 + 4 + 4))
    assert float(chipnet.paper_volume(graph, m)) == pytest.approx(want)
  assert float(chipnet.paper_volume(graph, {n: np.ones(graph.group(n).size) for n in units})) == 1.0


@pytest.mark.parametrize("unit", ["volume", "macs", "params", "channels", "volume_paper"])
def test_soft_budget_is_the_exact_ratio_at_binary_masks_with_branches(toy, unit):
  _, _, graph = toy
  rng = np.random.default_rng(2)
  units = chipnet.unit_groups(graph)
  big = 40.0  # saturates the logistic and the Heaviside: binary z
  for _ in range(3):
    zeta = {n: jnp.asarray(np.where(rng.random(graph.group(n).size) < 0.5, big, -big), jnp.float32) for n in units}
    hp = chipnet.Hparams(np.float32(6.0), np.float32(256.0), np.float32(60.0))
    hard = {n: (v > 0).astype(jnp.float32) for n, v in zeta.items()}
    hard = chipnet.keep_best(hard, zeta, 1)
    if unit == "volume_paper":
      want = chipnet.paper_volume(graph, hard)
    elif unit == "channels":  # the kept share of the masked units' entries
      want = sum(float(h.sum()) for h in hard.values()) / sum(graph.group(n).size for n in hard)
    else:
      want = jaxprune.ratio(graph, graph.complete(hard), unit)
    got = chipnet.soft_budget(graph, zeta, hp, unit)
    assert float(got) == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize(
  "budget_type,budget", [("volume", 0.5), ("volume", 0.25), ("volume_paper", 0.25), ("flops", 0.5)]
)
def test_threshold_on_branch_units_meets_budget_and_masked_equals_slimmed(budget_type, budget):
  from custom_models import jit_masked, param_count
  from test_branches import branch_setup

  model, fn, v, graph, x = branch_setup("resnet20_b", 16)
  units = chipnet.unit_groups(graph)
  zeta = chipnet.init(jax.random.key(3), graph, high=1.0)
  hard = chipnet.hard_masks(zeta, graph, budget=budget, budget_type=budget_type)
  assert set(hard) == {g.name for g in graph.groups}
  for n in graph.streams():
    assert float(hard[n].min()) == 1.0
  unit = chipnet.unit_of(budget_type)
  achieved = float(chipnet.budget_ratio(graph, {n: hard[n] for n in units}, unit))
  assert achieved <= budget * (1 + 1e-6)
  small = jaxprune.slim_module(model, graph, hard)
  np.testing.assert_allclose(np.asarray(small(x)), np.asarray(jit_masked(fn, graph)(v, hard, x)), atol=1e-4)
  # the slimmed network holds what the graph counted; it is counted, not re-traced
  _, v_s = jaxprune.functional(small)
  assert param_count(v_s) == float(jaxprune.cost(graph, hard).params)
  fn_s = jaxprune.functional(small)[0]
  with pytest.raises(jaxprune.UnsupportedPrimitiveError, match="slimmed"):
    jaxprune.trace(fn_s, v_s, x[:1])
