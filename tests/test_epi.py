"""EPI: similarity, indicator, trigger, tracker, criteria, optimizer-state slicing, compute."""

import functools
from fractions import Fraction

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from custom_models import build, input_, zoo
from flax import nnx
from hypothesis import given, settings

import jaxprune
import jaxprune.training as T
from jaxprune.methods import epi

# --------------------------------------------------------------- Psi, EPI ---


def test_psi_hand_values():
  a, b = jnp.array([4, 2, 0]), jnp.array([2, 2, 0])
  # |4-2| / (4+2) = 1/3, 0, and 0 for the empty group
  assert float(epi.psi(a, b)) == pytest.approx(1 - (1 / 3) / 3)
  assert float(epi.psi(a, b, "max")) == pytest.approx(1 - (2 / 4) / 3)
  assert float(epi.psi(a, b, "width", widths=[8, 4, 2])) == pytest.approx(1 - (2 / 8) / 3)
  assert float(epi.psi(jnp.array([1, 3]), jnp.array([3, 1]))) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="widths"):
    epi.psi(a, b, "width")
  with pytest.raises(ValueError, match="norm"):
    epi.psi(a, b, "l2")


counts = st.lists(st.integers(0, 64), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_psi_properties(data):
  a = data.draw(counts)
  b = data.draw(st.lists(st.integers(0, 64), min_size=len(a), max_size=len(a)))
  for norm in ("sum", "max", "width"):
    kw = {"widths": [64] * len(a)} if norm == "width" else {}
    s_ab = float(epi.psi(jnp.array(a), jnp.array(b), norm, **kw))
    assert float(epi.psi(jnp.array(a), jnp.array(a), norm, **kw)) == 1.0
    assert s_ab == float(epi.psi(jnp.array(b), jnp.array(a), norm, **kw))
    assert 0.0 <= s_ab <= 1.0
  # Psi by hand, in exact arithmetic
  hand = 1 - sum(Fraction(abs(x - y), x + y) if x + y else 0 for x, y in zip(a, b)) / len(a)
  assert float(epi.psi(jnp.array(a), jnp.array(b))) == pytest.approx(float(hand), abs=1e-6)


def _epi_by_hand(hist, r):
  out = []
  for t in range(len(hist)):
    if t < r:
      out.append(np.nan)
      continue
    sims = [
      1 - sum(Fraction(abs(x - y), x + y) if x + y else 0 for x, y in zip(hist[t], hist[t - j])) / len(hist[t])
      for j in range(1, r + 1)
    ]
    out.append(float(sum(sims) / r))
  return np.array(out)


def test_epi_series_synthetic_vs_hand():
  hist = [[8, 4], [6, 4], [6, 3], [5, 3], [5, 3], [5, 3], [5, 3]]
  got = np.asarray(epi.epi_series(jnp.array(hist), r=2))
  np.testing.assert_allclose(got, _epi_by_hand(hist, 2), rtol=1e-6)
  # first values by hand: t=2: Psi(A2,A1) = 1 - (0 + 1/7)/2, Psi(A2,A0) = 1 - (2/14 + 1/7)/2
  assert got[2] == pytest.approx(((1 - 1 / 14) + (1 - 1 / 7)) / 2)
  assert np.isnan(got[:2]).all() and got[-1] == 1.0
  np.testing.assert_allclose(np.asarray(epi.epi_series(jnp.array(hist), r=5))[5:], _epi_by_hand(hist, 5)[5:], rtol=1e-6)


def test_hamming_series_hand_values():
  m = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)
  got = np.asarray(epi.hamming_series(jnp.asarray(m), keep=3))
  # t=2: vs t-1 equal (0), vs t-2: 2 of 4 differ; t=3: vs t-1: 1/4, vs t-2: 1/4
  np.testing.assert_allclose(got, [np.nan, np.nan, 0.5, 0.25])


# ----------------------------------------------------------------- trigger ---


