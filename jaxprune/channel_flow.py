"""Abstract interpretation of a jaxpr that follows channel identities.

Every axis of every input leaf gets fresh integer *channel ids*, one per index.
Each primitive rule maps the ids of its operands' axes to its outputs' axes and
records *ties* (pairs of id arrays that must be kept or removed together), e.g.
a BatchNorm scale multiplied into an activation ties the scale's axis to the
activation's channel axis. Connected components of the ties are the individual
channels of the network; `trace` groups them into prunable channel groups.

The rules also record what later stages need:
- *mask sites*: operands whose channel axis is mixed across channels (conv
  features, dense contractions). Zeroing a channel there removes its every
  contribution, which is what `masked` does.
- *ops*: a cost record per equation (MACs for conv/dense, elementwise ops).
- *frozen* ids: channels that must never be removed (network inputs and
  outputs, channels facing a static pad, channels reduced across).

For residual-branch units (`trace(..., branches=True)`) they also record:
- *tokens*: one per conv/dense with a weight leaf (a producer). An activation
  value's *origin* is the set of tokens whose outputs reach it through
  channel-preserving ops only; a value with one origin is that producer's
  *chain* (its output after BatchNorm, ReLU, ...).
- *liveness*: per activation channel id, the set of tokens that must keep the
  channel for it to be non-zero (a union along a residual stream); a known-zero
  value (times a literal 0, zero padding) is alive nowhere.
- *branch sites*: operands of a residual `add` that are a producer's chain
  while the other operand does not come from that producer.
- *index events*: an integer leaf added as `x + 0 * index` (the dense form of
  the bundled ResNets' gather and expand vectors).
- *join ties*: ties made where values of different origins meet; without them
  the components are the producers' chains.

A primitive with no rule raises `UnsupportedPrimitiveError` when it touches a
value derived from the variables, naming the primitive and its source line.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util

NONE = -1  # id of a position that is no channel (a constant, e.g. zero padding)
ALWAYS = -1  # the token of a place that no branch mask can zero
S_ALWAYS, S_EMPTY = 0, 1  # ids of the liveness sets {ALWAYS} and {}


class UnsupportedPrimitiveError(NotImplementedError):
  """A traced model uses a primitive whose channel semantics are unknown."""


@dataclasses.dataclass
class Value:
  """What is known of one jaxpr value."""

  ids: dict[int, np.ndarray]  # channel ids per axis
  act: bool  # depends on the example inputs (an activation)
  origin: frozenset = frozenset()  # tokens of the producers that reach it (activations)
  zero: bool = False  # known to be exactly zero
  index_of: int | None = None  # a non-activation derived from integer leaf `index_of` alone
  index_event: int | None = None  # an activation made by an index marker (`x + 0 * index`)


@dataclasses.dataclass(frozen=True)
class MaskSite:
  """A conv/dense input: multiplying it by the masks removes the channels."""

  path: tuple[int, ...]  # equation index per nesting level
  operand: int
  axis: int
  ids: np.ndarray
  event: int | None = None  # index event of the operand (a gathered input)
  chain: bool = False  # the operand is one producer's chain (see module docstring)
  token: int | None = None  # that producer


@dataclasses.dataclass(frozen=True)
class BranchSite:
  """An operand of a residual add that is producer `token`'s chain."""

  path: tuple[int, ...]
  operand: int
  axis: int
  ids: np.ndarray
  token: int
  event: int | None = None  # index event of the operand (an expand vector)


@dataclasses.dataclass(frozen=True)
class Token:
  """A conv/dense occurrence with a weight leaf (a producer)."""

  leaf: int | None  # the weight leaf (index), None if the weights are activations
  out_ids: np.ndarray  # its output channel ids
  name: str
  path: tuple[int, ...] = ()  # its equation
  operand: int = 0  # its activation operand
  in_axis: int = -1  # that operand's feature axis
  spatial: tuple[int, ...] = ()  # and its other non-batch axes
  c_in: int = 0  # input features
  op: str = "conv"  # "conv" | "dense"
  first: bool = False  # reads the network's input (no producer before it)


@dataclasses.dataclass(frozen=True)
class IndexEvent:
  """An integer leaf added to an activation as `x + 0 * index` (positions aligned)."""

  leaf: int
  leaf_ids: np.ndarray  # the leaf's ids on the merged axis
  ids: np.ndarray  # the activation's ids at the same positions


