"""Folded NNX models: each folded `nnx.BatchNorm` becomes a `BiasAdd`.

Example:
  >>> folded = jaxprune.deploy.fold_module(model, x[:1])
  >>> bool(jnp.allclose(folded(x), model(x), atol=1e-4))   # in eval mode, up to float rounding
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import nnx_bridge
from jaxprune.deploy.fold import find_batchnorms, fold_batchnorm, leaf_paths


class BiasAdd(nnx.Module):
  """`x + bias` along the last axis: what an eval-mode BatchNorm is after folding.

  The result dtype follows `nnx.BatchNorm`'s: `dtype` if given, else the promoted
  dtype of `x` and `bias`.

  Example:
    >>> BiasAdd(jnp.zeros(4))(jnp.ones((1, 2, 2, 4))).shape
    (1, 2, 2, 4)
  """

  def __init__(self, bias: jax.Array, dtype=None):
    self.bias = nnx.Param(jnp.asarray(bias))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.bias[...])
    return x.astype(dtype) + self.bias[...].astype(dtype)


def _modules(model: nnx.Module) -> dict[str, tuple[Any, str | int, nnx.Module]]:
  """Module path -> (parent, attribute or index, module)."""
  out = {}
  for path, m in nnx.iter_modules(model):
    for attr, child in list(vars(m).items()) if not isinstance(m, nnx.List) else enumerate(m):
      if isinstance(child, nnx.Module):
        key = ".".join(map(str, path + (attr,)))
        out[key] = (m, attr, child)
  return out


def fold_module(model: nnx.Module, *example_args: Any) -> nnx.Module:
  """An inference copy of `model` with every foldable BatchNorm folded into the
  conv/dense before it (`find_batchnorms` on the model in eval mode).

  Each folded `nnx.BatchNorm` (on the last axis) is replaced by `BiasAdd`, so
  the folded network skips the centring and scaling; other folded normalisers
  keep their module and become a pure bias add through their variables. The
  model itself is not modified; the copy is in eval mode.

  Example:
    >>> folded = jaxprune.deploy.fold_module(small_model, x[:1])
  """
  model.eval()
  fn, variables = nnx_bridge.functional(model)
  folds = find_batchnorms(fn, variables, *example_args)
  folded = fold_batchnorm(variables, folds)
  out = nnx_bridge.module(model, folded)
  out.eval()
  values = dict(zip(leaf_paths(folded), jax.tree_util.tree_leaves(folded)))
  mods = _modules(out)
  for f in folds:
    parent, attr, bn = mods.get(f.bn, (None, None, None))
    if not isinstance(bn, nnx.BatchNorm) or bn.axis not in (-1, (-1,)):
      continue
    bias = values[f.bias] if f.bias is not None else -values[f.mean]
    if isinstance(parent, nnx.List):
      parent[attr] = BiasAdd(bias, bn.dtype)
    else:
      setattr(parent, attr, BiasAdd(bias, bn.dtype))
  if example_args:
    nnx_bridge.check_runs(out, *example_args)
  return out
