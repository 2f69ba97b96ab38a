"""`jaxprune.select`: masks from scores, per group or to a global budget.

Selection needs only a graph and scores, so the graphs here are traced from
abstract models (no arrays) and the scores are random.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import abstract_graph, custom_setup, jit_cost

from jaxprune import select


def random_scores(graph, seed=0):
  rng = np.random.default_rng(seed)
  return {g.name: jnp.asarray(rng.uniform(0.1, 2.0, g.size), jnp.float32) for g in graph.groups}


def kept(masks, name):
  return int(np.asarray(masks[name]).sum())


def assert_top_within_groups(graph, scores, masks):
  """Each group keeps its best-scoring channels (whatever their number)."""
  for g in graph.groups:
    m, s = np.asarray(masks[g.name]), np.asarray(scores[g.name])
    assert set(np.unique(m)) <= {0.0, 1.0}
    n = int(m.sum())
    assert set(np.nonzero(m)[0]) == set(np.argsort(-s)[:n]), g.name


def check_budget(graph, scores, masks, unit, budget, normalize=True):
  """cost <= budget, and restoring the best removed channel (by score over
  its group's mean, the global ranking; raw score if not normalize) would break the budget."""
  f = jit_cost(graph)
  full = float(f(graph.ones())[unit])
  limit = budget * full * (1 + 1e-6)
  assert float(f(masks)[unit]) <= limit
  removed = []
  for g in graph.groups:
    s = np.asarray(scores[g.name], np.float64)
    norm = s / np.abs(s).mean() if normalize else s
    removed += [(norm[i], g.name, i) for i in np.nonzero(np.asarray(masks[g.name]) == 0)[0]]
  if removed:
    _, name, i = max(removed)
    restored = dict(masks)
    restored[name] = jnp.asarray(masks[name]).at[i].set(1.0)
    assert float(f(restored)[unit]) > limit, (name, i)


@pytest.fixture(scope="module")
def resnet20():
  return abstract_graph("resnet20", 32, 10)


@pytest.mark.parametrize(
  "unit,budget", [("macs", 0.5), ("flops", 0.4), ("params", 0.3), ("channels", 0.6), ("volume", 0.5)]
)
def test_global_topk_meets_budget_within_one_channel(resnet20, unit, budget):
  scores = random_scores(resnet20, seed=1)
  masks = select.global_topk(scores, resnet20, budget, unit=unit)
  check_budget(resnet20, scores, masks, unit, budget)
  assert_top_within_groups(resnet20, scores, masks)
  assert all(kept(masks, g.name) >= 1 for g in resnet20.groups)


def test_global_topk_unnormalized_ranks_raw_scores(resnet20):
  # Scores on very different scales per group: normalized, every group loses
  # channels; raw, the low-scale groups go first (down to min_channels).
  scale = {g.name: 10.0 ** (k % 3) for k, g in enumerate(resnet20.groups)}
  scores = {n: s * scale[n] for n, s in random_scores(resnet20, seed=3).items()}
  raw = select.global_topk(scores, resnet20, 0.5, unit="macs", normalize=False)
  norm = select.global_topk(scores, resnet20, 0.5, unit="macs")
  check_budget(resnet20, scores, raw, "macs", 0.5, normalize=False)
  assert_top_within_groups(resnet20, scores, raw)
  # One global threshold: a kept channel scoring below a removed one is its group's last.
  best_removed = max(
    float(np.asarray(scores[g.name])[np.asarray(raw[g.name]) == 0].max(initial=-1)) for g in resnet20.groups
  )
  for g in resnet20.groups:
    below = np.asarray(scores[g.name])[(np.asarray(raw[g.name]) == 1)] < best_removed
    assert not below.any() or kept(raw, g.name) == 1, g.name
  assert all(kept(raw, g.name) == g.size for g in resnet20.groups if scale[g.name] == 100.0)
  low = [g for g in resnet20.groups if scale[g.name] == 1.0]
  assert sum(kept(raw, g.name) for g in low) < sum(kept(norm, g.name) for g in low)


def test_global_topk_on_custom_graph():
  graph = custom_setup().graph
  scores = random_scores(graph, seed=2)
  masks = select.global_topk(scores, graph, 0.5, unit="macs")
  check_budget(graph, scores, masks, "macs", 0.5)
  assert_top_within_groups(graph, scores, masks)


def test_global_topk_budget_one_keeps_everything(resnet20):
  masks = select.global_topk(random_scores(resnet20), resnet20, 1.0, unit="macs")
  assert all(kept(masks, g.name) == g.size for g in resnet20.groups)


def test_min_channels(resnet20):
  scores = random_scores(resnet20, seed=3)
  masks = select.global_topk(scores, resnet20, 0.15, unit="params", min_channels=6)
  for g in resnet20.groups:
    assert kept(masks, g.name) >= min(6, g.size)
  assert float(jit_cost(resnet20)(masks)["params"]) <= 0.15 * float(jit_cost(resnet20)(resnet20.ones())["params"]) * (
    1 + 1e-6
  )
  assert_top_within_groups(resnet20, scores, masks)
  # some group sits at the minimum: the constraint is active
  assert any(kept(masks, g.name) == 6 for g in resnet20.groups)


def test_round_to(resnet20):
  scores = random_scores(resnet20, seed=4)
  masks = select.global_topk(scores, resnet20, 0.5, unit="macs", round_to=8)
  counts = [(kept(masks, g.name), g.size) for g in resnet20.groups]
  assert all(n % 8 == 0 or n == size for n, size in counts), counts
  assert any(n < size for n, size in counts)
  full = float(jit_cost(resnet20)(resnet20.ones())["macs"])
  assert float(jit_cost(resnet20)(masks)["macs"]) <= 0.5 * full * (1 + 1e-6)
  assert_top_within_groups(resnet20, scores, masks)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.99, 1.0])
