"""What keeps each channel of a traced network, as `Expr`s: the connected components
of a channel flow (`components`), the `Resolver` that turns channel ids into channel,
branch and union entries, the exprs of weight axes (`leaf_expr`, `Consumers`) that
`trace` builds a graph from, and `site_exprs`, the places where `masked` and `gated`
multiply a re-analysed network by its masks."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jaxprune.channel_flow import ALWAYS, ChannelFlow
from jaxprune.graph import FIRST, ONE, ZERO, ChannelGraph, Expr, pad_expr


def components(fl: ChannelFlow, chains: bool = False) -> np.ndarray:
  """Label of the connected component of every id under the recorded ties
  (`chains=True`: without the ties made where different producers meet)."""
  n = fl.num_ids
  ties = [t for t, j in zip(fl.ties, fl.join) if not (chains and j)]
  if ties:
    a = np.concatenate([t[0] for t in ties])
    b = np.concatenate([t[1] for t in ties])
  else:
    a = b = np.zeros(0, np.int64)
  adj = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
  return connected_components(adj, directed=False)[1]


class Resolver:
  """Turns channel ids into `Expr`s: channel entries from components, union
  entries from liveness sets, one branch entry per (eligible token, channel)."""

  def __init__(
    self,
    fl: ChannelFlow,
    label: np.ndarray,
    flat_of_comp: np.ndarray,
    branch: dict[int, tuple[int, dict[int, int]]] | None,
  ):
    self.fl, self.label, self.flat_of_comp = fl, label, flat_of_comp
    self.branch = branch  # token -> (offset, component -> position); None: no branches
    self._lookup: dict[int, np.ndarray] = {}

  def channel(self, ids: np.ndarray) -> np.ndarray:
    lab = np.where(ids >= 0, self.label[np.maximum(ids, 0)], -1)
    return self.flat_of_comp[lab].astype(np.int32)

  def entry(self, t: int, comps: np.ndarray) -> np.ndarray:
    """Branch entry of token t per component (-1: not one of its channels)."""
    if t not in self._lookup:
      off, pos = self.branch[t]
      table = np.full(self.label.max() + 2 if self.label.size else 1, -1, np.int64)
      table[np.fromiter(pos.keys(), np.int64, len(pos))] = off + np.fromiter(pos.values(), np.int64, len(pos))
      self._lookup[t] = table
    return self._lookup[t][comps]

  def expr(self, ids: np.ndarray, empty_alive: bool = False) -> Expr:
    """What keeps each id's channel. A known-zero channel is alive nowhere, unless
    `empty_alive` (a consumer that reads its input at full width: it is kept)."""
    ch = self.channel(ids)
    if not self.branch:
      return Expr.of([ch])
    fl = self.fl
    comps = np.where(ids >= 0, self.label[np.maximum(ids, 0)], -1)
    sids = fl.live(ids)
    n = ids.size
    extra = np.full(n, ONE, np.int32)  # one more product factor per place
    unions: list[tuple[np.ndarray, np.ndarray]] = []  # (places, entries (T, w))
    for sid in np.unique(sids).tolist():
      where = np.nonzero(sids == sid)[0]
      tokens = fl.set_of(sid)
      if ALWAYS in tokens or any(t not in self.branch for t in tokens):
        continue
      if not tokens:
        if not empty_alive:
          extra[where] = ZERO  # known zero here: alive nowhere
        continue
      ents = np.stack([self.entry(t, comps[where]) for t in sorted(tokens)])  # (T, w)
      ok = (ents >= 0).all(0)  # a token that does not carry a channel: keep it alive
      where, ents = where[ok], ents[:, ok]
      if ents.shape[0] == 1:
        extra[where] = ents[0]
      elif where.size:
        unions.append((where, ents))
    prod = [ch] + ([extra] if (extra != ONE).any() else [])
    l = max((e.shape[0] for _, e in unions), default=0)
    union = np.full((l, n), ZERO, np.int32)
    if l:
      union[0] = ONE  # no union at this place: factor 1
      for where, ents in unions:
        union[:, where] = ZERO
        union[: ents.shape[0], where] = ents
    return Expr(np.stack(prod).astype(np.int32), union)


def merge_exprs(exprs: list[Expr]) -> Expr:
  """Concatenate place-wise."""
  k = max(e.prod.shape[0] for e in exprs)
  l = max(e.union.shape[0] for e in exprs)
  padded = [pad_expr(e, k, l) for e in exprs]
  return Expr(np.concatenate([e.prod for e in padded], 1), np.concatenate([e.union for e in padded], 1))


class Consumers:
  """Weight input axes and the expr of the input they read, place by place."""

  def __init__(self, resolver: Resolver, consumers, gathers: set):
    ids, exprs = [], []
    seen: set[int] = set()
    for w_ids, x_ids, event in consumers:
      keep = np.array([i >= 0 and i not in seen for i in w_ids.tolist()], bool)
      if not keep.any():
        continue
      seen.update(w_ids[keep].tolist())
      ids.append(w_ids[keep])
      exprs.append(resolver.expr(x_ids, empty_alive=event not in gathers)[keep])
    self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    self.expr = merge_exprs(exprs) if exprs else None
    order = np.argsort(self.ids)
    self.sorted_ids, self.order = self.ids[order], order

  def find(self, ids: np.ndarray) -> np.ndarray:
    """Column of each id in `self.expr`, -1 if not a consumer's weight."""
    if not self.ids.size:
      return np.full(ids.size, -1)
    k = np.clip(np.searchsorted(self.sorted_ids, ids), 0, self.ids.size - 1)
    return np.where(self.sorted_ids[k] == ids, self.order[k], -1)