def test_trigger_short_history_never_fires():
  e = jnp.array([np.nan, np.nan, 0.99, 0.995, 0.999])
  assert not np.asarray(epi.epi_triggers(e, 0.9, window=5)).any()
  # with an incomplete window allowed, the first value with a defined predecessor may fire
  got = np.asarray(epi.epi_triggers(e, 0.9, window=5, full_window=False))
  assert got.tolist() == [False, False, False, True, True]


def test_trigger_plateau_ties_and_threshold():
  plateau = jnp.array([np.nan] + [0.99] * 7)
  assert epi.first(epi.epi_triggers(plateau, 0.98, window=3)) == 4  # needs EPI_1..3 defined
  assert epi.first(epi.epi_triggers(plateau, 0.98, window=3, strict=True)) == -1  # ties
  assert epi.first(epi.epi_triggers(plateau, 0.995, window=3)) == -1  # below tau
  at_tau = jnp.array([0.5, 0.6, 0.7, 0.98])
  assert epi.first(epi.epi_triggers(at_tau, 0.98, window=3)) == 3
  assert epi.first(epi.epi_triggers(at_tau, 0.98, window=3, strict=True)) == -1
  # above tau but lower than a value in the window: waits for a new maximum
  dip = jnp.array([0.9, 0.99, 0.985, 0.986, 0.987, 0.991])
  assert np.asarray(epi.epi_triggers(dip, 0.98, window=3)).tolist() == [False, False, False, False, False, True]


@settings(max_examples=30, deadline=None)
@given(
  st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=12, max_size=12),
  st.floats(0, 1),
  st.integers(1, 6),
  st.booleans(),
)
def test_trigger_matches_definition(values, tau, window, strict):
  got = np.asarray(epi.epi_triggers(jnp.array(values, jnp.float32), tau, window, strict=strict))
  v = np.asarray(values, np.float32)
  cmp = (lambda x, y: x > y) if strict else (lambda x, y: x >= y)
  for t in range(len(v)):
    want = t >= window and bool(cmp(v[t], np.float32(tau))) and all(cmp(v[t], v[t - j]) for j in range(1, window + 1))
    assert got[t] == want


# ----------------------------------------------------------------- tracker ---


CFG = epi.Config(r=2, window=2, tau=0.9)


def _run(update, hist, masks, cfg=CFG, state=None):
  state = epi.init([8, 4], len(hist)) if state is None else state
  fires = []
  for c, m in zip(hist, masks):
    state, f = update(state, jnp.array(c), jnp.array(m), cfg)
    fires.append(bool(f))
  return state, fires


HIST = [[8, 4], [6, 4], [6, 3], [5, 3], [5, 3], [5, 3], [5, 3], [5, 3]]
MASKS = [np.arange(12) < sum(c) for c in HIST]  # any flat masks of 12 channels


@pytest.mark.parametrize("jit", [False, True])
def test_tracker_records_epi_and_fires_once(jit):
  update = jax.jit(epi.update, static_argnames="config") if jit else epi.update
  state, fires = _run(update, HIST, MASKS)
  want = _epi_by_hand(HIST, 2)
  np.testing.assert_allclose(epi.history(state)["epi"], want, rtol=1e-6)
  # the checkpointed state itself is finite (the trainer's non-finite guard checks it)
  assert all(np.isfinite(np.asarray(x)).all() for x in state)
  # by hand: EPI = nan nan .893 .875 .958 1 1 1; the first EPI >= .9 with two defined,
  # not-larger predecessors is t = 4 (0.958 >= 0.875, 0.893)
  assert fires == [False] * 4 + [True] + [False] * 3
  assert epi.fire_epoch(state) == 4 and int(state.size) == len(HIST)
  np.testing.assert_array_equal(epi.history(state)["counts"], HIST)


def test_tracker_jit_does_not_recompile_on_new_values():
  update = jax.jit(epi.update, static_argnames="config")
  state = epi.init([8, 4], 6)
  state, _ = update(state, jnp.array([8, 4]), jnp.ones(12, bool), CFG)
  size = update._cache_size()
  for c in HIST[1:6]:
    state, _ = update(state, jnp.array(c), jnp.ones(12, bool), CFG)
  assert update._cache_size() == size


