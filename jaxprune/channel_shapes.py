"""Rules of `channel_flow` for the ops that move, cut or reduce axes (broadcast,
reshape, transpose, slice, pad, concatenate, reductions, pooling): channel ids
follow their axes, and what an op cannot keep apart is tied or frozen.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxprune.channel_flow import (
  NONE,
  S_ALWAYS,
  S_EMPTY,
  UnsupportedPrimitiveError,
  Value,
  elementwise_op,
  freeze_axes,
  is_batch,
  merge_axis,
  out_value,
  shape_of,
)


def unary_passthrough(fl, eqn, ins, path) -> Value:
  out = out_value(dict(ins[0].ids), ins, index_of=ins[0].index_of)
  out.index_event = ins[0].index_event
  return out


def broadcast_in_dim(fl, eqn, ins, path) -> Value:
  x = ins[0]
  in_shape = shape_of(eqn.invars[0])
  out_shape = eqn.params["shape"]
  ids = {}
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    if i in x.ids and in_shape[i] == out_shape[d]:
      ids[d] = x.ids[i]
  return out_value(ids, ins[:1], index_of=x.index_of)


def transpose(fl, eqn, ins, path) -> Value:
  perm = eqn.params["permutation"]
  return out_value({i: ins[0].ids.get(p) for i, p in enumerate(perm)}, ins, index_of=ins[0].index_of)


def squeeze(fl, eqn, ins, path) -> Value:
  dims = set(d % len(shape_of(eqn.invars[0])) for d in eqn.params["dimensions"])
  keep = [a for a in range(len(shape_of(eqn.invars[0]))) if a not in dims]
  return out_value({i: ins[0].ids.get(a) for i, a in enumerate(keep)}, ins, index_of=ins[0].index_of)


def reshape(fl, eqn, ins, path) -> Value:
  x = ins[0]
  src, dst = shape_of(eqn.invars[0]), tuple(eqn.params["new_sizes"])
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
      owners = [a for a in carried if (x.ids[a] >= 0).any() and not is_batch(fl, x.ids[a])]
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
  return out_value(ids, ins, index_of=x.index_of)


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
  shape = shape_of(eqn.invars[0])
  ids = {a: x.ids[a][starts[a] : limits[a] : strides[a]] for a in x.ids}
  for a in x.ids:
    if (starts[a], limits[a], strides[a]) != (0, shape[a], 1):
      # Static bounds cannot follow a slimmed channel axis (the slimmed network
      # would slice other channels), so a sliced axis keeps its channels.
      fl.freeze(x.ids[a])
  return out_value(ids, ins[:1])


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
    if is_batch(fl, x.ids[a]) or not (cur >= 0).any():
      pieces = [np.full(max(lo, 0), NONE), cur[max(-lo, 0) : cur.size - max(-hi, 0)], np.full(max(hi, 0), NONE)]
    else:
      # Static pad widths cannot follow a slimmed channel axis: the channels
      # that face the padding (fresh frozen ids) are kept.
      plo, phi = fl.fresh(max(lo, 0), fill), fl.fresh(max(hi, 0), fill)
      fl.freeze(plo)
      fl.freeze(phi)
      pieces = [plo, cur[max(-lo, 0) : cur.size - max(-hi, 0)], phi]
    ids[a] = np.concatenate([p.astype(np.int64) for p in pieces])
  return out_value(ids, ins[:1], zero=x.zero and ins[1].zero)


def concatenate(fl, eqn, ins, path) -> Value:
  dim = eqn.params["dimension"]
  out_shape = shape_of(eqn.outvars[0])
  ids = {}
  for a in range(len(out_shape)):
    if a == dim:
      parts = []
      for x, v in zip(ins, eqn.invars):
        n = shape_of(v)[a]
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
      ids[a] = merge_axis(fl, [x.ids.get(a) for x in ins])
  return out_value(ids, ins)


def split(fl, eqn, ins, path) -> list[Value]:
  x, axis = ins[0], eqn.params["axis"]
  if axis in x.ids:  # static split sizes cannot follow a slimmed axis (see slice_)
    fl.freeze(x.ids[axis])
  outs, start = [], 0
  for n in eqn.params["sizes"]:
    ids = dict(x.ids)
    if axis in ids:
      ids[axis] = ids[axis][start : start + n]
    outs.append(out_value(ids, ins))
    start += n
  return outs


def rev(fl, eqn, ins, path) -> Value:
  ids = dict(ins[0].ids)
  for a in eqn.params["dimensions"]:
    if a in ids:
      ids[a] = ids[a][::-1]
  return out_value(ids, ins)


def reduce_(fl, eqn, ins, path) -> Value:
  x = ins[0]
  axes = set(eqn.params["axes"])
  # Reducing across channels (a mean/max over features) changes meaning when a
  # channel is removed, so those channels are kept.
  freeze_axes(fl, x, axes)
  keep = [a for a in range(len(shape_of(eqn.invars[0]))) if a not in axes]
  out = out_value({i: x.ids.get(a) for i, a in enumerate(keep)}, ins[:1])
  if x.act:
    fl.ops.append(elementwise_op(fl, "reduce", eqn, x, shape_of(eqn.invars[0])))
  return out


def cumulative(fl, eqn, ins, path) -> Value:
  freeze_axes(fl, ins[0], [eqn.params["axis"]])
  return out_value(dict(ins[0].ids), ins)


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
  out = out_value(ids, ins[:1])
  if x.act:
    op = elementwise_op(fl, "reduce", eqn, out, shape_of(eqn.outvars[0]))
    fl.ops.append(dataclasses.replace(op, coef=op.coef * math.prod(win)))
  return out
