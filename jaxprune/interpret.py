"""The one jaxpr interpreter behind `masked` and `gated`.

It evaluates a traced network equation by equation and, at each *site* (an
operand of a conv/dense, or of a residual sum with branch groups), multiplies
the operand by what keeps its channels (`Expr.value` of the current flat mask
vector). `gated` adds hooks: before a producer runs, a gate may set its
group's per-sample masks; at a group's first site, the un-masked operand may be
observed. Nested calls (jit, custom_jvp, checkpoint, ...) are entered only
when a site or hook lies inside them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util

from jaxprune.graph import Expr

CALLS = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "checkpoint": "jaxpr",
  "remat": "jaxpr",
  "remat2": "jaxpr",
}

Sites = Mapping[tuple[tuple[int, ...], int], tuple[int, Expr]]


def apply_mask(x: jax.Array, axis: int, m: jax.Array) -> jax.Array:
  """`x` times per-channel values `m` along `axis`; `m` (n,) or per sample (batch, n)."""
  m = m.astype(x.dtype)
  shape = [1] * x.ndim
  if m.ndim == 1:
    shape[axis] = m.shape[0]
    return x * m.reshape(shape)
  if x.shape[0] != m.shape[0] or axis == 0:
    raise ValueError(
      f"per-sample masks have batch {m.shape[0]} but the masked activation has shape "
      f"{x.shape} (batch first expected); pass masks with one row per input sample."
    )
  shape[0], shape[axis] = m.shape[0], m.shape[1]
  return x * m.reshape(shape)


class State:
  """The flat mask vector as it evolves during one evaluation, and what hooks saw."""

  def __init__(self, flat: jax.Array):
    self.flat = flat
    self.seen: dict[str, Any] = {}


# before(path, invals, state) may change state.flat; observe(key, operand, state) may record
Hook = Callable[..., None]


def evaluate(
  closed: jcore.ClosedJaxpr,
  args: list,
  sites: Sites,
  state: State,
  *,
  before: Mapping[tuple[int, ...], Hook] | None = None,
  observe: Mapping[tuple[tuple[int, ...], int], Hook] | None = None,
) -> list:
  """Evaluates `closed` on `args` with masks applied at `sites`."""
  before, observe = before or {}, observe or {}
  keys = [p for p, _ in sites] + list(before) + [p for p, _ in observe]
  inside = {p[:k] for p in keys for k in range(1, len(p))}
  return _eval(closed.jaxpr, list(closed.consts), args, sites, state, before, observe, inside, ())


def _eval(jaxpr, consts, args, sites, state, before, observe, inside, path):
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  write(env, jaxpr.constvars, consts)
  write(env, jaxpr.invars, args)
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    invals = [read(v) for v in eqn.invars]
    key = CALLS.get(eqn.primitive.name)
    if key is not None and here in inside:
      closed = eqn.params[key]
      inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
      outs = _eval(
        inner,
        list(getattr(closed, "consts", ())),
        invals[len(invals) - len(inner.invars) :],
        sites,
        state,
        before,
        observe,
        inside,
        here,
      )
    else:
      if here in inside:
        raise NotImplementedError(
          f"jaxprune: channels inside '{eqn.primitive.name}' at "
          f"{source_info_util.summarize(eqn.source_info)} cannot be masked yet."
        )
      for k in range(len(invals)):
        if (here, k) in observe:
          observe[(here, k)](invals[k], state)
        if (here, k) in sites:
          axis, expr = sites[(here, k)]
          invals[k] = apply_mask(invals[k], axis, expr.value(state.flat))
      if here in before:
        before[here](invals, state)
      outs = bind(eqn, invals)
    write(env, eqn.outvars, outs)
  return [read(v) for v in jaxpr.outvars]


def bind(eqn, invals) -> list:
  """Runs one equation on new inputs, keeping its source location for errors."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with source_info_util.user_context(eqn.source_info.traceback):
    outs = eqn.primitive.bind(*invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def write(env: dict, outvars, outs) -> None:
  for v, o in zip(outvars, outs):
    if not isinstance(v, jcore.DropVar):
      env[v] = o


def batch_size(args) -> int | None:
  for a in jax.tree_util.tree_leaves(args):
    if np.ndim(a):
      return int(np.shape(a)[0])
  return None
