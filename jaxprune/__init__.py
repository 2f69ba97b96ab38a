"""jaxprune: channel pruning for JAX/Flax on one small functional core.

Example:
  >>> import jax.numpy as jnp, jaxprune
  >>> from flax import nnx
  >>> model = jaxprune.models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  >>> model.eval()
  >>> fn, variables = jaxprune.functional(model)
  >>> graph = jaxprune.trace(fn, variables, jnp.zeros((1, 32, 32, 3)))
  >>> scores = jaxprune.criteria.l1(variables, graph)
  >>> masks = jaxprune.select.global_topk(scores, graph, budget=0.5, unit="macs")
  >>> float(jaxprune.cost(graph, masks).macs / jaxprune.cost(graph).macs) <= 0.5
  True
  >>> small_model = jaxprune.slim_module(model, graph, masks)       # a smaller nnx.Module

The core (everything but `functional`, `module`, `slim_module` and
`nnx_bridge`, which need flax and are imported on first use) depends on jax,
numpy and scipy only.
"""

import importlib

from jaxprune.channel_flow import UnsupportedPrimitiveError
from jaxprune.cost import UNITS, Cost, LayerCosts, cost, ratio
from jaxprune.gated import Gated, GateInput, Producer, gated, producers
from jaxprune.graph import ChannelGraph, Expr, Group, Member, check_masks
from jaxprune.masked import masked
from jaxprune.slim import expand, slim
from jaxprune.trace import trace

_LAZY = {
  "functional": "jaxprune.nnx_bridge",
  "module": "jaxprune.nnx_bridge",
  "slim_module": "jaxprune.nnx_bridge",
  "nnx_bridge": "jaxprune.nnx_bridge",
  "models": "jaxprune.models",
  "methods": "jaxprune.methods",
}

__all__ = [
  "ChannelGraph",
  "Cost",
  "Expr",
  "GateInput",
  "Gated",
  "Group",
  "LayerCosts",
  "Member",
  "Producer",
  "UNITS",
  "UnsupportedPrimitiveError",
  "check_masks",
  "cost",
  "criteria",
  "expand",
  "functional",
  "gated",
  "masked",
  "module",
  "producers",
  "ratio",
  "select",
  "slim",
  "slim_module",
  "trace",
]


def __getattr__(name):
  if name in _LAZY:
    mod = importlib.import_module(_LAZY[name])
    value = mod if mod.__name__.endswith(name) else getattr(mod, name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")


from jaxprune import criteria, select  # noqa: E402