def test_tracker_first_epoch_full_and_shape_errors():
  state, _ = _run(epi.update, HIST, MASKS, state=epi.init([8, 4], len(HIST), first_epoch=1))
  assert epi.fire_epoch(state) == 5
  with pytest.raises(ValueError, match="full"):
    epi.update(state, jnp.array([5, 3]), jnp.ones(12), CFG)
  with pytest.raises(ValueError, match="match"):
    epi.update(epi.init([8, 4], 3), jnp.array([5, 3, 1]), jnp.ones(12), CFG)


def test_early_bird_indicator():
  masks = [
    np.array(m, bool)
    for m in ([1] * 6 + [0] * 6, [1] * 5 + [0] * 7, [1] * 6 + [0] * 6, [1] * 6 + [0] * 6, [1] * 6 + [0] * 6)
  ]
  cfg = epi.Config(indicator="early_bird", eb_keep=3, eb_eps=0.0)
  state, fires = _run(epi.update, [[6, 0]] * 5, masks, cfg, epi.init([8, 4], 5))
  # distances to the 2 previous masks: t=2: 1/12, 0; t=3: 0, 1/12; t=4: 0, 0
  np.testing.assert_allclose(epi.history(state)["eb"], [np.nan, np.nan, 1 / 12, 1 / 12, 0.0])
  assert fires == [False] * 4 + [True]


def test_tracker_checkpoint_roundtrip_resumes_identically(tmp_path):
  full, fires = _run(epi.update, HIST, MASKS)
  part, _ = _run(epi.update, HIST[:3], MASKS[:3], state=epi.init([8, 4], len(HIST)))
  with T.Checkpointer(str(tmp_path / "ckpt")) as ck:
    ck.save(3, part)
  with T.Checkpointer(str(tmp_path / "ckpt")) as ck:
    restored, _ = ck.restore(epi.init([8, 4], len(HIST)))
  resumed, fires2 = _run(epi.update, HIST[3:], MASKS[3:], state=restored)
  assert fires2 == fires[3:]
  for a, b in zip(resumed, full):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_calibrate_tau():
  curve = np.array([np.nan, np.nan, 0.80, 0.85, 0.84, 0.90, 0.93, 0.95, 0.95, 0.97, 0.99])
  cfg = epi.Config(window=2, r=2)
  # sweep: pruning at 0..4 loses, from 6 on it is within 0.5 points of the best
  cal = epi.calibrate_tau(curve, [0, 2, 4, 6, 8, 10], [60.0, 64.0, 66.0, 69.6, 70.0, 69.8], tolerance=0.5, config=cfg)
  # plateaus (>= the two previous values): t = 5, 6, 7, 8, 9, 10 (t=3 has one predecessor);
  # the last before epoch 6 is t=5 (0.90), the first from 6 on is t=6 (0.93)
  assert cal.target_epoch == 6 and cal.fire_epoch == 6
  assert (cal.low, cal.high) == (pytest.approx(0.90), pytest.approx(0.93))
  fired = epi.first(epi.epi_triggers(jnp.array(curve), cal.tau, 2))
  assert fired == 6
  strict = epi.calibrate_tau(curve, [0, 8], [60.0, 70.0], tolerance=0.1, config=epi.Config(window=2, strict=True))
  assert strict.target_epoch == 8
  # with strict ">": 0.95 at t=8 ties t=7, so the first strict plateau from 8 on is t=9
  assert epi.first(epi.epi_triggers(jnp.array(curve), strict.tau, 2, strict=True)) == 9
  with pytest.raises(ValueError, match="plateau"):
    epi.calibrate_tau(curve[:6], [0, 8], [60.0, 70.0], tolerance=0.1, config=cfg)