def test_local_keeps_ceil_fraction_of_each_group(keep):
  graph = custom_setup().graph
  scores = random_scores(graph, seed=5)
  masks = select.local(scores, graph, keep)
  for g in graph.groups:
    assert kept(masks, g.name) == max(1, math.ceil(keep * g.size)), g.name
  assert_top_within_groups(graph, scores, masks)


def test_local_min_channels_and_round_to(resnet20):
  scores = random_scores(resnet20, seed=6)
  masks = select.local(scores, resnet20, 0.1, min_channels=4)
  for g in resnet20.groups:
    assert kept(masks, g.name) == max(4, math.ceil(0.1 * g.size))
  masks = select.local(scores, resnet20, 0.3, round_to=8)
  for g in resnet20.groups:
    n = kept(masks, g.name)
    assert n % 8 == 0 and n <= max(8, math.ceil(0.3 * g.size)), (g.name, n)


# ---------------------------------------------------------------- errors ----


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval(resnet20, bad):
  scores = random_scores(resnet20)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    select.global_topk(scores, resnet20, bad)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    select.local(scores, resnet20, bad)


def test_unreachable_budget_and_bad_unit(resnet20):
  scores = random_scores(resnet20)
  with pytest.raises(select.BudgetUnmet, match="cannot be met"):  # a ValueError
    select.global_topk(scores, resnet20, 1e-4, unit="macs")
  assert issubclass(select.BudgetUnmet, ValueError)
  with pytest.raises(ValueError, match="unit"):
    select.global_topk(scores, resnet20, 0.5, unit="watts")
  missing = dict(scores)
  missing.pop(resnet20.groups[0].name)
  with pytest.raises(ValueError, match=resnet20.groups[0].name):
    select.global_topk(missing, resnet20, 0.5)


def test_numpy_scalar_budget_is_accepted(resnet20):
  scores = random_scores(resnet20, seed=7)
  a = select.global_topk(scores, resnet20, np.float32(0.5), unit="macs")
  b = select.global_topk(scores, resnet20, 0.5, unit="macs")
  for g in resnet20.groups:
    np.testing.assert_array_equal(np.asarray(a[g.name]), np.asarray(b[g.name]))
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    select.local(scores, resnet20, True)
