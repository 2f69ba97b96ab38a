"""jaxprune.deploy: BatchNorm folding, channel padding, export and loading.

Folded networks are compared with the unfolded network computed by flax's own
BatchNorm (random statistics, not the identity of a fresh model); loaded
artifacts with the slimmed NNX module; padded networks with the unpadded one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import Custom, Tiny, build, input_, random_hard_masks, zoo
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import deploy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close(a, b, rel=1e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  scale = max(1.0, float(np.abs(b).max()))
  assert np.abs(a - b).max() < rel * scale, (np.abs(a - b).max(), scale)


def bn_paths(variables) -> set[str]:
  return {n.rsplit(".", 1)[0].split(".", 1)[1] for n in deploy.leaf_paths(variables) if n.endswith(".mean")}


def slimmed(name, hw, branches, seed=0):
  model = zoo(name, seed=seed)
  fn, v = jaxprune.functional(model)
  x = input_((2, hw, hw, 3), seed=seed + 1)
  graph = jaxprune.trace(fn, v, x[:1], branches=branches)
  masks = random_hard_masks(graph, np.random.default_rng(seed))
  return model, fn, v, graph, masks, x


# -------------------------------------------------------------------- folding --


@pytest.mark.parametrize(
  "name,hw,branches",
  [
    ("resnet20", 32, False),
    ("resnet20", 32, True),
    ("resnet18", 32, True),
    ("resnet50", 32, True),
    ("mobilenet_v1_cifar", 32, False),
    ("vgg11", 32, False),
  ],
)
def test_fold_equals_unfolded_on_slimmed_networks(name, hw, branches):
  # Branch-slimmed blocks compute fewer channels than their stream and expand
  # them after the BN: each BN must fold into its own conv's channels.
  model, fn, v, graph, masks, x = slimmed(name, hw, branches)
  small = jaxprune.slim(v, graph, masks)
  folds = deploy.find_batchnorms(fn, small, x[:1])
  assert {f.bn for f in folds} == bn_paths(small)  # every BatchNorm of the zoo folds
  folded = deploy.fold_batchnorm(small, folds)
  assert_close(jax.jit(fn)(folded, x), jax.jit(fn)(small, x))
  # the BNs are pure bias adds now; the input tree is untouched
  leaves = dict(zip(deploy.leaf_paths(folded), jax.tree_util.tree_leaves(folded)))
  for f in folds:
    np.testing.assert_array_equal(leaves[f.mean], 0.0)
    np.testing.assert_array_equal(leaves[f.scale], 1.0)
    assert np.all(np.float32(leaves[f.var]) + np.float32(f.epsilon) == np.float32(1.0))
  assert not np.all(np.asarray(jax.tree_util.tree_leaves(small["batch_stats"])[0]) == 0)


def test_fold_kernel_by_hand():
  # Tiny: conv1 (no bias) -> BN -> relu; the folded kernel is kernel * s / sqrt(v + eps)
  # per output channel and the BN's bias is beta - mean * s / sqrt(v + eps).
  model = build(Tiny, seed=3)
  fn, v = jaxprune.functional(model)
  folds = deploy.find_batchnorms(fn, v, input_((1, 8, 8, 3)))
  assert [(f.kernel, f.bn, f.kernel_axis, f.conv_bias) for f in folds] == [("params.conv1.kernel", "bn1", 3, None)]
  k, bn = np.asarray(model.conv1.kernel[...], np.float64), model.bn1
  a = np.asarray(bn.scale[...], np.float64) / np.sqrt(np.asarray(bn.var[...], np.float64) + 1e-5)
  b = np.asarray(bn.bias[...], np.float64) - np.asarray(bn.mean[...], np.float64) * a
  folded = deploy.fold_batchnorm(v, folds)
  np.testing.assert_allclose(folded["params"]["conv1"]["kernel"], k * a, rtol=1e-6)
  np.testing.assert_allclose(folded["params"]["bn1"]["bias"], b, rtol=1e-5, atol=1e-7)


class Variants(nnx.Module):
  """BNs without scale, without bias, after a conv with bias, after a dense layer, and
  two that must not fold: a conv whose output is also used unnormalised, and a BN
  read through a transpose."""

  def __init__(self, rngs):
    self.c1 = nnx.Conv(3, 4, (3, 3), use_bias=True, rngs=rngs)
    self.b1 = nnx.BatchNorm(4, use_scale=False, rngs=rngs)
    self.c2 = nnx.Conv(4, 5, (3, 3), use_bias=False, rngs=rngs)
    self.b2 = nnx.BatchNorm(5, use_bias=False, epsilon=1e-3, rngs=rngs)
    self.c3 = nnx.Conv(5, 5, (1, 1), use_bias=False, rngs=rngs)
    self.b3 = nnx.BatchNorm(5, rngs=rngs)  # shares c3's output with a skip: no fold
    self.c4 = nnx.Conv(5, 6, (1, 1), use_bias=False, rngs=rngs)
    self.b4 = nnx.BatchNorm(6, rngs=rngs)  # on a transposed activation: no fold
    self.fc = nnx.Linear(6, 7, rngs=rngs)
    self.b5 = nnx.BatchNorm(7, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.b1(self.c1(x)))
    x = nnx.relu(self.b2(self.c2(x)))
    y = self.c3(x)
    x = nnx.relu(self.b3(y) + y)
    z = self.c4(x).transpose(0, 3, 1, 2)
    x = nnx.relu(self.b4(z.transpose(0, 2, 3, 1)))
    return self.b5(self.fc(x.mean(axis=(1, 2))))


def test_fold_variants_and_what_must_not_fold():
  model = build(Variants, seed=5)
  fn, v = jaxprune.functional(model)
  x = input_((3, 8, 8, 3), seed=6)
  folds = {f.bn: f for f in deploy.find_batchnorms(fn, v, x[:1])}
  assert set(folds) == {"b1", "b2", "b5"}
  assert folds["b1"].conv_bias == "params.c1.bias" and folds["b1"].scale is None
  assert folds["b2"].bias is None and folds["b2"].epsilon == pytest.approx(1e-3)
  assert folds["b5"].kernel == "params.fc.kernel" and folds["b5"].kernel_axis == 1
  folded = deploy.fold_batchnorm(v, list(folds.values()))
  assert_close(fn(folded, x), fn(v, x))
  # a fold that ignored the shared output would change the network: b3 forced in
  # by hand does (so the check above can fail)
  forced = deploy.Fold(
    "params.c3.kernel", 3, None, "batch_stats.b3.mean", "batch_stats.b3.var", "params.b3.scale", "params.b3.bias", 1e-5
  )
  assert np.abs(np.asarray(fn(deploy.fold_batchnorm(v, [forced]), x) - fn(v, x))).max() > 1e-3


def test_fold_module_replaces_batchnorms():
  model, fn, v, graph, masks, x = slimmed("resnet20", 32, True, seed=2)
  small_model = jaxprune.slim_module(model, graph, masks)
  before = jax.tree_util.tree_leaves(nnx.state(small_model))
  folded = deploy.fold_module(small_model, x[:1])
  assert_close(folded(x), small_model(x))
  kinds = {type(m).__name__ for _, m in nnx.iter_modules(folded)}
  assert "BatchNorm" not in kinds and "BiasAdd" in kinds
  # the folded graph computes no rsqrt (the BN's centring and scaling are gone)
  ffn, fv = jaxprune.functional(folded)
  assert "rsqrt" not in str(jax.make_jaxpr(ffn)(fv, x))
  assert "rsqrt" in str(jax.make_jaxpr(fn)(jaxprune.slim(v, graph, masks), x))
  # the input model is unchanged
  for a, b in zip(before, jax.tree_util.tree_leaves(nnx.state(small_model))):
    np.testing.assert_array_equal(a, b)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([1e-5, 1e-3, 0.1]), scale=st.floats(0.01, 100.0))
def test_fold_property_random_statistics(seed, eps, scale):
  # Any BN statistics (tiny or large variances, scales, means far from 0) fold exactly.
  rng = np.random.default_rng(seed)
  model = build(Tiny, seed=seed % 97)
  model.bn1.epsilon = eps
  model.bn1.var[...] = jnp.asarray(rng.uniform(0.0, 2.0, 4) * scale, jnp.float32)
  model.bn1.mean[...] = jnp.asarray(rng.normal(0.0, scale, 4), jnp.float32)
  model.bn1.scale[...] = jnp.asarray(rng.normal(0.0, 1.0, 4), jnp.float32)
  fn, v = jaxprune.functional(model)
  x = input_((2, 8, 8, 3), seed=seed)
  folds = deploy.find_batchnorms(fn, v, x[:1])
  assert len(folds) == 1 and folds[0].epsilon == pytest.approx(eps, rel=1e-6)
  assert_close(fn(deploy.fold_batchnorm(v, folds), x), fn(v, x), rel=1e-4)


def test_fold_inside_jit_and_custom_model():
  # fn wrapped in jax.jit (a nested jaxpr) and the custom model (concat, depthwise,
  # grouped conv, conv with bias, a BN behind a transpose that must not fold)
  model = build(Custom)
  fn, v = jaxprune.functional(model)
  x = input_((2, 16, 16, 3))
  folds = deploy.find_batchnorms(jax.jit(fn), v, x[:1])
  assert {f.bn for f in folds} == bn_paths(v) - {"bnp"}
  assert_close(fn(deploy.fold_batchnorm(v, folds), x), fn(v, x))


def test_cast_floats():
  model, fn, v, graph, masks, x = slimmed("resnet20", 32, True)
  small = jaxprune.slim(v, graph, masks)
  half = deploy.cast_floats(small, jnp.bfloat16)
  for a, b in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(half)):
    want = jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
    assert b.dtype == want
  assert jax.tree_util.tree_leaves(small["other"])[0].dtype == jnp.int32


# ------------------------------------------------------------------- rounding --


@pytest.mark.parametrize(
  "name,hw,branches", [("resnet20", 32, False), ("resnet20", 32, True), ("mobilenet_v1_cifar", 32, False)]
)
def test_pad_channels_keeps_outputs(name, hw, branches):
  model, fn, v, graph, masks, x = slimmed(name, hw, branches, seed=4)
  small = jaxprune.slim(v, graph, masks)
  padded, masks_up = deploy.pad_channels(graph, masks, small, 8)
  assert_close(jax.jit(fn)(padded, x), jax.jit(fn)(small, x))
  fixed = set(graph.streams()) | set(graph.names("branch")) if branches else set()
  for g in graph.groups:
    m, up = np.asarray(masks[g.name]), np.asarray(masks_up[g.name])
    assert np.all(up >= m)  # a superset
    if g.name in fixed:
      np.testing.assert_array_equal(up, m)
    else:
      assert int(up.sum()) == min(g.size, 8 * -(-int(m.sum()) // 8))
  assert jaxprune.cost(graph, masks_up).macs >= jaxprune.cost(graph, masks).macs
  if not branches:  # every conv's widths are now multiples of 8 (or the input's 3)
    for k in jax.tree_util.tree_leaves(padded["params"]):
      if k.ndim == 4:
        assert k.shape[-1] % 8 == 0 and (k.shape[-2] % 8 == 0 or k.shape[-2] in (1, 3))


def test_pad_channels_errors_and_round_to():
  model, fn, v, graph, masks, x = slimmed("resnet20", 32, False)
  small = jaxprune.slim(v, graph, masks)
  other = random_hard_masks(graph, np.random.default_rng(99))
  with pytest.raises(ValueError, match="masks keep"):
    deploy.pad_channels(graph, other, small, 8)
  with pytest.raises(ValueError, match="positive"):
    deploy.round_up_masks(graph, masks, 0)
  assert deploy.round_to("tpu") == 128 and deploy.round_to("cuda") == 8
  assert deploy.round_to() == deploy.ROUND_TO[jax.default_backend()]
  with pytest.raises(ValueError, match="no round_to known"):
    deploy.round_to("abacus")


def kept_counts(masks):
  return {k: int(np.sum(np.asarray(m))) for k, m in masks.items()}


def test_select_rounded_takes_the_widest_multiple_that_meets_the_budget():
  model, fn, v, graph, _, x = slimmed("resnet20", 32, False)
  scores = jaxprune.criteria.l1(v, graph)
  dense = float(jaxprune.cost(graph).macs)
  sizes = {g.name: g.size for g in graph.groups}
  # 16 per group (whole where narrower) is the narrowest 16-rounded network: any
  # budget above its cost is met with 16, any below falls back to 8
  floor16 = {g.name: (np.arange(g.size) < min(16, g.size)).astype(np.float32) for g in graph.groups}
  f16 = float(jaxprune.cost(graph, floor16).macs) / dense
  for budget, want in [(min(1.0, f16 + 0.05), 16), (f16 - 0.05, 8)]:
    masks, m = deploy.select_rounded(scores, graph, budget, "cpu")
    assert m == want
    assert float(jaxprune.cost(graph, masks).macs) <= budget * dense * (1 + 1e-6)
    for k, n in kept_counts(masks).items():  # every group a multiple of m or whole
      assert n % m == 0 or n == sizes[k], (k, n, m)
    same = jaxprune.select.global_topk(scores, graph, budget, round_to=m)
    assert kept_counts(same) == kept_counts(masks)
  masks, m = deploy.select_rounded(scores, graph, 0.5, 4, unit="params")
  assert m == 4 and float(jaxprune.cost(graph, masks).params) <= 0.5 * float(jaxprune.cost(graph).params) * (1 + 1e-6)
  assert deploy.select_multiples("cpu") == (16, 8) and deploy.select_multiples("tpu") == (128,)
  with pytest.raises(jaxprune.select.BudgetUnmet, match="any of the multiples"):
    deploy.select_rounded(scores, graph, 0.01, (16, 8))
  with pytest.raises(ValueError, match="positive integers"):
    deploy.select_rounded(scores, graph, 0.5, (16, 0))
  with pytest.raises(ValueError, match="no multiples known"):
    deploy.select_rounded(scores, graph, 0.5, "abacus")
  with pytest.raises(ValueError, match=r"\(0, 1\]"):  # not a budget error in disguise: raised at once
    deploy.select_rounded(scores, graph, 1.5, "cpu")


# ------------------------------------------------------------- export / load --


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model, fn, v, graph, masks, x = slimmed("resnet20", 32, True, seed=7)
  small_model = jaxprune.slim_module(model, graph, masks)
  path = str(tmp_path_factory.mktemp("deploy") / "resnet20")
  card = deploy.export_module(
    small_model,
    path,
    input_shape=(32, 32, 3),
    card={
      "model": "resnet20",
      "method": "random",
      "budget": 0.5,
      "accuracy": 0.1,
      "macs": float(jaxprune.cost(graph, masks).macs),
      "params": np.int64(123),
    },
    normalisation={"mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)},
  )
  return small_model, path, card


def test_export_card(exported):
  small_model, path, card = exported
  assert sorted(os.listdir(path)) == ["card.json", "model.jax", "weights"]
  with open(os.path.join(path, "card.json")) as f:
    on_disk = json.load(f)
  assert on_disk == card
  assert card["format_version"] == deploy.FORMAT_VERSION and card["params"] == 123
  assert card["input"] == {
    "shape": [None, 32, 32, 3],
    "dtype": "float32",
    "layout": "NHWC",
    "normalisation": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]},
  }
  assert card["output"] == [{"shape": [None, 10], "dtype": "float32"}]
  assert card["folded_batchnorms"] == 19 and "cpu" in card["platforms"]


@pytest.mark.parametrize("batch", [1, 64, 3])
def test_loaded_equals_slimmed_model(exported, batch):
  small_model, path, _ = exported
  net = deploy.load(path)
  x = input_((batch, 32, 32, 3), seed=batch)
  assert_close(net(x), small_model(x))
  assert net(np.asarray(x)).shape == (batch, 10)


def test_load_takes_a_relative_path(exported, monkeypatch):
  # orbax restores absolute paths only; a user types the folder as the CLI printed it
  small_model, path, _ = exported
  monkeypatch.chdir(os.path.dirname(path))
  net = deploy.load(os.path.basename(path))
  x = input_((2, 32, 32, 3), seed=0)
  assert_close(net(x), small_model(x))


def test_load_needs_no_model_code(exported):
  # A fresh interpreter loads and runs the artifact with jax and orbax alone.
  _, path, _ = exported
  code = (
    "import sys, numpy as np, jaxprune.deploy as d; net = d.load(sys.argv[1]); "
    "y = net(np.zeros((2, 32, 32, 3), np.float32)); "
    "bad = [m for m in ('flax', 'jaxprune.models', 'jaxprune.nnx_bridge') if m in sys.modules]; "
    "print(y.shape, bad)"
  )
  out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == "(2, 10) []"


def test_load_input_errors(exported):
  _, path, _ = exported
  net = deploy.load(path)
  x = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="channels-first"):
    net(x.transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match="batch axis"):
    net(x[0])
  with pytest.raises(ValueError, match="takes"):
    net(np.zeros((2, 28, 28, 3), np.float32))
  with pytest.raises(ValueError, match="dtype float64.*astype"):
    net(x.astype(np.float64))
  with pytest.raises(ValueError, match="preprocess"):
    net(x.astype(np.uint8))
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  want = (images / 255.0 - np.array([0.49, 0.48, 0.45])) / np.array([0.25, 0.24, 0.26])
  np.testing.assert_allclose(net.preprocess(images), want, rtol=1e-5, atol=1e-6)


def _copy_with_card(src, dst, **changes):
  import shutil

  shutil.copytree(src, dst)
  with open(os.path.join(dst, "card.json")) as f:
    card = json.load(f)
  card.update(changes)
  with open(os.path.join(dst, "card.json"), "w") as f:
    json.dump(card, f)
  return str(dst)


def test_load_version_errors(exported, tmp_path):
  _, path, _ = exported
  newer = _copy_with_card(path, tmp_path / "v2", format_version=deploy.FORMAT_VERSION + 1)
  with pytest.raises(deploy.IncompatibleArtifactError, match="Upgrade jaxprune"):
    deploy.load(newer)
  older = _copy_with_card(path, tmp_path / "v0", format_version=0)
  with pytest.raises(deploy.IncompatibleArtifactError, match="Export it again"):
    deploy.load(older)
  future_jax = _copy_with_card(path, tmp_path / "cc", calling_convention_version=10_000)
  with pytest.raises(deploy.IncompatibleArtifactError, match="Upgrade jax"):
    deploy.load(future_jax)
  other = _copy_with_card(path, tmp_path / "other", format="onnx")
  with pytest.raises(deploy.IncompatibleArtifactError, match="not a jaxprune deploy"):
    deploy.load(other)
  with pytest.raises(FileNotFoundError, match="card.json"):
    deploy.load(str(tmp_path))
  leaves = json.load(open(os.path.join(path, "card.json")))["weights"]["leaves"]
  leaves[0] = dict(leaves[0], name="params.nowhere.kernel")
  missing = _copy_with_card(path, tmp_path / "w", weights={"leaves": leaves})
  with pytest.raises(deploy.IncompatibleArtifactError, match="nowhere"):
    deploy.load(missing)


def test_export_errors_platforms_and_bf16(exported, tmp_path):
  small_model, path, _ = exported
  with pytest.raises(FileExistsError, match="overwrite"):
    deploy.export_module(small_model, path, input_shape=(32, 32, 3))
  with pytest.raises(ValueError, match="reserved"):
    deploy.export_module(small_model, str(tmp_path / "r"), input_shape=(32, 32, 3), card={"format": "mine"})
  tpu = str(tmp_path / "tpu")
  deploy.export_module(small_model, tpu, input_shape=(32, 32, 3), platforms=("tpu",))
  with pytest.raises(deploy.IncompatibleArtifactError, match="lowered for"):
    deploy.load(tpu)
  half = str(tmp_path / "bf16")
  card = deploy.export_module(small_model, half, input_shape=(32, 32, 3), compute_dtype=jnp.bfloat16)
  assert card["compute_dtype"] == "bfloat16"
  assert {w["dtype"] for w in card["weights"]["leaves"]} == {"bfloat16", "int32"}
  net = deploy.load(half)
  x = input_((16, 32, 32, 3), seed=3)
  y, want = net(x), small_model(x)
  assert y.dtype == jnp.float32
  assert_close(y, want, rel=5e-2)
  assert np.abs(np.asarray(y) - np.asarray(want)).max() > 1e-6  # it did compute in bf16


def test_export_plain_nnx_model_fixed_batch(tmp_path):
  # A model written with flax's own layers (a conv with bias after a BN-folded conv),
  # exported with a fixed batch size.
  model = build(Tiny, seed=11)
  path = str(tmp_path / "tiny")
  deploy.export_module(model, path, input_shape=(8, 8, 3), batch_size=4)
  net = deploy.load(path)
  x = input_((4, 8, 8, 3), seed=12)
  assert_close(net(x), model(x))
  with pytest.raises(ValueError, match="takes"):
    net(x[:2])


# ------------------------------------------ experiments.export: a finished run --


def _cli_export(workdir, out, *flags):
  cmd = [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={out}", "--platforms=cpu", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A tiny magnitude run (quick config, ResNet-20 at a quarter width, 2 + 1 steps):
  its channel groups keep uneven widths, which the export pads."""
  from experiments import train as train_lib
  from experiments.configs import magnitude_cifar10_subset_resnet20 as mag_config

  c = mag_config.get_config("quick")
  c.model.kwargs.widths = (4, 8, 16)
  c.data.batch_size, c.data.eval_batch_size, c.data.augment = 32, 1024, False
  c.train.epochs, c.train.max_steps_per_epoch = 1, 2
  c.method.finetune = {"epochs": 1, "lr": 0.01}
  c.method.budget = 0.5
  c.progress = False
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, train_lib.train_and_evaluate(c, workdir)


