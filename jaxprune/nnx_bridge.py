"""The one bridge between Flax NNX modules and the core's pure functions.

The core (`trace`, `cost`, `masked`, `slim`, ...) works on functions of plain
pytrees and never imports flax; this module is the only place that knows NNX.
A model's variables travel as a dict of three pure dicts:

  {"params": nnx.Param arrays, "batch_stats": nnx.BatchStat arrays,
   "other": every other variable (e.g. the zero-pad and index vectors of the
   bundled ResNets)}

so only `params` count as parameters in `jaxprune.cost`, optax and orbax take
them as they are, and `slim` returns the same layout.

Example:
  >>> model.eval()
  >>> fn, variables = jaxprune.functional(model)           # fn(variables, x) == model(x)
  >>> graph = jaxprune.trace(fn, variables, x[:1])
  >>> masks = jaxprune.select.global_topk(jaxprune.criteria.l1(variables, graph), graph, budget=0.5)
  >>> small = jaxprune.slim(variables, graph, masks)
  >>> small_model = jaxprune.module(model, small)          # a runnable, smaller nnx.Module
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

COLLECTIONS = ("params", "batch_stats", "other")
Variables = dict[str, Any]


def split(model: nnx.Module) -> tuple[nnx.GraphDef, Variables]:
  """`(graphdef, {"params", "batch_stats", "other"})` of a model, as pure dicts.

  >>> graphdef, variables = jaxprune.nnx_bridge.split(model)
  """
  graphdef, params, stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return graphdef, {
    "params": nnx.to_pure_dict(params),
    "batch_stats": nnx.to_pure_dict(stats),
    "other": nnx.to_pure_dict(other),
  }


def _graphdef(model_or_graphdef) -> nnx.GraphDef:
  if isinstance(model_or_graphdef, nnx.Module):
    return nnx.graphdef(model_or_graphdef)
  return model_or_graphdef


def merge(model_or_graphdef, variables: Variables, *, copy: bool = False) -> nnx.Module:
  """The module holding `variables` (jit-safe; inside jit pass `copy=True`).

  Static attributes are those of the graphdef: after slimming use `module`.
  """
  missing = [c for c in COLLECTIONS if c not in variables]
  if missing:
    raise ValueError(
      f"variables must be a dict with keys {COLLECTIONS} (from "
      f"jaxprune.functional or nnx_bridge.split); missing {missing}"
    )
  return nnx.merge(_graphdef(model_or_graphdef), *(variables[c] for c in COLLECTIONS), copy=copy)


def apply_fn(graphdef: nnx.GraphDef, *, train: bool = False, method: str = "__call__") -> Callable:
  """A pure function of `(variables, *args)` running the module.

  `train=False`: `fn(v, *args) -> output` in eval mode (BatchNorm running
  averages). `train=True`: `fn(v, *args) -> (output, new batch_stats)` with
  batch statistics, the way a train step needs it.

  >>> graphdef, variables = jaxprune.nnx_bridge.split(model)
  >>> eval_fn = apply_fn(graphdef)
  >>> train_fn = apply_fn(graphdef, train=True)
  """

  def fn(v, *args):
    model = merge(graphdef, v, copy=True)  # copy: merging inside a trace otherwise fails on BatchStat
    model.train() if train else model.eval()
    out = getattr(model, method)(*args)
    if train:
      return out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return out

  return fn


def functional(model: nnx.Module, method: str = "__call__") -> tuple[Callable, Variables]:
  """`(fn, variables)` with `fn(variables, *args) == getattr(model, method)(*args)`.

  The model's current mode (`model.eval()` / `model.train()`) is kept: trace
  in eval mode. `variables` is `{"params", "batch_stats", "other"}` (see the
  module docstring); `jaxprune.module(model, jaxprune.slim(variables, graph,
  masks))` builds the slimmed model.

  Example:
    >>> model.eval()
    >>> fn, variables = jaxprune.functional(model)
    >>> graph = jaxprune.trace(fn, variables, jnp.zeros((1, 32, 32, 3)))
  """
  graphdef, variables = split(model)

  def fn(v, *args):
    return getattr(merge(graphdef, v, copy=True), method)(*args)

  return fn, variables


def _sync(path: str, m: nnx.Module) -> None:
  """Updates the static width attributes of flax's layers from their arrays' shapes."""
  if isinstance(m, nnx.Conv):
    kernel = m.kernel[...]
    old_out, old_groups = m.out_features, m.feature_group_count
    cin_g, cout = kernel.shape[-2], kernel.shape[-1]
    groups = old_groups
    if old_groups > 1 and cin_g == 1 and old_groups == m.in_features:
      # Depthwise (possibly with a channel multiplier): one group per input channel.
      groups = cout // max(old_out // old_groups, 1)
    m.feature_group_count = groups
    m.in_features = cin_g * groups
    m.out_features = cout
    m.kernel_shape = tuple(kernel.shape)
  elif isinstance(m, nnx.Linear):
    m.in_features, m.out_features = m.kernel[...].shape[-2:]
  elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm)):
    for name in ("scale", "bias", "mean"):
      v = getattr(m, name, None)
      if v is not None:
        m.num_features = v[...].shape[-1]
        break


def module(model_or_graphdef, variables: Variables, *example_args: Any) -> nnx.Module:
  """A runnable module holding (possibly slimmed) `variables`.

  flax keeps some widths as static attributes (`nnx.Conv.feature_group_count`,
  `in_features`, `out_features`, `BatchNorm.num_features`); they are brought in
  line with the arrays, so a slimmed depthwise or grouped `nnx.Conv` runs.
  With `example_args` (or a graph's, see `slim_module`) the module is run
  abstractly once: a layer that still cannot take the smaller arrays raises a
  ValueError naming it, never a model that fails later.

  Example:
    >>> small_model = jaxprune.module(model, jaxprune.slim(variables, graph, masks))
  """
  m = merge(model_or_graphdef, variables)
  for path, sub in nnx.iter_modules(m):
    _sync(".".join(map(str, path)), sub)
  if example_args:
    check_runs(m, *example_args)
  return m


def check_runs(m: nnx.Module, *example_args: Any) -> None:
  """Runs `m` on abstract `example_args`; a failure names the layer that broke."""
  graphdef, state = nnx.split(m)
  specs = [jax.ShapeDtypeStruct(np.shape(a), getattr(a, "dtype", np.float32)) for a in example_args]
  try:
    jax.eval_shape(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *specs)
  except Exception as e:  # any layer error: re-raise with what to do
    where = _failing_layer(e)
    raise ValueError(
      f"the slimmed module does not run{where}: {type(e).__name__}: {e}. A layer keeps a "
      "width as a Python attribute that jaxprune cannot update; compute it from the arrays' "
      "shapes (as the bundled models do), or keep that layer's channels (freeze its group "
      "with masks of ones)."
    ) from e


def _failing_layer(e: Exception) -> str:
  tb = e.__traceback__
  name = ""
  while tb is not None:
    self_ = tb.tb_frame.f_locals.get("self")
    if isinstance(self_, nnx.Module):
      name = f" at a {type(self_).__name__} layer"
    tb = tb.tb_next
  return name


def slim_module(model: nnx.Module, graph, masks) -> nnx.Module:
  """`jaxprune.slim` of the model's variables as a runnable, smaller module.

  Checked on the graph's example input shapes.

  Example:
    >>> small_model = jaxprune.slim_module(model, graph, masks)
    >>> bool(jnp.allclose(small_model(x), jaxprune.masked(fn, graph)(variables, masks, x), atol=1e-5))
    True
  """
  from jaxprune.slim import slim  # the core; no flax there

  _, variables = split(model)
  small = slim(variables, graph, masks)
  args = [np.zeros(s.shape, s.dtype) for s in getattr(graph, "example_args", ())]
  return module(model, small, *args)