def test_config_errors_and_defaults():
  assert epi.Config().threshold == 0.983 and epi.Config(criterion="taylor").threshold == 0.944
  assert epi.Config().norm == "group_mean" and epi.Config(criterion="taylor").norm == "raw"
  for bad, match in [
    ({"criterion": "l1"}, "criterion"),
    ({"prune_ratio": 1.0}, "prune_ratio"),
    ({"unit": "joules"}, "unit"),
    ({"distance_norm": "l2"}, "distance_norm"),
    ({"r": 0}, "r must"),
    ({"criterion": "taylor", "score_norm": "rms"}, "rms"),
    ({"indicator": "eb"}, "indicator"),
    ({"eb_keep": 1}, "eb_keep"),
  ]:
    with pytest.raises(ValueError, match=match):
      epi.Config(**bad)
  assert jaxprune.methods.get("epi") is epi


# ------------------------------------------------------- criteria on a model ---


class Residual(nnx.Module):
  """a (3 -> 6) + BN -> relu -> h; relu(h + BN(b(h))) couples a and b; c (6 -> 5) + BN; fc."""

  def __init__(self, rngs: nnx.Rngs):
    conv = lambda i, o: nnx.Conv(i, o, (3, 3), use_bias=False, rngs=rngs)
    self.a, self.bna = conv(3, 6), nnx.BatchNorm(6, rngs=rngs)
    self.b, self.bnb = conv(6, 6), nnx.BatchNorm(6, rngs=rngs)
    self.c, self.bnc = conv(6, 5), nnx.BatchNorm(5, rngs=rngs)
    self.fc = nnx.Linear(5, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bna(self.a(x)))
    y = nnx.relu(h + self.bnb(self.b(h)))
    z = nnx.relu(self.bnc(self.c(y)))
    return self.fc(z.mean((1, 2)))


@functools.lru_cache(maxsize=None)
def residual_setup():
  model = build(Residual)
  fn, variables = jaxprune.functional(model)
  x = input_((4, 8, 8, 3))
  graph = jaxprune.trace(fn, variables, x[:1])
  return model, variables, graph, x


def test_channel_leaves_finds_coupled_bns_and_filters():
  _, variables, graph, _ = residual_setup()
  spec = epi.channel_leaves(graph)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  by_size = {g.size: g for g in spec.groups}
  bn = sorted(names[s.leaf] for pair in by_size[6].bn for s in pair)
  assert bn == sorted(f"['{l}']['{k}']" for l in ("bna", "bnb") for k in ("bias", "scale"))
  assert sorted(names[s.leaf] for s in by_size[6].kernels) == ["['a']['kernel']", "['b']['kernel']"]
  assert [names[s.leaf] for s in by_size[5].kernels] == ["['c']['kernel']"]


def test_magnitude_rms_by_hand():
  _, variables, graph, _ = residual_setup()
  p = jax.tree.map(np.asarray, variables["params"])
  got = epi.magnitude_rms(epi.channel_leaves(graph), variables["params"])
  by_size = {g.size: g.name for g in graph.groups}
  ab = np.concatenate([p["a"]["kernel"].reshape(-1, 6), p["b"]["kernel"].reshape(-1, 6)])
  np.testing.assert_allclose(got[by_size[6]], np.sqrt((ab**2).mean(0)), rtol=1e-5)
  np.testing.assert_allclose(got[by_size[5]], np.sqrt((p["c"]["kernel"].reshape(-1, 5) ** 2).mean(0)), rtol=1e-5)


def _loss(graphdef, variables, x, y):
  apply = jaxprune.nnx_bridge.apply_fn(graphdef, train=True)

  def loss(params):
    logits, _ = apply({**variables, "params": params}, x)
    # T.cross_entropy without its float32 cast (the finite-difference test runs in float64)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def _random_bn(variables, seed=0):
  # gamma, beta away from their init (1, 0) so both Taylor terms matter
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
    lambda path, v: jnp.asarray(
      rng.uniform(0.5, 1.5, v.shape)
      if "scale" in str(path[-1])
      else rng.normal(0, 0.3, v.shape)
      if "bn" in str(path[0])
      else v,
      jnp.float32,
    ),
    variables["params"],
  )
  return {**variables, "params": params}