@dataclasses.dataclass(frozen=True)
class Op:
  """Cost record: coef * prod_k sum(mask[ids_k]) (grouped: summed per group)."""

  kind: str  # 'conv' | 'dense' | 'elementwise' | 'reduce' | 'volume'
  name: str
  coef: float
  factors: tuple[np.ndarray, ...]
  groups: int = 1
  event: int | None = None  # conv/dense: the index event of its input (a gathered input)


def _summary(eqn) -> str:
  return source_info_util.summarize(eqn.source_info)


class ChannelFlow:
  """Runs the rules over a closed jaxpr; see module docstring."""

  def __init__(self):
    self.num_ids = 0
    self.ties: list[tuple[np.ndarray, np.ndarray]] = []
    self.join: list[bool] = []  # per tie: made where different origins meet
    self.frozen: list[np.ndarray] = []
    self.batch_ids: list[np.ndarray] = []
    self.sites: list[MaskSite] = []
    self.branch_sites: list[BranchSite] = []
    self.ops: list[Op] = []
    self.tokens: list[Token] = []
    self.events: list[IndexEvent] = []
    self.consumers: list[tuple] = []  # (weight in-axis ids, input ids, input's index event)
    self._weight_names: dict[int, str] = {}  # id -> leaf name, for naming ops
    self._leaf_starts: list[int] = []  # first id of each leaf, for leaf_of
    self._leaf_index: list[int] = []
    self.arg_id_end = 0  # ids below this belong to the example inputs
    self._calls: list = []  # enclosing call equations, for error locations
    self._live = np.zeros(1024, np.int32)  # liveness set id per channel id
    self._sets: list[frozenset] = [frozenset({ALWAYS}), frozenset()]
    self._set_id: dict[frozenset, int] = {s: i for i, s in enumerate(self._sets)}

  def carries_channels(self, x: Value) -> bool:
    """Whether a value carries ids that came from the variables (or pads)."""
    return any((ids >= self.arg_id_end).any() for ids in x.ids.values())

  # -- id bookkeeping -----------------------------------------------------------
  def fresh(self, n: int, live: int | np.ndarray = S_ALWAYS) -> np.ndarray:
    ids = np.arange(self.num_ids, self.num_ids + n, dtype=np.int64)
    self.num_ids += n
    if self.num_ids > self._live.size:
      self._live = np.concatenate([self._live, np.zeros(max(self.num_ids, self._live.size), np.int32)])
    self._live[ids] = live
    return ids

  def fresh_value(self, shape: Sequence[int], act: bool) -> Value:
    return Value({a: self.fresh(n) for a, n in enumerate(shape)}, act)

  def add_leaf(self, index: int, ids: Sequence[np.ndarray]) -> None:
    for a in ids:
      if a.size:
        self._leaf_starts.append(int(a[0]))
        self._leaf_index.append(index)

  def leaf_of(self, i: int) -> int | None:
    """The leaf whose axes hold id `i`, if any."""
    if i < self.arg_id_end or not self._leaf_starts:
      return None
    k = bisect.bisect_right(self._leaf_starts, i) - 1
    return self._leaf_index[k] if k >= 0 else None

  def tie(self, a: np.ndarray, b: np.ndarray, join: bool = False):
    keep = (a >= 0) & (b >= 0)
    if keep.any():
      self.ties.append((a[keep], b[keep]))
      self.join.append(join)

  def freeze(self, ids: np.ndarray):
    ids = ids[ids >= 0]
    if ids.size:
      self.frozen.append(ids)

  def name_ids(self, ids: np.ndarray, name: str):
    for i in ids[:1]:
      self._weight_names.setdefault(int(i), name)

  # -- liveness -----------------------------------------------------------------
  def live(self, ids: np.ndarray) -> np.ndarray:
    """Liveness set id of each id (no channel: always alive)."""
    return np.where(ids >= 0, self._live[np.maximum(ids, 0)], S_ALWAYS)

  def set_of(self, sid: int) -> frozenset:
    return self._sets[sid]

  def _intern(self, s: frozenset) -> int:
    if ALWAYS in s:
      s = frozenset({ALWAYS})
    if s not in self._set_id:
      self._set_id[s] = len(self._sets)
      self._sets.append(s)
    return self._set_id[s]

  def union(self, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Per-position union of liveness set ids."""
    stack = np.stack(parts)
    uniq, inv = np.unique(stack, axis=1, return_inverse=True)
    out = np.array([self._intern(frozenset().union(*(self._sets[s] for s in col))) for col in uniq.T], np.int32)
    return out[np.ravel(inv)]

  def relabel(self, ids: np.ndarray, live: np.ndarray | int, join: bool = False) -> np.ndarray:
    """Fresh ids tied to `ids`, with new liveness (unchanged ids when it is the same
    and no join: where origins meet the output always gets its own ids)."""
    live = np.broadcast_to(np.asarray(live, np.int32), ids.shape)
    if not (ids >= 0).any() or (not join and np.array_equal(self.live(ids), live)):
      return ids
    new = self.fresh(ids.size, live)
    new = np.where(ids >= 0, new, NONE)
    self.tie(ids, new, join)
    return new

  # -- driver -------------------------------------------------------------------
  def run(
    self, jaxpr: jcore.Jaxpr, consts_in: list[Value], args_in: list[Value], path: tuple[int, ...] = ()
  ) -> list[Value]:
    env: dict[Any, Value] = {}
    for v, x in zip(jaxpr.constvars, consts_in):
      env[v] = x
    for v, x in zip(jaxpr.invars, args_in):
      env[v] = x

    def read(v) -> Value:
      if isinstance(v, jcore.Literal):
        return Value({}, False, zero=bool(np.all(np.asarray(v.val) == 0)))
      return env[v]

    for i, eqn in enumerate(jaxpr.eqns):
      ins = [read(v) for v in eqn.invars]
      rule = RULES.get(eqn.primitive.name)
      if rule is None:
        outs = self._unknown(eqn, ins)
      else:
        self._calls.append(eqn)
        outs = rule(self, eqn, ins, path + (i,))
        self._calls.pop()
      if not eqn.primitive.multiple_results:
        outs = [outs]
      for v, o in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def where(self, eqn) -> str:
    """Source location of `eqn`; inside a library's jit (e.g. jnp.sort) the
    inner equations carry no user frame, so the enclosing call's is used."""
    for e in [eqn] + self._calls[::-1]:
      loc = _summary(e)
      if loc:
        return loc
    return "an unknown location"

  def _unknown(self, eqn, ins: list[Value]):
    if any(self.carries_channels(x) for x in ins):
      raise UnsupportedPrimitiveError(
        f"jaxprune.trace: primitive '{eqn.primitive.name}' at {self.where(eqn)} "
        "acts on a value that carries prunable channels, and its channel "
        "semantics are unknown. Rewrite that part with supported ops "
        "(conv, dot_general, elementwise, reshape, pad, concatenate, ...), "
        "or keep it outside the traced function."
      )
    outs = [_out({}, ins) for _ in eqn.outvars]
    return outs if eqn.primitive.multiple_results else outs[0]


# ---------------------------------------------------------------------------
# helpers shared by rules


def _shape(v) -> tuple[int, ...]:
  return tuple(v.aval.shape)


def _merge_axis(fl: ChannelFlow, ids_list: list[np.ndarray | None], join: bool = False) -> np.ndarray | None:
  present = [x for x in ids_list if x is not None]
  if not present:
    return None
  first = present[0]
  for other in present[1:]:
    fl.tie(first, other, join)
  # A constant position in one operand and a channel in another: keep the channel.
  out = first.copy()
  for other in present[1:]:
    hole = out < 0
    out[hole] = other[hole]
  return out


def _out(
  ids: dict[int, np.ndarray | None], ins: list[Value], *, zero: bool | None = None, index_of: int | None = None
) -> Value:
  """An output value: activation and origin from the inputs."""
  act = any(x.act for x in ins)
  origin = frozenset().union(*(x.origin for x in ins if x.act)) if act else frozenset()
  if zero is None:
    zero = bool(ins) and all(x.zero for x in ins)
  return Value({a: i for a, i in ids.items() if i is not None}, act, origin, zero, index_of)


def _freeze_axes(fl: ChannelFlow, x: Value, axes) -> None:
  for a in axes:
    if a in x.ids:
      fl.freeze(x.ids[a])


def _is_batch(fl: ChannelFlow, ids: np.ndarray) -> bool:
  return any(ids.size == b.size and ids[0] == b[0] for b in fl.batch_ids)


def _channel_axis(fl: ChannelFlow, x: Value) -> int | None:
  """The one axis of an activation that carries channels of the variables."""
  axes = [a for a, ids in x.ids.items() if not _is_batch(fl, ids) and (ids >= fl.arg_id_end).any()]
  return axes[0] if len(axes) == 1 else None


# ---------------------------------------------------------------------------
# rules

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
  out_shape = _shape(eqn.outvars[0])
  same_rank = [(x, v) for x, v in zip(ins, eqn.invars) if len(_shape(v)) == len(out_shape)]
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
    ids[a] = _merge_axis(fl, [x.ids.get(a) for x, _ in order], join)
  out = _out(ids, ins, zero=zero)

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
      if not _is_batch(fl, i):
        out.ids[a] = fl.relabel(i, S_EMPTY)
    return out
  if any(x.zero for x in ins if not x.act) and name in ("add", "sub", "add_any"):
    return out  # adding zero: no arithmetic, nothing changes
  if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
    out.index_event = base.index_event

  for a, i in list(out.ids.items()):
    if _is_batch(fl, i):
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
    fl.ops.append(_elementwise_op(fl, "elementwise", eqn, out, out_shape))
  return out


def _nonact(fl, eqn, ins, same_rank, out_shape) -> Value:
  ids = {a: _merge_axis(fl, [x.ids.get(a) for x, _ in same_rank]) for a in range(len(out_shape))}
  idx = {x.index_of for x in ins if x.index_of is not None}
  return _out(ids, ins, zero=_known_zero(eqn.primitive.name, ins, eqn), index_of=idx.pop() if len(idx) == 1 else None)


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
    axis = _channel_axis(fl, x)
    if axis is not None:
      fl.branch_sites.append(BranchSite(path, k, axis, x.ids[axis], t, x.index_event))


def _elementwise_op(fl: ChannelFlow, kind: str, eqn, x: Value, shape) -> Op:
  coef, factors = 1.0, []
  for a, n in enumerate(shape):
    ids = x.ids.get(a)
    if ids is not None and a == 0 and _is_batch(fl, ids):
      continue
    if ids is not None and (ids >= 0).any():
      factors.append(ids)
    else:
      coef *= n
  return Op(kind, eqn.primitive.name, coef, tuple(factors))


def unary_passthrough(fl, eqn, ins, path) -> Value:
  out = _out(dict(ins[0].ids), ins, index_of=ins[0].index_of)
  out.index_event = ins[0].index_event
  return out


def broadcast_in_dim(fl, eqn, ins, path) -> Value:
  x = ins[0]
  in_shape = _shape(eqn.invars[0])
  out_shape = eqn.params["shape"]
  ids = {}
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    if i in x.ids and in_shape[i] == out_shape[d]:
      ids[d] = x.ids[i]
  return _out(ids, ins[:1], index_of=x.index_of)


def transpose(fl, eqn, ins, path) -> Value:
  perm = eqn.params["permutation"]
  return _out({i: ins[0].ids.get(p) for i, p in enumerate(perm)}, ins, index_of=ins[0].index_of)


def squeeze(fl, eqn, ins, path) -> Value:
  dims = set(d % len(_shape(eqn.invars[0])) for d in eqn.params["dimensions"])
  keep = [a for a in range(len(_shape(eqn.invars[0]))) if a not in dims]
  return _out({i: ins[0].ids.get(a) for i, a in enumerate(keep)}, ins, index_of=ins[0].index_of)


def reshape(fl, eqn, ins, path) -> Value:
  x = ins[0]
  src, dst = _shape(eqn.invars[0]), tuple(eqn.params["new_sizes"])
  if eqn.params.get("dimensions") is not None:
    raise UnsupportedPrimitiveError(f"reshape with dimensions at {fl.where(eqn)}")
  ids: dict[int, np.ndarray] = {}
  for s_axes, d_axes in _reshape_blocks(src, dst):
    carried = [a for a in s_axes if a in x.ids and src[a] > 1]
    real_d = [a for a in d_axes if dst[a] > 1]
    if not carried:
      continue
    if len(real_d) == 1 and len(carried) == 1 and len([a for a in s_axes if src[a] > 1]) == 1:
      ids[real_d[0]] = x.ids[carried[0]]  # same axis, size-1 axes added/removed
    elif len(real_d) == 1:
      # Merge (flatten): each position of the merged axis belongs to one
      # channel of the single channel-carrying source axis.
      grid = np.indices([src[a] for a in s_axes]).reshape(len(s_axes), -1)
      merged = np.full(grid.shape[1], NONE, dtype=np.int64)
      owners = [a for a in carried if (x.ids[a] >= 0).any() and not _is_batch(fl, x.ids[a])]
      if len(owners) > 1:
        for a in owners:  # two channel axes into one: no per-position channel
          fl.freeze(x.ids[a])
        owners = []
      if owners:
        a = owners[0]
        merged = x.ids[a][grid[s_axes.index(a)]]
      ids[real_d[0]] = merged
    else:
      # A channel axis split into several axes: it can't be followed; keep it.
      for a in carried:
        fl.freeze(x.ids[a])
  return _out(ids, ins, index_of=x.index_of)


def _reshape_blocks(src, dst):
  """Pairs (source axes, dest axes) of contiguous blocks with equal products."""
  blocks, i, j = [], 0, 0
  while i < len(src) or j < len(dst):
    si, dj = [i] if i < len(src) else [], [j] if j < len(dst) else []
    ps = src[i] if i < len(src) else 1
    pd = dst[j] if j < len(dst) else 1
    i, j = i + bool(si), j + bool(dj)
    while ps != pd:
      if ps < pd:
        si.append(i)
        ps *= src[i]
        i += 1
      else:
        dj.append(j)
        pd *= dst[j]
        j += 1
    # absorb trailing size-1 axes into the current block
    while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
      si.append(i)
      i += 1
    while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
      dj.append(j)
      j += 1
    blocks.append((si, dj))
  return blocks


def slice_(fl, eqn, ins, path) -> Value:
  x = ins[0]
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(starts)
  shape = _shape(eqn.invars[0])
  ids = {a: x.ids[a][starts[a] : limits[a] : strides[a]] for a in x.ids}
  for a in x.ids:
    if (starts[a], limits[a], strides[a]) != (0, shape[a], 1):
      # Static bounds cannot follow a slimmed channel axis (the slimmed network
      # would slice other channels), so a sliced axis keeps its channels.
      fl.freeze(x.ids[a])
  return _out(ids, ins[:1])


def pad(fl, eqn, ins, path) -> Value:
  x = ins[0]
  ids = {}
  fill = S_EMPTY if ins[1].zero else S_ALWAYS
  for a, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
    if a not in x.ids:
      continue
    cur = x.ids[a]
    if interior:
      spread = np.full(cur.size + (cur.size - 1) * interior, NONE, dtype=np.int64)
      spread[:: interior + 1] = cur
      cur = spread
    lo, hi = int(lo), int(hi)
    if _is_batch(fl, x.ids[a]) or not (cur >= 0).any():
      pieces = [np.full(max(lo, 0), NONE), cur[max(-lo, 0) : cur.size - max(-hi, 0)], np.full(max(hi, 0), NONE)]
    else:
      # Static pad widths cannot follow a slimmed channel axis: the channels
      # that face the padding (fresh frozen ids) are kept.
      plo, phi = fl.fresh(max(lo, 0), fill), fl.fresh(max(hi, 0), fill)
      fl.freeze(plo)
      fl.freeze(phi)
      pieces = [plo, cur[max(-lo, 0) : cur.size - max(-hi, 0)], phi]
    ids[a] = np.concatenate([p.astype(np.int64) for p in pieces])
  return _out(ids, ins[:1], zero=x.zero and ins[1].zero)


def concatenate(fl, eqn, ins, path) -> Value:
  dim = eqn.params["dimension"]
  out_shape = _shape(eqn.outvars[0])
  ids = {}
  for a in range(len(out_shape)):
    if a == dim:
      parts = []
      for x, v in zip(ins, eqn.invars):
        n = _shape(v)[a]
        if a in x.ids:
          i = x.ids[a]
          if x.zero and not x.act and (i >= 0).any():
            # A known-zero block of channels (the bundled option-A shortcut's
            # zero padding): alive nowhere until a branch writes them.
            i = fl.relabel(i, S_EMPTY)
          parts.append(i)
        else:  # a constant block with a static width: nothing to prune there
          parts.append(np.full(n, NONE, dtype=np.int64))
      cat = np.concatenate(parts)
      ids[a] = cat if (cat >= 0).any() else None
    else:
      ids[a] = _merge_axis(fl, [x.ids.get(a) for x in ins])
  return _out(ids, ins)


def split(fl, eqn, ins, path) -> list[Value]:
  x, axis = ins[0], eqn.params["axis"]
  if axis in x.ids:  # static split sizes cannot follow a slimmed axis (see slice_)
    fl.freeze(x.ids[axis])
  outs, start = [], 0
  for n in eqn.params["sizes"]:
    ids = dict(x.ids)
    if axis in ids:
      ids[axis] = ids[axis][start : start + n]
    outs.append(_out(ids, ins))
    start += n
  return outs


def rev(fl, eqn, ins, path) -> Value:
  ids = dict(ins[0].ids)
  for a in eqn.params["dimensions"]:
    if a in ids:
      ids[a] = ids[a][::-1]
  return _out(ids, ins)


def reduce_(fl, eqn, ins, path) -> Value:
  x = ins[0]
  axes = set(eqn.params["axes"])
  # Reducing across channels (a mean/max over features) changes meaning when a
  # channel is removed, so those channels are kept.
  _freeze_axes(fl, x, axes)
  keep = [a for a in range(len(_shape(eqn.invars[0]))) if a not in axes]
  out = _out({i: x.ids.get(a) for i, a in enumerate(keep)}, ins[:1])
  if x.act:
    fl.ops.append(_elementwise_op(fl, "reduce", eqn, x, _shape(eqn.invars[0])))
  return out


def cumulative(fl, eqn, ins, path) -> Value:
  _freeze_axes(fl, ins[0], [eqn.params["axis"]])
  return _out(dict(ins[0].ids), ins)


def reduce_window(fl, eqn, ins, path) -> Value:
  x = ins[0]
  win, strides = eqn.params["window_dimensions"], eqn.params["window_strides"]
  padding = eqn.params["padding"]
  ids = {}
  for a in x.ids:
    if win[a] == 1 and strides[a] == 1 and tuple(padding[a]) == (0, 0):
      ids[a] = x.ids[a]
    else:
      fl.freeze(x.ids[a])
  out = _out(ids, ins[:1])
  if x.act:
    op = _elementwise_op(fl, "reduce", eqn, out, _shape(eqn.outvars[0]))
    fl.ops.append(dataclasses.replace(op, coef=op.coef * math.prod(win)))
  return out


def _producer(fl: ChannelFlow, out_ids: np.ndarray, name: str, **where) -> tuple[np.ndarray, int]:
  """Fresh output channel ids of a conv/dense, tied to its weight's, and its token."""
  leaf = fl.leaf_of(int(out_ids[out_ids >= 0][0])) if (out_ids >= 0).any() else None
  fl.tokens.append(Token(leaf, out_ids, name, **where))
  t = len(fl.tokens) - 1
  new = fl.fresh(out_ids.size, fl._intern(frozenset({t})))
  fl.tie(out_ids, new)
  return new, t


def conv(fl, eqn, ins, path) -> Value:
  lhs, rhs = ins[0], ins[1]
  dn = eqn.params["dimension_numbers"]
  lb, lf, *lsp = dn.lhs_spec
  ro, ri, *rsp = dn.rhs_spec
  ob, of, *osp = dn.out_spec
  if eqn.params["batch_group_count"] != 1:
    raise UnsupportedPrimitiveError(f"conv with batch_group_count at {fl.where(eqn)}")
  g = eqn.params["feature_group_count"]
  rshape, oshape = _shape(eqn.invars[1]), _shape(eqn.outvars[0])
  cin_g, cout = rshape[ri], rshape[ro]
  cout_g = cout // g
  lhs_f = lhs.ids.get(lf)
  rhs_in, rhs_out = rhs.ids.get(ri), rhs.ids.get(ro)
  if rhs_out is None:
    rhs_out = np.full(cout, NONE, dtype=np.int64)
  if lhs_f is not None:
    if cin_g == 1 and g > 1:
      # Depthwise: input channel c feeds exactly the outputs of group c.
      fl.tie(np.repeat(lhs_f, cout_g), rhs_out)
    elif rhs_in is not None:
      fl.tie(lhs_f, np.tile(rhs_in, g))
      if lhs.act:
        fl.consumers.append((rhs_in, lhs_f[:cin_g], lhs.index_event))
  if g > 1 and cout_g > 1 and cin_g > 1:
    # Grouped: every group must keep the same number of outputs.
    blocks = rhs_out.reshape(g, cout_g)
    for k in range(1, g):
      fl.tie(blocks[0], blocks[k])
  name = _leaf_name(fl, rhs, ro)
  out_ids, origin = rhs_out, frozenset()
  if lhs.act and not rhs.act and (rhs_out >= 0).any():
    lshape = _shape(eqn.invars[0])
    out_ids, t = _producer(
      fl,
      rhs_out,
      name,
      path=path,
      operand=0,
      in_axis=lf,
      spatial=tuple(lsp),
      c_in=int(lshape[lf]),
      first=not lhs.origin,
    )
    origin = frozenset({t})
  ids = {of: out_ids}
  if lb in lhs.ids:
    ids[ob] = lhs.ids[lb]
  out = _out(ids, ins)
  if origin:
    out.origin = origin
  if lhs.act and lhs_f is not None:
    fl.sites.append(
      MaskSite(
        path,
        0,
        lf,
        lhs_f,
        lhs.index_event,
        len(lhs.origin) == 1,
        next(iter(lhs.origin)) if len(lhs.origin) == 1 else None,
      )
    )
  if lhs.act:
    spatial = math.prod(oshape[a] for a in osp) * math.prod(rshape[a] for a in rsp)
    if cin_g == 1 and g > 1:
      factors = (out_ids,)  # depthwise: in and out are the same channels
      fl.ops.append(Op("conv", name, float(spatial), factors, 1))
    else:
      fin = lhs_f if lhs_f is not None else np.full(cin_g * g, NONE, dtype=np.int64)
      fl.ops.append(Op("conv", name, float(spatial), (fin, out_ids), g, lhs.index_event))
    fl.ops.append(Op("volume", name, float(math.prod(oshape[a] for a in osp)), (out_ids,)))
  return out


def _leaf_name(fl: ChannelFlow, x: Value, axis: int) -> str:
  ids = x.ids.get(axis)
  if ids is not None and ids.size and int(ids[0]) in fl._weight_names:
    return fl._weight_names[int(ids[0])]
  return "?"


def dot_general(fl, eqn, ins, path) -> Value:
  lhs, rhs = ins
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ls, rs = _shape(eqn.invars[0]), _shape(eqn.invars[1])
  for a, b in zip(lc, rc):
    fl.tie(*_pair(lhs.ids.get(a), rhs.ids.get(b)))
  out_ids = []
  for a, b in zip(lb, rb):
    out_ids.append(_merge_axis(fl, [lhs.ids.get(a), rhs.ids.get(b)]))
  lfree = [a for a in range(len(ls)) if a not in lc and a not in lb]
  rfree = [b for b in range(len(rs)) if b not in rc and b not in rb]
  out_ids += [lhs.ids.get(a) for a in lfree] + [rhs.ids.get(b) for b in rfree]
  act_side = 0 if lhs.act else (1 if rhs.act else None)
  origin = frozenset()
  if act_side is not None and not (lhs.act and rhs.act):
    # The weight's free axes are the layer's outputs: fresh ids, one producer.
    # Outputs are laid out (batch dims, lhs free, rhs free).
    if act_side == 0:
      x, cdims, w, wc, wfree, start = lhs, lc, rhs, rc, rfree, len(lb) + len(lfree)
    else:
      x, cdims, w, wc, wfree, start = rhs, rc, lhs, lc, lfree, len(lb)
    name = _leaf_name(fl, w, wc[0]) if wc else "?"
    for k, b in enumerate(wfree):
      ids = out_ids[start + k]
      if ids is not None and (ids >= 0).any():
        if name == "?":
          name = _leaf_name(fl, w, b)
        xs = _shape(eqn.invars[act_side])
        spatial = tuple(a for a in range(len(xs)) if a not in cdims and a != 0)
        out_ids[start + k], t = _producer(
          fl,
          ids,
          name,
          path=path,
          operand=act_side,
          in_axis=cdims[0] if cdims else -1,
          spatial=spatial,
          c_in=int(math.prod(xs[a] for a in cdims)),
          op="dense",
          first=not x.origin,
        )
        origin = origin | {t}
    for a, b in zip(cdims, wc):
      wi = w.ids.get(b)
      if a in x.ids and wi is not None:
        fl.consumers.append((wi, x.ids[a], x.index_event))
  out = _out(dict(enumerate(out_ids)), ins)
  if origin:
    out.origin = origin
  if act_side is not None:
    x, cdims = (lhs, lc) if act_side == 0 else (rhs, rc)
    for a in cdims:
      if a in x.ids:
        fl.sites.append(
          MaskSite(
            path,
            act_side,
            a,
            x.ids[a],
            x.index_event,
            len(x.origin) == 1,
            next(iter(x.origin)) if len(x.origin) == 1 else None,
          )
        )
    w, wc = (rhs, rc) if act_side == 0 else (lhs, lc)
    coef, factors = 1.0, []
    # per-sample MACs = prod over contracting axes and both operands' free
    # axes, the batch axis excluded
    for a, n in list(zip(lc, [ls[a] for a in lc])):
      ids = lhs.ids.get(a)
      if ids is None:
        ids = rhs.ids.get(rc[lc.index(a)])
      coef, factors = _factor(fl, ids, n, coef, factors)
    nb = len(lb)
    for k, a in enumerate(lfree):
      coef, factors = _factor(fl, out.ids.get(nb + k), ls[a], coef, factors)
    for k, b in enumerate(rfree):
      coef, factors = _factor(fl, out.ids.get(nb + len(lfree) + k), rs[b], coef, factors)
    for a in lb:
      coef, factors = _factor(fl, lhs.ids.get(a), ls[a], coef, factors)
    name = _leaf_name(fl, w, wc[0]) if wc else "?"
    if name == "?" and not w.act:
      for b in rfree if act_side == 0 else lfree:
        name = _leaf_name(fl, w, b)
    fl.ops.append(Op("dense", name, coef, tuple(factors), 1, x.index_event if act_side is not None else None))
    vcoef, vfactors = 1.0, []
    for i, n in enumerate(_shape(eqn.outvars[0])):
      vcoef, vfactors = _factor(fl, out.ids.get(i), n, vcoef, vfactors)
    fl.ops.append(Op("volume", name, vcoef, tuple(vfactors)))
  return out


def _factor(fl, ids, n, coef, factors):
  if ids is not None and _is_batch(fl, ids):
    return coef, factors
  if ids is not None and (ids >= 0).any():
    return coef, factors + [ids]
  return coef * n, factors


def _pair(a, b):
  if a is None or b is None:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  return a, b


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
    merged.append(_out({a: _merge_axis(fl, [o.ids.get(a) for o in outs]) for a in axes}, list(outs) + [ins[0]]))
  return merged


def scan(fl, eqn, ins, path):
  p = eqn.params
  nc, ncar = p["num_consts"], p["num_carry"]
  consts, carry, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
  xs_body = [_out({a - 1: i for a, i in x.ids.items() if a > 0}, [x]) for x in xs]
  body = p["jaxpr"]
  outs = fl.run(body.jaxpr, [Value({}, False)] * len(body.consts), list(consts) + list(carry) + xs_body, path + (-1,))
  carry_out, ys = outs[:ncar], outs[ncar:]
  res = []
  for cin, cout in zip(carry, carry_out):
    axes = set(cin.ids) | set(cout.ids)
    res.append(_out({a: _merge_axis(fl, [cin.ids.get(a), cout.ids.get(a)]) for a in axes}, [cin, cout]))
  for y in ys:
    res.append(_out({a + 1: i for a, i in y.ids.items()}, [y]))
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
  return fl._unknown(eqn, ins)


def _no_channels(fl, eqn, ins, path):
  outs = [_out({}, ins, zero=False) for _ in eqn.outvars]
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
    "optimization_barrier": lambda fl, eqn, ins, path: [_out(dict(x.ids), [x]) for x in ins],
  }
)