def _reference(workdir):
  """The run's final network as the pipeline runs it: model code, BatchNorms unfolded,
  widths unpadded (the variables the pipeline saved after finetuning)."""
  from experiments import export as export_cli

  _, model, variables, meta = export_cli.final_network(workdir)
  graphdef, _ = jaxprune.nnx_bridge.split(model)
  return jax.jit(lambda x: jaxprune.nnx_bridge.apply_fn(graphdef)(variables, x)), variables, meta


@pytest.mark.slow
def test_export_cli_on_a_finished_run(finished_run, tmp_path):
  from jaxprune import data as data_lib

  workdir, r = finished_run
  out = str(tmp_path / "art")
  p = _cli_export(workdir, out)
  assert p.returncode == 0, p.stderr[-3000:]
  printed = json.loads(p.stdout.strip().splitlines()[-1])
  net = deploy.load(out)
  card = net.card
  assert printed["out"] == out and printed["macs"] == r["macs"] == card["macs"]
  assert (card["model"], card["method"], card["dataset"]) == ("resnet20", "magnitude", "cifar10_subset")
  assert card["budget"] == 0.5 and card["unit"] == "macs" and card["params"] == r["params"]
  assert card["accuracy"] == r["test_accuracy"] and card["dense_macs"] == r["dense"]["macs"]
  assert card["folded_batchnorms"] == 19 and card["round_to"] == deploy.round_to("cpu") == 8
  # padded with zero channels: more MACs than the slimmed network, fewer than the dense
  assert r["macs"] < card["padded_macs"] < r["dense"]["macs"]
  info = data_lib.get_info("cifar10_subset")
  assert card["input"]["normalisation"] == {"mean": list(info.mean), "std": list(info.std)}
  # the artifact computes the slimmed network, at batch 1 and 64
  ref, small, meta = _reference(workdir)
  assert meta["dense_graph"] and not meta["branches"]
  widths = {tuple(np.shape(w)) for w in jax.tree_util.tree_leaves(small)}
  assert widths != {tuple(w["shape"]) for w in card["weights"]["leaves"]}  # padded
  for batch in (1, 64):
    x = input_((batch, 32, 32, 3), seed=batch)
    assert_close(net(x), ref(x))
  # ... and is the network the run evaluated: its test accuracy from uint8 images
  # through the card's normalisation equals results.json's (one image of slack for
  # float rounding at an argmax tie)
  images, labels = data_lib.load_arrays("cifar10_subset", "test")
  logits = np.concatenate([np.asarray(net(net.preprocess(images[i : i + 512]))) for i in range(0, len(labels), 512)])
  correct = int((logits.argmax(-1) == labels).sum())
  assert abs(correct - r["test_accuracy"] * len(labels)) <= 1