@pytest.mark.parametrize("jit", [False, True])
def test_taylor_step_equals_finite_difference(jit):
  """gamma g_gamma + beta g_beta summed over a group's BNs is d/de L(gamma(1+e), beta(1+e))."""
  model, variables, graph, x = residual_setup()
  spec = epi.channel_leaves(graph)
  step = jax.jit(epi.taylor_step, static_argnums=0) if jit else epi.taylor_step
  offsets = np.cumsum([0] + [g.size for g in graph.groups])
  members = {6: ("bna", "bnb"), 5: ("bnc",)}
  with jax.enable_x64(True):  # float64: central differences to ~1e-8
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), _random_bn(variables))
    loss = jax.jit(_loss(nnx.graphdef(model), variables, jnp.asarray(x, jnp.float64), jnp.arange(4) % 10))
    got = np.asarray(step(spec, variables["params"], jax.grad(loss)(variables["params"])))
    eps = 1e-5
    for g, start in zip(graph.groups, offsets):
      for c in range(g.size):

        def scaled(e):
          p = jax.tree.map(lambda v: v, variables["params"])
          for bn in members[g.size]:
            p[bn] = {k: v.at[c].multiply(1 + e) for k, v in p[bn].items()}
          return float(loss(p))

        fd = (scaled(eps) - scaled(-eps)) / (2 * eps)
        assert got[start + c] == pytest.approx(abs(fd), rel=1e-4, abs=1e-8)


def test_taylor_accumulator_vs_per_batch_direct_and_optimizer_stage():
  """The accumulator inside the project's train step (an optax stage) equals the mean over
  steps of the per-batch score, computed directly from jax.grad on the same params."""
  model, variables, graph, _ = residual_setup()
  variables = _random_bn(variables, seed=1)
  model = jaxprune.module(model, variables)
  spec = epi.channel_leaves(graph)
  tx = optax.sgd(0.05, momentum=0.9)
  graphdef, state = T.create_train_state(model, optax.chain(epi.taylor_transform(spec), tx), rng=0)
  step = T.make_train_step(T.nnx_apply(graphdef), optax.chain(epi.taylor_transform(spec), tx), donate=False)
  batches = [{"image": input_((4, 8, 8, 3), seed=s), "label": jnp.arange(4) % 10 + s % 3} for s in range(3)]
  bns = {6: ("bna", "bnb"), 5: ("bnc",)}
  direct, params, opt = [], state.params, tx.init({"params": state.params, "extra": {}})
  v = {"params": params, "batch_stats": state.batch_stats, "other": state.other}
  grad = jax.jit(lambda p, x, y: jax.grad(_loss(graphdef, v, x, y))(p))
  for b in batches:
    g = grad(params, b["image"], b["label"])
    direct.append(
      np.abs(
        np.concatenate(
          [
            sum(params[bn]["scale"] * g[bn]["scale"] + params[bn]["bias"] * g[bn]["bias"] for bn in bns[grp.size])
            for grp in graph.groups
          ]
        )
      )
    )
    upd, opt = tx.update({"params": g, "extra": {}}, opt, {"params": params, "extra": {}})
    params = optax.apply_updates(params, upd["params"])
    state, _ = step(state, b)
  acc = state.opt_state[0]
  assert int(acc.count) == 3
  np.testing.assert_allclose(np.asarray(acc.total) / 3, np.mean(direct, 0), rtol=2e-4, atol=1e-7)
  scores = epi.taylor_scores(acc, spec)
  np.testing.assert_allclose(
    np.concatenate([scores[g.name] for g in graph.groups]), np.mean(direct, 0), rtol=2e-4, atol=1e-7
  )
  # the optax stage leaves the training itself alone
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, params)


