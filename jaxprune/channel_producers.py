"""Rules of `channel_flow` for conv and dense (`conv_general_dilated`,
`dot_general`): the ops whose outputs are new channels, tied to the weight's
output axis. They record the mask sites, the MAC/volume cost ops and, for
branch units, each producer's token.
"""

from __future__ import annotations

import math

import numpy as np

from jaxprune.channel_flow import (
  NONE,
  ChannelFlow,
  MaskSite,
  Op,
  Token,
  UnsupportedPrimitiveError,
  Value,
  is_batch,
  merge_axis,
  out_value,
  shape_of,
)


def _producer(fl: ChannelFlow, out_ids: np.ndarray, name: str, **where) -> tuple[np.ndarray, int]:
  """Fresh output channel ids of a conv/dense, tied to its weight's, and its token."""
  leaf = fl.leaf_of(int(out_ids[out_ids >= 0][0])) if (out_ids >= 0).any() else None
  fl.tokens.append(Token(leaf, out_ids, name, **where))
  t = len(fl.tokens) - 1
  new = fl.fresh(out_ids.size, fl.intern_set(frozenset({t})))
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
  rshape, oshape = shape_of(eqn.invars[1]), shape_of(eqn.outvars[0])
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
    lshape = shape_of(eqn.invars[0])
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
  out = out_value(ids, ins)
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
  ls, rs = shape_of(eqn.invars[0]), shape_of(eqn.invars[1])
  for a, b in zip(lc, rc):
    fl.tie(*_pair(lhs.ids.get(a), rhs.ids.get(b)))
  out_ids = []
  for a, b in zip(lb, rb):
    out_ids.append(merge_axis(fl, [lhs.ids.get(a), rhs.ids.get(b)]))
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
        xs = shape_of(eqn.invars[act_side])
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
  out = out_value(dict(enumerate(out_ids)), ins)
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
    for i, n in enumerate(shape_of(eqn.outvars[0])):
      vcoef, vfactors = _factor(fl, out.ids.get(i), n, vcoef, vfactors)
    fl.ops.append(Op("volume", name, vcoef, tuple(vfactors)))
  return out


def _factor(fl, ids, n, coef, factors):
  if ids is not None and is_batch(fl, ids):
    return coef, factors
  if ids is not None and (ids >= 0).any():
    return coef, factors + [ids]
  return coef * n, factors


def _pair(a, b):
  if a is None or b is None:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  return a, b