@pytest.mark.slow
def test_export_run_unpadded_dense_run_and_errors(finished_run, tmp_path):
  import shutil

  from experiments import export as export_cli

  workdir, r = finished_run
  ref, small, _ = _reference(workdir)
  x = input_((3, 32, 32, 3), seed=5)
  card = export_cli.export_run(workdir, str(tmp_path / "raw"), round_to="1", platforms=("cpu",))
  assert card["round_to"] == 1 and card["padded_macs"] is None
  assert [tuple(w["shape"]) for w in card["weights"]["leaves"] if w["name"].endswith("kernel")] == [
    tuple(np.shape(w))
    for n, w in zip(deploy.leaf_paths(small), jax.tree_util.tree_leaves(small))
    if n.endswith("kernel")
  ]
  assert_close(deploy.load(str(tmp_path / "raw"))(x), ref(x))
  # A dense run exports its trained network (here: this run's pretrain checkpoint).
  dense_dir = str(tmp_path / "dense_run")
  shutil.copytree(workdir, dense_dir)
  shutil.rmtree(os.path.join(dense_dir, "final"))
  res = json.load(open(os.path.join(dense_dir, "results.json")))
  with open(os.path.join(dense_dir, "results.json"), "w") as f:
    json.dump(dict(res, method="dense"), f)
  from ml_collections import config_dict

  from experiments import pruning
  from jaxprune import training as T

  graphdef, state = pruning.load_dense(config_dict.ConfigDict(res["config"]), workdir)
  card = export_cli.export_run(dense_dir, str(tmp_path / "dense"), platforms=("cpu",))
  assert card["padded_macs"] is None
  assert_close(
    deploy.load(str(tmp_path / "dense"))(x), jaxprune.nnx_bridge.apply_fn(graphdef)(T.core_variables(state), x)
  )
  # Refusals, each saying what to do.
  with open(os.path.join(dense_dir, "results.json"), "w") as f:
    json.dump(dict(res, method="ftwt", dynamic={"macs_mean": 1.0}), f)
  with pytest.raises(ValueError, match="dynamic network"):
    export_cli.export_run(dense_dir, str(tmp_path / "x"))
  with open(os.path.join(dense_dir, "results.json"), "w") as f:
    json.dump(res, f)
  with pytest.raises(FileNotFoundError, match="same --workdir"):
    export_cli.export_run(dense_dir, str(tmp_path / "x"))
  with pytest.raises(FileNotFoundError, match="not a finished run"):
    export_cli.export_run(str(tmp_path), str(tmp_path / "x"))
  with pytest.raises(ValueError, match="positive integer or a platform"):
    export_cli.export_run(workdir, str(tmp_path / "x"), round_to="0")
  with pytest.raises(FileExistsError, match="overwrite"):
    export_cli.export_run(workdir, str(tmp_path / "raw"))
  p = _cli_export(str(tmp_path / "nowhere"), str(tmp_path / "x"))
  assert p.returncode != 0 and "not a finished run" in p.stderr