def test_taylor_skips_non_finite_steps_and_needs_steps():
  _, variables, graph, _ = residual_setup()
  spec = epi.channel_leaves(graph)
  acc = epi.taylor_init(spec)
  with pytest.raises(ValueError, match="no Taylor steps"):
    epi.taylor_scores(acc, spec)
  bad = jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), variables["params"])
  acc = epi.taylor_accumulate(acc, spec, variables["params"], bad)
  assert int(acc.count) == 0 and np.all(np.asarray(acc.total) == 0)
  with pytest.raises(ValueError, match="structure"):
    epi.taylor_step(spec, variables["params"], {"a": 1})


def test_taylor_on_resnet20_residual_stream_by_hand():
  """The stage-1 stream of an option-A ResNet-20 is one group written by the stem and every
  block's bn2; in stages 2 and 3 its 8 channels sit in the middle of the zero-padded stream
  (channels 4..11 of 16, then 12..19 of 32)."""
  model = zoo("resnet20", widths=(8, 16, 32))
  fn, variables = jaxprune.functional(model)
  graph = jaxprune.trace(fn, variables, jnp.zeros((1, 32, 32, 3)))
  spec = epi.channel_leaves(graph)
  stream = next(g for g in spec.groups if g.name == "conv1")
  assert len(stream.bn) == 10 and len(stream.kernels) == 10
  p = variables["params"]
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), p)
  got = np.asarray(epi.taylor_step(spec, p, grads))[:8]  # the stem's group comes first
  assert graph.groups[0].name == "conv1"
  offset = {"layer1": 0, "layer2": 4, "layer3": 12}
  bns = [("bn1", 0)] + [((layer, str(b), "bn2"), offset[layer]) for layer in offset for b in range(3)]
  total = np.zeros(8)
  for path, off in bns:
    get = lambda t: functools.reduce(
      lambda d, k: d[int(k) if k.isdigit() else k], path if isinstance(path, tuple) else (path,), t
    )
    bp, bg = get(p), get(grads)
    total += np.asarray(bp["scale"] * bg["scale"] + bp["bias"] * bg["bias"])[off : off + 8]
  np.testing.assert_allclose(got, np.abs(total), rtol=1e-5, atol=1e-6)


def test_branch_groups_score_their_producer_and_prune_mid_training():
  """With trace(branches=True) each residual producer is a group of its own: its Taylor score
  is that producer's BN alone, and the dominant sub-network over channel and branch groups
  slims, with the optimizer state, into a network whose train step runs."""
  model = zoo("resnet20", widths=(8, 16, 32))
  fn, variables = jaxprune.functional(model)
  graph = jaxprune.trace(fn, variables, jnp.zeros((1, 32, 32, 3)), branches=True)
  spec = epi.channel_leaves(graph)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  branch = next(g for g in spec.groups if g.name == "layer2.1.conv2:branch")
  assert [names[s.leaf] for pair in branch.bn for s in pair] == [
    "['layer2'][1]['bn2']['scale']",
    "['layer2'][1]['bn2']['bias']",
  ]
  assert [names[s.leaf] for s in branch.kernels] == ["['layer2'][1]['conv2']['kernel']"]
  p = variables["params"]
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), p)
  offsets = dict(zip([g.name for g in graph.groups], np.cumsum([0] + [g.size for g in graph.groups])))
  got = np.asarray(epi.taylor_step(spec, p, grads))[offsets[branch.name] :][: branch.size]
  bp, bg = p["layer2"][1]["bn2"], grads["layer2"][1]["bn2"]
  np.testing.assert_allclose(got, np.abs(bp["scale"] * bg["scale"] + bp["bias"] * bg["bias"]), rtol=1e-5, atol=1e-6)

  cfg = epi.Config(unit="macs")
  sub = epi.dominant(epi.scores(cfg, spec, graph, variables), graph, cfg)
  assert float(jaxprune.ratio(graph, sub.masks)) <= 0.5 + 1e-6
  assert len(sub.counts) == len(graph.groups) and sub.counts.sum() == sub.flat.sum()
  tx = optax.sgd(0.1, momentum=0.9)
  graphdef, state = T.create_train_state(model, tx, rng=0)
  step = T.make_train_step(T.nnx_apply(graphdef), tx, donate=False)
  batch = {"image": input_((4, 32, 32, 3)), "label": jnp.arange(4)}
  state, _ = step(state, batch)
  small = epi.slim_state(state, graph, sub.masks)
  v_small = {"params": small.params, "batch_stats": small.batch_stats, "other": small.other}
  small_model = jaxprune.module(graphdef, v_small, jnp.zeros((1, 32, 32, 3)))
  jax.tree.map(
    lambda m, q: np.testing.assert_equal(np.shape(m), np.shape(q)), small.opt_state[0].trace["params"], small.params
  )
  small, metrics = T.make_train_step(T.nnx_apply(nnx.graphdef(small_model)), tx)(small, batch)
  assert np.isfinite(float(metrics["loss"])) and int(small.step) == 2


