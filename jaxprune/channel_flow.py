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

This module holds the interpreter's state and the helpers its rules share; the
rules are in `channel_rules` (elementwise ops, control flow and the table of
rules), `channel_shapes` (ops that move axes) and `channel_producers` (conv and
dense, the ops that make new channels).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Mapping, Sequence

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

  def __init__(self, rules: Mapping[str, Callable]):
    self.rules = rules  # primitive name -> rule(flow, eqn, ins, path) (channel_rules.RULES)
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

  def intern_set(self, s: frozenset) -> int:
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
    out = np.array([self.intern_set(frozenset().union(*(self._sets[s] for s in col))) for col in uniq.T], np.int32)
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
      rule = self.rules.get(eqn.primitive.name)
      if rule is None:
        outs = self.unknown(eqn, ins)
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

  def unknown(self, eqn, ins: list[Value]):
    if any(self.carries_channels(x) for x in ins):
      raise UnsupportedPrimitiveError(
        f"jaxprune.trace: primitive '{eqn.primitive.name}' at {self.where(eqn)} "
        "acts on a value that carries prunable channels, and its channel "
        "semantics are unknown. Rewrite that part with supported ops "
        "(conv, dot_general, elementwise, reshape, pad, concatenate, ...), "
        "or keep it outside the traced function."
      )
    outs = [out_value({}, ins) for _ in eqn.outvars]
    return outs if eqn.primitive.multiple_results else outs[0]


# ---------------------------------------------------------------------------
# helpers shared by the rules


def shape_of(v) -> tuple[int, ...]:
  return tuple(v.aval.shape)


def merge_axis(fl: ChannelFlow, ids_list: list[np.ndarray | None], join: bool = False) -> np.ndarray | None:
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


def out_value(
  ids: dict[int, np.ndarray | None], ins: list[Value], *, zero: bool | None = None, index_of: int | None = None
) -> Value:
  """An output value: activation and origin from the inputs."""
  act = any(x.act for x in ins)
  origin = frozenset().union(*(x.origin for x in ins if x.act)) if act else frozenset()
  if zero is None:
    zero = bool(ins) and all(x.zero for x in ins)
  return Value({a: i for a, i in ids.items() if i is not None}, act, origin, zero, index_of)


def freeze_axes(fl: ChannelFlow, x: Value, axes) -> None:
  for a in axes:
    if a in x.ids:
      fl.freeze(x.ids[a])


def is_batch(fl: ChannelFlow, ids: np.ndarray) -> bool:
  return any(ids.size == b.size and ids[0] == b[0] for b in fl.batch_ids)


def channel_axis(fl: ChannelFlow, x: Value) -> int | None:
  """The one axis of an activation that carries channels of the variables."""
  axes = [a for a, ids in x.ids.items() if not is_batch(fl, ids) and (ids >= fl.arg_id_end).any()]
  return axes[0] if len(axes) == 1 else None


def elementwise_op(fl: ChannelFlow, kind: str, eqn, x: Value, shape) -> Op:
  coef, factors = 1.0, []
  for a, n in enumerate(shape):
    ids = x.ids.get(a)
    if ids is not None and a == 0 and is_batch(fl, ids):
      continue
    if ids is not None and (ids >= 0).any():
      factors.append(ids)
    else:
      coef *= n
  return Op(kind, eqn.primitive.name, coef, tuple(factors))
