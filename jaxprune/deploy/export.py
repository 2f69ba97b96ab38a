"""Write a network as a `jax.export` artifact with a symbolic batch, its weights, and a card.

A deploy directory holds

  model.jax    the serialized `jax.export.Exported` of `f(weights, x)`: StableHLO,
               batch dimension symbolic, lowered for several platforms
  weights/     the weights (orbax), a flat dict {leaf name: array}
  card.json    what the network is (model, method, budget, accuracy, MACs,
               params: given by the caller), its input (shape, dtype, layout,
               normalisation), the format version and the weights' names,
               shapes and dtypes

`jaxprune.deploy.load` runs it without the model's code.

Example:
  >>> info = jaxprune.data.get_info("cifar10_subset")
  >>> card = jaxprune.deploy.export_module(small_model, "out/resnet20_50",
  ...     input_shape=(32, 32, 3), card={"model": "resnet20", "budget": 0.5},
  ...     normalisation={"mean": info.mean, "std": info.std})
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.deploy.fold import leaf_paths

FORMAT = "jaxprune.deploy"
FORMAT_VERSION = 1
MODEL_FILE, WEIGHTS_DIR, CARD_FILE = "model.jax", "weights", "card.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Keys the card's own fields use; the caller's fields may not replace them.
RESERVED = (
  "format",
  "format_version",
  "jax_version",
  "jaxprune_version",
  "calling_convention_version",
  "platforms",
  "input",
  "output",
  "weights",
  "compute_dtype",
)


def _version() -> str:
  try:
    return metadata.version("jaxprune")
  except metadata.PackageNotFoundError:
    return "unknown"


def _jsonable(x: Any) -> Any:
  """Numbers and arrays in the caller's card as plain JSON values."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)) or np.isscalar(x) and hasattr(x, "dtype"):
    return np.asarray(x).tolist()
  return x


def export(
  fn: Callable,
  variables: Any,
  directory: str,
  *,
  input_shape: Sequence[int],
  input_dtype: Any = jnp.float32,
  card: Mapping[str, Any] | None = None,
  normalisation: Mapping[str, Any] | None = None,
  compute_dtype: Any = None,
  platforms: Sequence[str] = PLATFORMS,
  batch_size: int | None = None,
  overwrite: bool = False,
) -> dict:
  """Export `fn(variables, x)` to `directory`; returns the card written.

  `input_shape` is one example's shape (e.g. `(32, 32, 3)`, NHWC); the batch
  dimension is symbolic (any batch size runs) unless `batch_size` is given.
  `compute_dtype` (e.g. `jnp.bfloat16`) casts the floating weights and the input
  inside the artifact and returns outputs in `input_dtype`. `card` holds the
  caller's fields (model, method, budget, accuracy, MACs, params, ...);
  `normalisation` (e.g. `{"mean": [...], "std": [...]}`) is how images are
  prepared, stored with the input. The directory is written atomically: a
  crash leaves no half-written artifact.

  Example:
    >>> fn, variables = jaxprune.functional(small_model)
    >>> card = jaxprune.deploy.export(fn, variables, "out/net", input_shape=(32, 32, 3))
  """
  card = dict(card or {})
  clash = sorted(set(card) & set(RESERVED))
  if clash:
    raise ValueError(f"card keys {clash} are written by export itself; rename them (reserved: {list(RESERVED)})")
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise FileExistsError(
      f"{directory} exists and is not empty; pass overwrite=True to replace it, or choose another directory."
    )
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown:
    raise ValueError(f"unknown platforms {unknown}; choose from {PLATFORMS}")
  input_shape = tuple(int(d) for d in input_shape)
  input_dtype = jnp.dtype(input_dtype)
  if compute_dtype is not None:
    from jaxprune.deploy.fold import cast_floats

    variables = cast_floats(variables, compute_dtype)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  names = leaf_paths(variables)

  def call(weights, x):
    y = fn(jax.tree_util.tree_unflatten(treedef, weights), x if compute_dtype is None else x.astype(compute_dtype))
    return y if compute_dtype is None else jax.tree.map(lambda a: a.astype(input_dtype), y)

  batch = jax.export.symbolic_shape("batch")[0] if batch_size is None else int(batch_size)
  x_spec = jax.ShapeDtypeStruct((batch,) + input_shape, input_dtype)
  w_spec = [jax.ShapeDtypeStruct(np.shape(w), jnp.asarray(w).dtype) for w in leaves]
  exported = jax.export.export(jax.jit(call), platforms=tuple(platforms))(w_spec, x_spec)
  out_avals = exported.out_avals
  card = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "jax_version": jax.__version__,
    "jaxprune_version": _version(),
    "calling_convention_version": exported.calling_convention_version,
    "platforms": list(exported.platforms),
    "input": {
      "shape": [None if batch_size is None else batch_size, *input_shape],
      "dtype": input_dtype.name,
      "layout": "NHWC" if len(input_shape) == 3 else None,
      "normalisation": _jsonable(normalisation),
    },
    "output": [
      {"shape": [None if not isinstance(d, int) else d for d in a.shape], "dtype": a.dtype.name} for a in out_avals
    ],
    "weights": {
      "leaves": [
        {"name": n, "shape": list(np.shape(w)), "dtype": jnp.asarray(w).dtype.name} for n, w in zip(names, leaves)
      ]
    },
    "compute_dtype": None if compute_dtype is None else jnp.dtype(compute_dtype).name,
    **_jsonable(card),
  }
  _write(directory, exported.serialize(), dict(zip(names, leaves)), card)
  return card


def _write(directory: str, serialized: bytes | bytearray, weights: dict, card: dict) -> None:
  import orbax.checkpoint as ocp

  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
      f.write(serialized)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, WEIGHTS_DIR), weights)
    ckpt.wait_until_finished()
    with open(os.path.join(tmp, CARD_FILE), "w") as f:
      json.dump(card, f, indent=1)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def export_module(model, directory: str, *, input_shape: Sequence[int], fold: bool = True, **kwargs) -> dict:
  """Export an NNX model (e.g. a slimmed one) in eval mode, BatchNorms folded by default.

  Takes `export`'s keyword arguments; the card records how many BatchNorms were
  folded.

  Example:
    >>> small_model = jaxprune.slim_module(model, graph, masks)
    >>> card = jaxprune.deploy.export_module(small_model, "out/net", input_shape=(32, 32, 3),
    ...                                      card={"model": "resnet20", "budget": 0.5})
  """
  from flax import nnx

  from jaxprune import nnx_bridge
  from jaxprune.deploy.modules import BiasAdd, fold_module

  model.eval()
  example = np.zeros((1, *input_shape), kwargs.get("input_dtype", np.float32))
  card = dict(kwargs.pop("card", None) or {})
  if fold:
    model = fold_module(model, example)
    card.setdefault("folded_batchnorms", sum(isinstance(m, BiasAdd) for _, m in nnx.iter_modules(model)))
  fn, variables = nnx_bridge.functional(model)
  return export(fn, variables, directory, input_shape=input_shape, card=card, **kwargs)