def test_dominant_counts_budget_and_min_keep():
  _, variables, graph, _ = residual_setup()
  spec = epi.channel_leaves(graph)
  for cfg in (
    epi.Config(prune_ratio=0.5),
    epi.Config(prune_ratio=0.6, min_keep=2),
    epi.Config(prune_ratio=0.5, score_norm="rms", unit="macs"),
  ):
    sub = epi.dominant(epi.scores(cfg, spec, graph, variables), graph, cfg)
    assert sub.counts.tolist() == [int(np.asarray(sub.masks[g.name]).sum()) for g in graph.groups]
    assert sub.flat.sum() == sub.counts.sum() and min(sub.counts) >= cfg.min_keep
    assert float(jaxprune.ratio(graph, sub.masks, cfg.unit)) <= 1 - cfg.prune_ratio + 1e-6
  # at 0.5 of 11 channels: the selection keeps 5
  sub = epi.dominant(epi.scores(epi.Config(), spec, graph, variables), graph, epi.Config())
  assert sub.counts.sum() == 5


# ------------------------------------------------- pruning mid-training ---


def _kept(mask):
  return np.nonzero(np.asarray(mask) > 0)[0]


@pytest.mark.parametrize(
  "make_tx,trees",
  [
    (lambda: optax.sgd(0.1, momentum=0.9), 1),  # momentum
    (lambda: optax.adam(1e-2), 2),  # mu, nu
    (lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)), 1),
  ],
)
def test_slim_opt_state_keeps_kept_momentum_exactly(make_tx, trees):
  model, variables, graph, x = residual_setup()
  tx = make_tx()
  params = variables["params"]
  opt = tx.init(params)
  grad = jax.jit(jax.grad(_loss(nnx.graphdef(model), variables, x, jnp.arange(4) % 10)))
  for _ in range(2):
    upd, opt = tx.update(grad(params), opt, params)
    params = optax.apply_updates(params, upd)
  v = {**variables, "params": params}
  sizes = {g.size: g.name for g in graph.groups}
  masks = {sizes[6]: jnp.array([1.0, 0, 1, 1, 0, 0]), sizes[5]: jnp.array([0.0, 1, 1, 0, 1])}
  small = epi.slim_opt_state(opt, v, graph, masks)
  k6, k5 = _kept(masks[sizes[6]]), _kept(masks[sizes[5]])
  hand = {
    "a": {"kernel": lambda m: m[..., k6]},
    "b": {"kernel": lambda m: m[:, :, k6][..., k6]},
    "c": {"kernel": lambda m: m[:, :, k6][..., k5]},
    "fc": {"kernel": lambda m: m[k5], "bias": lambda m: m},
    "bna": {"scale": lambda m: m[k6], "bias": lambda m: m[k6]},
    "bnb": {"scale": lambda m: m[k6], "bias": lambda m: m[k6]},
    "bnc": {"scale": lambda m: m[k5], "bias": lambda m: m[k5]},
  }
  treedef = jax.tree_util.tree_structure(params)
  n_checked = 0
  for before, after in zip(
    jax.tree_util.tree_leaves(opt, is_leaf=lambda t: jax.tree_util.tree_structure(t) == treedef),
    jax.tree_util.tree_leaves(small, is_leaf=lambda t: jax.tree_util.tree_structure(t) == treedef),
  ):
    if jax.tree_util.tree_structure(before) != treedef:
      np.testing.assert_array_equal(before, after)  # counts stay
      continue
    for layer, fns in hand.items():
      for name, f in fns.items():
        np.testing.assert_array_equal(np.asarray(after[layer][name]), f(np.asarray(before[layer][name])))
        n_checked += 1
  assert n_checked == 11 * trees  # every params leaf of every params-shaped tree