def leaf_expr(resolver: Resolver, ids, chain_label, chain_token, consumers: Consumers) -> Expr:
  """What keeps each position of a leaf axis: a consumer's input axis what keeps
  its input; a producer chain's position also its branch; else its channel."""
  e = Expr.of([resolver.channel(ids)])
  if chain_label is not None:
    br = np.full(ids.size, ONE, np.int32)
    toks = np.where(ids >= 0, chain_token[chain_label[np.maximum(ids, 0)]], -1)
    for t in np.unique(toks[toks >= 0]).tolist():
      sel = np.nonzero(toks == t)[0]
      ent = resolver.entry(t, resolver.label[ids[sel]])
      br[sel[ent >= 0]] = ent[ent >= 0]
    if (br != ONE).any():
      e = Expr.of([e.prod[0], br])
  col = consumers.find(ids)
  if (col >= 0).any():
    ce = consumers.expr
    k, l = max(e.prod.shape[0], ce.prod.shape[0]), max(e.union.shape[0], ce.union.shape[0])
    e, ce = pad_expr(e, k, l), pad_expr(ce, k, l)
    sel = col >= 0
    prod, union = e.prod.copy(), e.union.copy()
    prod[:, sel] = ce.prod[:, col[sel]]
    union[:, sel] = ce.union[:, col[sel]]
    e = Expr(prod, union)
  return e


def site_exprs(graph: ChannelGraph, fl: ChannelFlow, leaf_vals) -> dict:
  """{(path, operand): (axis, Expr)} of a re-analysis of the traced network (e.g. in
  training mode): conv/dense inputs and, with branch groups, residual-sum operands.

  Channels are matched through the variables they touch, branches through
  their producer's weight leaf. A branch mask scales its producer's output once:
  at the residual-sum operand and where a layer reads that output before the
  sum (a stem's first block). A stream channel that no producer keeps is then
  zero by itself, so consumers multiply by their channel masks alone (the
  union is what `cost` counts; here soft masks would otherwise scale twice).
  """
  if len(leaf_vals) != len(graph.leaf_shapes):
    raise ValueError(
      f"variables have {len(leaf_vals)} leaves but the graph was traced with "
      f"{len(graph.leaf_shapes)}; pass the same variables structure."
    )
  label = components(fl)
  flat_of_comp = np.zeros(int(label.max()) + 2 if label.size else 1, np.int64)
  skip = {il.leaf for il in graph.index_leaves}
  for li, (v, axes, name) in enumerate(zip(leaf_vals, graph.leaf_axes, graph.leaf_names)):
    if li in skip:
      continue
    for ax, e in axes.items():
      ids = v.ids[ax]
      if ids.size != e.size:
        raise ValueError(
          f"leaf {name} axis {ax} has size {ids.size}, traced as {e.size}; "
          "masked() runs the unslimmed network (trace the slimmed one anew)."
        )
      ch = e.channel
      flat_of_comp[label[ids[ch >= FIRST]]] = ch[ch >= FIRST]
  branch = None
  if graph.branches:
    by_leaf = {leaf: name for name, leaf in graph.branches}
    offsets = graph.offsets
    branch = {}
    for s in fl.branch_sites:
      tok = fl.tokens[s.token]
      name = by_leaf.get(tok.leaf)
      if name is None or s.token in branch:
        continue
      if graph.group(name).size != s.ids.size:
        continue
      comps = label[s.ids]
      branch[s.token] = (offsets[name], {int(c): k for k, c in enumerate(comps)})
  resolver = Resolver(fl, label, flat_of_comp, branch)
  out = {}
  for s in fl.sites:
    rows = [resolver.channel(s.ids)]
    if branch and s.token in branch:
      rows.append(resolver.entry(s.token, label[s.ids]).astype(np.int32))
      rows[-1] = np.where(rows[-1] >= 0, rows[-1], ONE).astype(np.int32)
    e = Expr.of(rows)
    if (e.prod[0] >= FIRST).any() or (e.prod[1:] != ONE).any():
      out[(s.path, s.operand)] = (s.axis, e)
  for s in fl.branch_sites:
    if branch and s.token in branch:
      off, pos = branch[s.token]
      ent = np.array([off + pos[int(c)] for c in label[s.ids]], np.int32)
      out[(s.path, s.operand)] = (s.axis, Expr.of([ent]))
  return out


__all__ = ["Consumers", "Resolver", "components", "leaf_expr", "merge_exprs", "pad_expr", "site_exprs"]
