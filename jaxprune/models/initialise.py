"""Model initialisation with one random-sampling program per model instead of one per kernel shape.

Creating a model eagerly runs each initialiser as its own small XLA program,
and ``jax.random.normal`` compiles once per kernel shape (about a second each
on a quiet CPU, far more under load): most of a model's creation time. Here
the builder is traced once (no compilation), its operations run one by one
as eager execution runs them, except the normal samples: those of similar
sizes are drawn together, ``vmap``-ed over their keys, in one program. With
threefry's partitionable counters a sample's element ``i`` depends only on
its key and ``i``, so a longer draw cut to size is the same sample: every
value equals eager creation's bit for bit (tested).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

_FACTOR = 64  # samples whose sizes differ by less share one program (the smaller ones drawn longer)


def _is_normal(eqn) -> bool:
  return eqn.primitive.name in ('jit', 'pjit') and eqn.params.get('name') == '_normal' and len(eqn.invars) == 1


def _run(jaxpr: jcore.ClosedJaxpr, args: list, normals: dict[int, np.ndarray] | None) -> tuple[list, dict]:
  """Evaluates ``jaxpr`` op by op (as eager execution does); ``_normal`` samples come
  from ``normals`` (zeros when None). Returns the outputs and each sample's key."""
  env = dict(zip(jaxpr.jaxpr.constvars, jaxpr.consts, strict=True))
  env.update(zip(jaxpr.jaxpr.invars, args, strict=True))
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  keys = {}
  for i, eqn in enumerate(jaxpr.jaxpr.eqns):
    if _is_normal(eqn):
      keys[i] = read(eqn.invars[0])
      aval = eqn.outvars[0].aval
      outs = [jnp.asarray(np.zeros(aval.shape, aval.dtype) if normals is None else normals[i])]
    else:
      outs = eqn.primitive.bind(*map(read, eqn.invars), **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(v) for v in jaxpr.jaxpr.outvars], keys


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(keys: jax.Array, size: int, dtype) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(k, (size,), dtype))(keys)


def _normals(jaxpr: jcore.ClosedJaxpr, keys: dict) -> dict[int, np.ndarray]:
  """Every ``_normal`` sample, drawn in groups of similar size."""
  avals = {i: jaxpr.jaxpr.eqns[i].outvars[0].aval for i in keys}
  order = sorted(keys, key=lambda i: avals[i].size)
  groups, out = [], {}
  for i in order:
    if groups and avals[groups[-1][0]].size * _FACTOR > avals[i].size and avals[groups[-1][0]].dtype == avals[i].dtype:
      groups[-1].append(i)
    else:
      groups.append([i])
  for g in groups:
    size, count = avals[g[-1]].size, 2 ** math.ceil(math.log2(len(g)))  # padded: fewer distinct programs
    stacked = jnp.stack([keys[i] for i in g] + [keys[g[0]]] * (count - len(g)))
    drawn = np.asarray(_draw(stacked, 2 ** math.ceil(math.log2(size)), avals[g[0]].dtype))
    out.update({i: drawn[j, : avals[i].size].reshape(avals[i].shape) for j, i in enumerate(g)})
  return out


def create(build: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """``build(rngs)``, with its normal samples drawn in a few programs; ``rngs`` advances
  exactly as ``build(rngs)`` would advance it."""
  rng_def, rng_state = nnx.split(rngs)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(rng_state)):
    return build(rngs)  # inside a trace (e.g. nnx.eval_shape): nothing is compiled anyway
  graphdef = []

  def init(state):
    r = nnx.merge(rng_def, state)
    gd, model_state = nnx.split(build(r))
    graphdef.append(gd)
    return model_state, nnx.state(r)

  jaxpr, out_shape = jax.make_jaxpr(init, return_shape=True)(rng_state)
  args = jax.tree.leaves(rng_state)
  _, keys = _run(jaxpr, args, None)
  flat, _ = _run(jaxpr, args, _normals(jaxpr, keys))
  model_state, new_rng_state = jax.tree.unflatten(jax.tree.structure(out_shape), flat)
  nnx.update(rngs, new_rng_state)
  return nnx.merge(graphdef[0], model_state)
