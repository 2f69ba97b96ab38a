"""The core depends on jax, numpy and scipy only; the NNX bridge slims a user's own NNX model."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import build, input_
from flax import nnx

import jaxprune

ROOT = pathlib.Path(jaxprune.__file__).parent
CORE = [
  "channel_exprs",
  "channel_flow",
  "channel_producers",
  "channel_rules",
  "channel_shapes",
  "cost",
  "criteria",
  "gated",
  "graph",
  "interpret",
  "masked",
  "select",
  "slim",
  "trace",
]
ALLOWED = {
  "jax",
  "numpy",
  "scipy",
  "jaxprune",
  "__future__",
  "dataclasses",
  "functools",
  "typing",
  "math",
  "numbers",
  "bisect",
  "importlib",
  "collections",
}
FORBIDDEN = (
  "jaxprune.models",
  "jaxprune.data",
  "jaxprune.training",
  "jaxprune.methods",
  "jaxprune.nnx_bridge",
  "flax",
  "jax._src",
)


def imports(path: pathlib.Path) -> list[str]:
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.append(node.module)
  return out


@pytest.mark.parametrize("name", CORE)
def test_core_file_imports_jax_numpy_scipy_only(name):
  for mod in imports(ROOT / f"{name}.py"):
    assert not any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN), (name, mod)
    assert mod.split(".")[0] in ALLOWED, (name, mod)


def test_the_hygiene_check_catches_a_bad_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from jax._src import core\nimport flax.nnx\n")
  mods = imports(bad)
  assert any(m.startswith("jax._src") for m in mods) and "flax.nnx" in mods


def test_importing_jaxprune_loads_no_flax():
  code = (
    "import sys, jaxprune; jaxprune.trace; jaxprune.cost; "
    "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules), "
    "[m for m in sys.modules if m.startswith('flax')][:3]; print('ok')"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ------------------------------------------------ a user's own plain-NNX model


class Plain(nnx.Module):
  """Written as a new user would: flax's own layers, depthwise and grouped convs
  through feature_group_count, a concat, nnx.Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.dw2 = nnx.Conv(8, 16, (3, 3), feature_group_count=8, rngs=rngs)  # multiplier 2
    self.side = nnx.Conv(3, 6, (1, 1), rngs=rngs)
    self.grouped = nnx.Conv(22, 12, (3, 3), feature_group_count=2, rngs=rngs)
    self.bn = nnx.BatchNorm(12, rngs=rngs)
    self.fc1 = nnx.Linear(12, 7, rngs=rngs)
    self.fc2 = nnx.Linear(7, 5, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    h = nnx.relu(self.dw2(nnx.relu(self.dw(h))))
    h = jnp.concatenate([h, nnx.relu(self.side(x))], axis=-1)  # 16 + 6 = 22
    h = nnx.relu(self.bn(self.grouped(h)))
    return self.fc2(nnx.relu(self.fc1(h.mean((1, 2)))))


def test_plain_nnx_model_slims_through_the_bridge_to_a_module_equal_to_masked():
  model = build(Plain)
  fn, v = jaxprune.functional(model)
  x = input_((2, 8, 8, 3), seed=5)
  graph = jaxprune.trace(fn, v, x[:1])
  # drop the first channel of every group (grouped convs tie channels across groups)
  masks = {g.name: jnp.ones(g.size).at[0].set(0.0 if g.size > 1 else 1.0) for g in graph.groups}
  small_model = jaxprune.slim_module(model, graph, masks)
  got = small_model(x)
  want = jax.jit(jaxprune.masked(fn, graph))(v, masks, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  assert small_model.dw.feature_group_count == small_model.dw.kernel[...].shape[-1] < 8
  assert small_model.grouped.feature_group_count == 2
  assert small_model.fc1.in_features == small_model.fc1.kernel[...].shape[0]
  # without the bridge, flax's stale attributes break the slimmed depthwise conv
  stale = nnx.merge(
    nnx.graphdef(model), *(jaxprune.slim(v, graph, masks)[c] for c in ("params", "batch_stats", "other"))
  )
  with pytest.raises((TypeError, ValueError)):
    stale(x)


def test_a_layer_that_cannot_take_smaller_arrays_is_named():
  class Fixed(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
      self.width = 6  # a width kept as a Python int: stale after slimming
      self.fc = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.conv(x)).mean((1, 2))
      return self.fc(h.reshape(h.shape[0], self.width))

  model = build(Fixed)
  fn, v = jaxprune.functional(model)
  graph = jaxprune.trace(fn, v, input_((1, 8, 8, 3)))
  masks = {g.name: jnp.ones(g.size).at[0].set(0.0) for g in graph.groups}
  with pytest.raises(ValueError, match="does not run at a Fixed layer"):
    jaxprune.slim_module(model, graph, masks)
