"""jaxprune: channel pruning for JAX/Flax on one small functional core.

Example:
  >>> import jax.numpy as jnp, jaxprune
  >>> from flax import nnx
  >>> model = jaxprune.models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  >>> model.eval()
  >>> fn, state = jaxprune.functional(model)
  >>> graph = jaxprune.trace(fn, state, jnp.zeros((1, 32, 32, 3)))
  >>> scores = jaxprune.criteria.l1(state, graph)
  >>> masks = jaxprune.select.global_topk(scores, graph, budget=0.5, unit="macs")
  >>> jaxprune.cost(graph, masks).macs / jaxprune.cost(graph).macs   # ~0.5
  >>> small = jaxprune.slim(state, graph, masks)   # nnx.merge(graphdef, small) runs
"""
from jaxprune.channel_flow import UnsupportedPrimitiveError
from jaxprune.cost import UNITS, Cost, LayerCosts, cost, ratio
from jaxprune.graph import ChannelGraph, Group, Member, check_masks
from jaxprune.masked import masked
from jaxprune.nnx_bridge import functional
from jaxprune.slim import expand, slim
from jaxprune.trace import trace

__all__ = [
    "ChannelGraph", "Cost", "Group", "LayerCosts", "Member", "UNITS", "UnsupportedPrimitiveError",
    "check_masks", "cost", "criteria", "expand", "functional", "masked", "ratio", "select",
    "slim", "trace",
]
from jaxprune import criteria, select  # noqa: E402