def test_slimmed_train_step_continues_like_the_masked_one():
  """Two steps dense, prune; one more step slimmed equals one more step masked (same
  optimizer state, kept channels) and the lr schedule continues."""
  model, variables, graph, x = residual_setup()
  schedule = optax.cosine_decay_schedule(0.1, 10)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9, nesterov=True))
  graphdef, state = T.create_train_state(model, tx, rng=0)
  step = T.make_train_step(T.nnx_apply(graphdef), tx, schedule=schedule, donate=False)
  batch = lambda s: {"image": input_((4, 8, 8, 3), seed=s), "label": (jnp.arange(4) + s) % 10}
  for s in range(2):
    state, _ = step(state, batch(s))
  sizes = {g.size: g.name for g in graph.groups}
  masks = {sizes[6]: jnp.array([1.0, 0, 1, 1, 0, 1]), sizes[5]: jnp.array([0.0, 1, 1, 1, 1])}
  slim = epi.slim_state(state, graph, masks)
  small_model = jaxprune.module(
    graphdef, {"params": slim.params, "batch_stats": slim.batch_stats, "other": slim.other}, x[:1]
  )
  small_step = T.make_train_step(T.nnx_apply(nnx.graphdef(small_model)), tx, schedule=schedule, donate=False)
  after_small, m_small = small_step(slim, batch(2))
  pmask = jaxprune.expand(graph, masks)["params"]
  after_masked, m_masked = step(state, batch(2), pmask)
  assert int(after_small.step) == 3 and float(m_small["lr"]) == pytest.approx(float(schedule(2)))
  assert float(m_small["loss"]) == pytest.approx(float(m_masked["loss"]), rel=1e-5)
  want = jaxprune.slim(
    {"params": after_masked.params, "batch_stats": after_masked.batch_stats, "other": after_masked.other}, graph, masks
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    {"params": after_small.params, "batch_stats": after_small.batch_stats},
    {"params": want["params"], "batch_stats": want["batch_stats"]},
  )


# ----------------------------------------------------------------- compute ---


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1, self.l2 = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_compute_accounting_by_hand():
  fn, variables = jaxprune.functional(build(MLP))
  graph = jaxprune.trace(fn, variables, jnp.zeros((1, 4)))
  (g,) = graph.groups
  half = {g.name: jnp.array([1.0, 1, 1, 0, 0, 0])}
  # forward MACs: 4*6 + 6*3 = 42 dense, 4*3 + 3*3 = 21 with 3 of 6 hidden units
  assert epi.train_macs_per_sample(graph) == 3 * 42
  assert epi.train_macs_per_sample(graph, half) == 3 * 21
  c = epi.compare_compute(42, 21, epochs=10, prune_epoch=3, samples_per_epoch=100, finetune_epochs=5)
  assert c.pat == 3 * 100 * (3 * 42 + 7 * 21)
  assert c.at_init == 3 * 100 * 10 * 21
  assert c.train_prune_finetune == 3 * 100 * (10 * 42 + 5 * 21)
  assert c.dense == 3 * 100 * 10 * 42
  assert c.saving == pytest.approx((420 + 105) / (126 + 147))
  assert epi.training_macs([42, 42, 21], 10) == 3 * 10 * 105
  with pytest.raises(ValueError, match="prune_epoch"):
    epi.compare_compute(42, 21, epochs=10, prune_epoch=11, samples_per_epoch=1)
