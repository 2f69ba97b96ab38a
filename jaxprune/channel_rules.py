"""The rules of `channel_flow`'s interpreter: elementwise ops, control flow, and
the table from primitive name to rule (`RULES`, which `trace` hands the
interpreter). A rule maps its operands' channel ids to its outputs' and records
ties, mask sites, cost ops and, for branch units, liveness and branch sites.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.extend import core as jcore

from jaxprune.channel_flow import (
  ALWAYS,
  S_ALWAYS,
  S_EMPTY,
  BranchSite,
  ChannelFlow,
  IndexEvent,
  UnsupportedPrimitiveError,
  Value,
  channel_axis,
  elementwise_op,
  is_batch,
  merge_axis,
  out_value,
  shape_of,
)
from jaxprune.channel_producers import conv, dot_general
from jaxprune.channel_shapes import (
  broadcast_in_dim,
  concatenate,
  cumulative,
  pad,
  reduce_,
  reduce_window,
  reshape,
  rev,
  slice_,
  split,
  squeeze,
  transpose,
  unary_passthrough,
)

# f(0) == 0: a zero (dead) channel stays zero.
_ZERO_PRESERVING = set(
  """neg abs sign sqrt cbrt square integer_pow tanh sin tan asin atan
  sinh asinh atanh erf erf_inv expm1 log1p floor ceil round convert_element_type
  reduce_precision stop_gradient copy copy_p real imag conj""".split()
)
# act (op) nonact: zero act stays zero whatever the other operand
_ZERO_ABSORBING = {"mul", "and"}


def elementwise(fl: ChannelFlow, eqn, ins: list[Value], path) -> Value:
  name = eqn.primitive.name
  out_shape = shape_of(eqn.outvars[0])
  same_rank = [(x, v) for x, v in zip(ins, eqn.invars) if len(shape_of(v)) == len(out_shape)]
  acts = [x for x in ins if x.act]
  if not acts:
    return _nonact(fl, eqn, ins, same_rank, out_shape)

  origins = {x.origin for x in acts}
  join = len(origins) > 1
  zero = _known_zero(name, ins, eqn)
  ids: dict[int, np.ndarray | None] = {}
  base = acts[0]
  for a in range(len(out_shape)):
    # An activation operand's ids first: liveness is keyed by id.
    order = sorted(same_rank, key=lambda xv: not xv[0].act)
    ids[a] = merge_axis(fl, [x.ids.get(a) for x, _ in order], join)
  out = out_value(ids, ins, zero=zero)

  marker = [x for x in ins if not x.act and x.zero and x.index_of is not None]
  if name in ("add", "sub", "add_any") and marker and len(acts) == 1:
    # `x + 0 * index`: the dense form of a gather/expand vector; no arithmetic.
    z = marker[0]
    for a, leaf_ids in z.ids.items():
      act_ids = base.ids.get(a)
      if act_ids is not None and leaf_ids.size == act_ids.size:
        fl.events.append(IndexEvent(z.index_of, leaf_ids, act_ids))
        out.index_event = len(fl.events) - 1
    return out
  if zero:
    for a, i in out.ids.items():
      if not is_batch(fl, i):
        out.ids[a] = fl.relabel(i, S_EMPTY)
    return out
  if any(x.zero for x in ins if not x.act) and name in ("add", "sub", "add_any"):
    return out  # adding zero: no arithmetic, nothing changes
  if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
    out.index_event = base.index_event

  for a, i in list(out.ids.items()):
    if is_batch(fl, i):
      continue
    if join or len(acts) > 1:
      parts = [fl.live(x.ids[a]) for x in acts if a in x.ids and x.ids[a].size == i.size]
      live = fl.union(parts) if parts else fl.live(i)
    elif len(out.origin) == 1:
      live = fl.live(i)  # a producer's chain: computed where its producer keeps it
    elif _preserves_zero(name, ins, eqn):
      live = fl.live(i)
    else:
      live = S_ALWAYS  # e.g. a bias added to a residual stream: non-zero everywhere
    out.ids[a] = fl.relabel(i, live, join)

  if join and name in ("add", "add_any"):
    _branch_sites(fl, acts, ins, path)
  if out_shape:
    fl.ops.append(elementwise_op(fl, "elementwise", eqn, out, out_shape))
  return out


def _nonact(fl, eqn, ins, same_rank, out_shape) -> Value:
  ids = {a: merge_axis(fl, [x.ids.get(a) for x, _ in same_rank]) for a in range(len(out_shape))}
  idx = {x.index_of for x in ins if x.index_of is not None}
  return out_value(
    ids, ins, zero=_known_zero(eqn.primitive.name, ins, eqn), index_of=idx.pop() if len(idx) == 1 else None
  )


def _known_zero(name: str, ins: list[Value], eqn) -> bool:
  if name in _ZERO_ABSORBING:
    return any(x.zero for x in ins)
  if name in ("add", "sub", "add_any", "max", "min"):
    return all(x.zero for x in ins)
  if name == "select_n":
    return all(x.zero for x in ins[1:])
  if name == "div" or name in _ZERO_PRESERVING:
    return ins[0].zero
  return False


def _preserves_zero(name: str, ins: list[Value], eqn) -> bool:
  """Whether an op keeps a zero activation channel zero (its other operands unknown
  or literal)."""
  if name in _ZERO_PRESERVING or name in _ZERO_ABSORBING:
    return True
  if name == "div":
    return ins[0].act
  others = [v for x, v in zip(ins, eqn.invars) if not x.act]
  if name in ("add", "sub", "add_any", "max", "min"):
    vals = []
    for v in others:
      if not isinstance(v, jcore.Literal):
        return False  # a leaf-derived constant: unknown, may be non-zero
      vals.append(np.asarray(v.val))
    if name in ("add", "sub", "add_any"):
      return all(np.all(x == 0) for x in vals)
    # max(0, c) == 0 iff c <= 0; min(0, c) == 0 iff c >= 0
    return all(np.all(x <= 0) if name == "max" else np.all(x >= 0) for x in vals)
  return False


def _branch_sites(fl: ChannelFlow, acts: list[Value], ins: list[Value], path) -> None:
  for k, x in enumerate(ins):
    if not x.act or len(x.origin) != 1:
      continue
    (t,) = x.origin
    others = frozenset().union(*(y.origin for j, y in enumerate(ins) if j != k and y.act))
    if t in others or t == ALWAYS:
      continue
    axis = channel_axis(fl, x)
    if axis is not None:
      fl.branch_sites.append(BranchSite(path, k, axis, x.ids[axis], t, x.index_event))


def _closed_call(key: str):
  def rule(fl, eqn, ins, path):
    closed = eqn.params[key]
    jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
    consts = [Value({}, False)] * len(getattr(closed, "consts", ()))
    n_in = len(jaxpr.invars)
    return fl.run(jaxpr, consts, ins[len(ins) - n_in :], path)

  return rule


def cond(fl, eqn, ins, path):
  outs_per_branch = []
  for k, br in enumerate(eqn.params["branches"]):
    consts = [Value({}, False)] * len(br.consts)
    outs_per_branch.append(fl.run(br.jaxpr, consts, ins[1:], path + (-1 - k,)))
  merged = []
  for outs in zip(*outs_per_branch):
    axes = set().union(*(o.ids for o in outs))
    merged.append(out_value({a: merge_axis(fl, [o.ids.get(a) for o in outs]) for a in axes}, list(outs) + [ins[0]]))
  return merged


def scan(fl, eqn, ins, path):
  p = eqn.params
  nc, ncar = p["num_consts"], p["num_carry"]
  consts, carry, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
  xs_body = [out_value({a - 1: i for a, i in x.ids.items() if a > 0}, [x]) for x in xs]
  body = p["jaxpr"]
  outs = fl.run(body.jaxpr, [Value({}, False)] * len(body.consts), list(consts) + list(carry) + xs_body, path + (-1,))
  carry_out, ys = outs[:ncar], outs[ncar:]
  res = []
  for cin, cout in zip(carry, carry_out):
    axes = set(cin.ids) | set(cout.ids)
    res.append(out_value({a: merge_axis(fl, [cin.ids.get(a), cout.ids.get(a)]) for a in axes}, [cin, cout]))
  for y in ys:
    res.append(out_value({a + 1: i for a, i in y.ids.items()}, [y]))
  return res


def gather(fl, eqn, ins, path):
  """A gather of channels by indices held in the variables: the form a bundled
  ResNet takes once its residual branches are slimmed. Its channel map depends
  on the values, which a trace does not see."""
  if any(x.index_of is not None for x in ins[1:]) and fl.carries_channels(ins[0]):
    raise UnsupportedPrimitiveError(
      f"jaxprune.trace: channels gathered by an index vector at {fl.where(eqn)}: this "
      "network's residual branches were slimmed. Trace, mask and slim the unslimmed "
      "network, and count a slimmed one with jaxprune.cost(graph, masks) of the original."
    )
  return fl.unknown(eqn, ins)


def _no_channels(fl, eqn, ins, path):
  outs = [out_value({}, ins, zero=False) for _ in eqn.outvars]
  return outs if eqn.primitive.multiple_results else outs[0]


_ELEMENTWISE = """add sub mul div max min pow atan2 rem and or xor ne eq lt le gt ge
  nextafter neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan
  sinh cosh asinh acosh atanh abs sign sqrt rsqrt cbrt square integer_pow erf erfc
  erf_inv floor ceil round is_finite not convert_element_type reduce_precision
  stop_gradient copy copy_p real imag conj add_any select_n clamp""".split()

RULES: dict[str, Any] = {name: elementwise for name in _ELEMENTWISE}
RULES.update(
  {
    "broadcast_in_dim": broadcast_in_dim,
    "reshape": reshape,
    "transpose": transpose,
    "squeeze": squeeze,
    "slice": slice_,
    "pad": pad,
    "concatenate": concatenate,
    "split": split,
    "rev": rev,
    "reduce_sum": reduce_,
    "reduce_max": reduce_,
    "reduce_min": reduce_,
    "reduce_prod": reduce_,
    "reduce_and": reduce_,
    "reduce_or": reduce_,
    "argmax": reduce_,
    "argmin": reduce_,
    "cumsum": cumulative,
    "cumprod": cumulative,
    "cummax": cumulative,
    "cummin": cumulative,
    "cumlogsumexp": cumulative,
    "reduce_window_max": reduce_window,
    "reduce_window_min": reduce_window,
    "reduce_window_sum": reduce_window,
    "conv_general_dilated": conv,
    "dot_general": dot_general,
    "jit": _closed_call("jaxpr"),
    "pjit": _closed_call("jaxpr"),
    "closed_call": _closed_call("call_jaxpr"),
    "core_call": _closed_call("call_jaxpr"),
    "custom_jvp_call": _closed_call("call_jaxpr"),
    "custom_vjp_call": _closed_call("call_jaxpr"),
    "custom_vjp_call_jaxpr": _closed_call("fun_jaxpr"),
    "checkpoint": _closed_call("jaxpr"),
    "remat": _closed_call("jaxpr"),
    "remat2": _closed_call("jaxpr"),  # jax.checkpoint's primitive
    "cond": cond,
    "scan": scan,
    "gather": gather,
    "iota": _no_channels,
    "random_bits": _no_channels,
    "random_seed": _no_channels,
    "random_wrap": _no_channels,
    "random_unwrap": _no_channels,
    "threefry2x32": _no_channels,
    "sharding_constraint": unary_passthrough,
    "optimization_barrier": lambda fl, eqn, ins, path: [out_value(dict(x.ids), [x]) for x in ins],
  }
)
