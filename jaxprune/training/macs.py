"""A stand-in MAC counter (conv + dense) for results.json.

``jaxprune.cost`` (the pruning core) is the real cost model; this counts the
multiply-accumulates of every ``conv_general_dilated`` and ``dot_general`` in
a function's jaxpr, the "paper" convention (no BN, ReLU, pooling or bias).
It follows nested jaxprs (jit, custom_jvp/vjp, ...).
"""
from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
from jax.extend import core as jcore


def conv_dense_macs(fn: Callable[..., Any], *example_args: Any) -> int:
  """MACs of conv and dense ops of ``fn(*example_args)`` (per call, so per batch).

  >>> import jax.numpy as jnp
  >>> conv_dense_macs(lambda x, w: x @ w, jnp.ones((2, 3)), jnp.ones((3, 4)))
  24
  """
  return _jaxpr_macs(jax.make_jaxpr(fn)(*example_args).jaxpr)


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      lhs, rhs = (v.aval for v in eqn.invars[:2])
      out = eqn.outvars[0].aval
      dn = eqn.params['dimension_numbers']
      rhs_spec = dn.rhs_spec  # (out_feature, in_feature, *spatial) axis indices
      k_in = rhs.shape[rhs_spec[1]]
      k_spatial = math.prod(rhs.shape[i] for i in rhs_spec[2:])
      total += math.prod(out.shape) * k_in * k_spatial
    elif name == 'dot_general':
      (lc, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval
      contract = math.prod(lhs.shape[i] for i in lc)
      total += math.prod(eqn.outvars[0].aval.shape) * contract
    for sub in _subjaxprs(eqn):
      total += _jaxpr_macs(sub)
  return total


def _subjaxprs(eqn):
  for p in eqn.params.values():
    for q in (p if isinstance(p, (list, tuple)) else (p,)):
      if isinstance(q, jcore.ClosedJaxpr):
        yield q.jaxpr
      elif isinstance(q, jcore.Jaxpr):
        yield q
