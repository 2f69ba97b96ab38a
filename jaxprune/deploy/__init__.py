"""Deploy a pruned network: fold BatchNorms, round widths, export with `jax.export`,
load and run without model code.

Loading (`load`, `Deployed`) needs jax and orbax only: flax is imported on first
use of `fold_module`, `BiasAdd` or `export_module`.

Example:
  >>> small_model = jaxprune.slim_module(model, graph, masks)
  >>> card = jaxprune.deploy.export_module(small_model, "out/net", input_shape=(32, 32, 3),
  ...                                      card={"model": "resnet20", "budget": 0.5})
  >>> net = jaxprune.deploy.load("out/net")       # no model code needed
  >>> bool(jnp.allclose(net(x), small_model(x), atol=1e-5))   # any batch size
  True
"""

import importlib

from jaxprune.deploy.export import FORMAT, FORMAT_VERSION, export, export_module
from jaxprune.deploy.fold import Fold, cast_floats, find_batchnorms, fold_batchnorm, leaf_paths
from jaxprune.deploy.load import Deployed, IncompatibleArtifactError, check_card, load
from jaxprune.deploy.rounding import (
  ROUND_TO,
  SELECT_MULTIPLES,
  pad_channels,
  round_to,
  round_up_masks,
  select_multiples,
  select_rounded,
)

_LAZY = {"BiasAdd": "jaxprune.deploy.modules", "fold_module": "jaxprune.deploy.modules"}

__all__ = [
  "BiasAdd",
  "Deployed",
  "FORMAT",
  "FORMAT_VERSION",
  "Fold",
  "IncompatibleArtifactError",
  "ROUND_TO",
  "SELECT_MULTIPLES",
  "cast_floats",
  "check_card",
  "export",
  "export_module",
  "find_batchnorms",
  "fold_batchnorm",
  "fold_module",
  "leaf_paths",
  "load",
  "pad_channels",
  "round_to",
  "round_up_masks",
  "select_multiples",
  "select_rounded",
]


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'jaxprune.deploy' has no attribute {name!r}")
