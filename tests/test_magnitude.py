"""The magnitude baseline: schedule, method errors and a tiny end-to-end pipeline run."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import jaxprune
from experiments import train as train_lib
from experiments.configs import magnitude_cifar10_subset_resnet20 as mag_config
from jaxprune.methods import magnitude


def test_schedule_is_geometric_and_ends_at_budget():
  b = magnitude.schedule(0.125, 3)
  np.testing.assert_allclose(b, [0.5, 0.25, 0.125])
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    magnitude.schedule(1.5, 2)
  with pytest.raises(ValueError, match="steps"):
    magnitude.schedule(0.5, 0)


def test_registry_and_unknown_criterion():
  assert jaxprune.methods.get("magnitude") is magnitude
  with pytest.raises(ValueError, match="available"):
    jaxprune.methods.get("nope")
  with pytest.raises(ValueError, match="l1"):
    magnitude.scores({}, None, "l3")


def test_prune_against_reference_cost():
  """Pruning a half-slimmed net to 25% of the *original* cost keeps half of what is left."""
  from jaxprune import models

  model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  fn, state = jaxprune.functional(model)
  x = np.zeros((1, 32, 32, 3), np.float32)
  graph = jaxprune.trace(fn, state, x)
  full = float(jaxprune.cost(graph).macs)
  masks = magnitude.prune(state, graph, budget=0.5, unit="macs")
  small = jaxprune.slim(state, graph, masks)
  g2 = jaxprune.trace(fn, small, x)
  masks2 = magnitude.prune(small, g2, budget=0.25, unit="macs", reference=full)
  kept = float(jaxprune.cost(g2, masks2).macs)
  assert kept <= 0.25 * full * (1 + 1e-6)
  assert kept > 0.2 * full  # within a few channels' worth on this coarse net


def test_pipeline_end_to_end(tmp_path):
  c = mag_config.get_config("quick")
  c.train.epochs = 1
  c.train.max_steps_per_epoch = 2
  c.method.finetune = {"epochs": 1, "lr": 0.01}
  c.method.budget = 0.4
  c.method.steps = 2
  c.progress = False
  r = train_lib.train_and_evaluate(c, str(tmp_path))
  saved = json.load(open(os.path.join(tmp_path, "results.json")))
  assert saved["macs"] == r["macs"]
  # The slimmed network's MACs are within the budget of the dense network's.
  assert r["ratios"]["macs"] <= 0.4 * (1 + 1e-6)
  assert r["pruned"]["params"] < r["dense"]["params"]
  assert 0.0 <= r["test_accuracy"] <= 1.0 and r["speedup"]["speedup"] > 0
  phases = {json.loads(l)["phase"] for l in open(os.path.join(tmp_path, "metrics.jsonl"))}
  assert {"pretrain", "prune0_finetune", "finetune"} <= phases
  # A later run can reuse this dense training (method.pretrained): the restored
  # state reproduces the dense accuracy the pipeline reported.
  import jaxprune.training as T
  from experiments import pruning

  graphdef, state = pruning.load_dense(c, str(tmp_path))
  eval_fn = train_lib.make_eval_fn(c, T.nnx_apply(graphdef), mesh=T.make_mesh())
  assert eval_fn(state)["accuracy"] == pytest.approx(r["dense_accuracy"], abs=1e-6)
  # The magnitude pipeline itself from that dense network: no pretraining, the
  # same dense network and accuracy.
  c2 = c.copy_and_resolve_references()
  c2.method.pretrained = str(tmp_path)
  wd2 = os.path.join(tmp_path, "reuse")
  r2 = train_lib.train_and_evaluate(c2, wd2)
  assert not os.path.exists(os.path.join(wd2, "pretrain"))
  assert r2["dense_accuracy"] == pytest.approx(r["dense_accuracy"], abs=1e-6)
  assert r2["dense"] == r["dense"]
  c.model.name = "vgg11"
  with pytest.raises(ValueError, match="cannot restore"):
    pruning.load_dense(c, str(tmp_path))
