"""`trace`: channel (and residual-branch) groups of any function of (variables, *inputs)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.channel_exprs import Consumers, Resolver, components, leaf_expr
from jaxprune.channel_flow import NONE, ChannelFlow, Value
from jaxprune.channel_rules import RULES
from jaxprune.graph import FIRST, ONE, ChannelGraph, Expr, Group, IndexLeaf, Member, Physical, Term

COLLECTIONS = ("params", "batch_stats", "other")


def leaf_name(path) -> str:
  """'layer1.0.conv1.kernel' from a key path (an NNX Variable's '.value' dropped)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  if len(parts) > 1 and parts[-1] == "value":
    parts = parts[:-1]
  return ".".join(parts)


def _is_collections(variables) -> bool:
  """The NNX layout of `jaxprune.functional`: {"params", "batch_stats", "other"}."""
  return isinstance(variables, dict) and "params" in variables and set(variables) <= set(COLLECTIONS)


def leaf_names(variables) -> tuple[str, ...]:
  """Dotted names of the leaves; in the collections layout without the collection
  ('layer1.0.conv1.kernel', not 'params.layer1.0.conv1.kernel')."""
  names = [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  if _is_collections(variables):
    names = [n.split(".", 1)[1] if "." in n else n for n in names]
  return tuple(names)


def _param_flags(variables, n: int) -> list[bool]:
  """Which leaves count as parameters: in a dict with a "params" entry (the
  collections layout of `jaxprune.functional` and jaxprune.training, or
  Linen's), the leaves under it; otherwise every leaf."""
  if isinstance(variables, dict) and "params" in variables:
    return [leaf_name(p).split(".", 1)[0] == "params" for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  return [True] * n


def _is_int(x) -> bool:
  return jnp.issubdtype(getattr(x, "dtype", np.float32), jnp.integer)


def analyze(fn: Callable, variables, args: tuple):
  """Run the channel rules over `fn(variables, *args)`.

  Returns the flow, the leaf values, the output values, the closed jaxpr and
  the output tree structure.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(variables, *args)
  leaves = jax.tree_util.tree_leaves(variables)
  arg_leaves = jax.tree_util.tree_leaves(args)
  fl = ChannelFlow(RULES)
  arg_vals = []
  for a in arg_leaves:
    v = fl.fresh_value(np.shape(a), act=True)
    if np.ndim(a):
      fl.batch_ids.append(v.ids[0])
    for ids in v.ids.values():
      fl.freeze(ids)
    arg_vals.append(v)
  fl.arg_id_end = fl.num_ids
  leaf_vals = []
  for li, x in enumerate(leaves):
    v = fl.fresh_value(np.shape(x), act=False)
    if _is_int(x) and np.ndim(x) == 1:
      v.index_of = li  # may hold channel positions (see IndexLeaf)
    fl.add_leaf(li, list(v.ids.values()))
    leaf_vals.append(v)
  for name, v in zip(leaf_names(variables), leaf_vals):
    for ids in v.ids.values():
      fl.name_ids(ids, name)
  consts = [Value({}, False) for _ in closed.consts]
  outs = fl.run(closed.jaxpr, consts, leaf_vals + arg_vals)
  return fl, leaf_vals, outs, closed, jax.tree_util.tree_structure(out_shape)


def trace(fn: Callable, variables: Any, *example_args: Any, branches: bool = False) -> ChannelGraph:
  """Find the prunable channel groups of `fn(variables, *example_args)`.

  Inputs are batched along axis 0; the inputs' channels and the outputs are
  never pruned. In the collections layout of `jaxprune.functional`
  (`{"params", "batch_stats", "other"}`) only `params` count as parameters;
  otherwise every leaf does.

  With `branches=True` every producer of a residual sum (a conv or dense with
  its per-channel ops: a block's last conv/BN, a projection shortcut, a stem
  that starts a stream) also gets a group of kind "branch": its mask zeroes
  that producer's channels before the sum, never the identity path, and a
  stream channel is alive for a consumer when at least one producer reaching
  it keeps it. `branches=False` gives the channel groups alone.

  Example:
    >>> fn, variables = jaxprune.functional(model)
    >>> graph = jaxprune.trace(fn, variables, jnp.zeros((1, 32, 32, 3)), branches=True)
    >>> [g.name for g in graph.groups if g.kind == "branch"][:2]
    ['conv1:branch', 'layer1.0.conv2:branch']
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names = leaf_names(variables)
  shapes = tuple(tuple(np.shape(x)) for _, x in path_leaves)
  leaves = [x for _, x in path_leaves]
  fl, leaf_vals, outs, _, _ = analyze(fn, variables, example_args)
  for o in outs:
    for ids in o.ids.values():
      fl.freeze(ids)
  label = components(fl)
  ncomp = int(label.max()) + 1 if label.size else 0
  frozen = np.zeros(ncomp, bool)
  if fl.frozen:
    frozen[label[np.concatenate(fl.frozen)]] = True
  prunable = np.zeros(ncomp, bool)
  for s in fl.sites:
    ids = s.ids[s.ids >= 0]
    prunable[label[ids]] = True
  prunable &= ~frozen

  # Dims: every place channels live (mask sites in trace order, then leaf
  # axes). Components present in exactly the same dims form one group.
  index_leaves = {e.leaf for e in fl.events}
  dims: list[np.ndarray] = [s.ids for s in fl.sites]
  for li, v in enumerate(leaf_vals):
    if li not in index_leaves:
      dims += list(v.ids.values())
  atoms = _atoms(label, ncomp, prunable, dims)
  flat_of_comp = np.zeros(ncomp + 1, np.int64)  # entry -1 (for NONE ids) stays ONE
  offset = FIRST
  for comps in atoms:
    flat_of_comp[comps] = offset + np.arange(comps.size)
    offset += comps.size

  resolver = Resolver(fl, label, flat_of_comp, None)
  atom_names = _name_atoms(fl, atoms, resolver.channel, names, leaf_vals)
  ch_groups = [(n, int(a.size), "channel") for n, a in zip(atom_names, atoms)]

  # Branch groups: producers whose chain is one operand of a residual sum.
  br_groups: list[tuple[str, int, str]] = []
  branch_table: list[tuple[str, int]] = []
  sites_of: dict[int, list] = {}
  for s in fl.branch_sites:
    sites_of.setdefault(s.token, []).append(s)
  leaf_tokens: dict[int, int] = {}
  for tok in fl.tokens:
    if tok.leaf is not None:
      leaf_tokens[tok.leaf] = leaf_tokens.get(tok.leaf, 0) + 1
  token_branch: dict[int, tuple[int, dict[int, int]]] = {}
  branch_site: dict[int, Any] = {}
  if branches:
    used = {n for n, _, _ in ch_groups}
    for s in sorted(fl.branch_sites, key=lambda s: s.token):  # producers in program order
      t = s.token
      tok = fl.tokens[t]
      comps = label[s.ids[s.ids >= 0]]
      if (
        t in token_branch
        or len(sites_of[t]) != 1
        or tok.leaf is None
        or leaf_tokens[tok.leaf] != 1
        or (s.ids < 0).any()
        or len(set(comps)) != comps.size
      ):
        continue
      token_branch[t] = (offset, {int(c): k for k, c in enumerate(comps)})
      branch_site[t] = s
      name = _unique(f"{tok.name.rsplit('.', 1)[0]}:branch", used)
      br_groups.append((name, int(comps.size), "branch"))
      branch_table.append((name, tok.leaf))
      offset += comps.size
    resolver = Resolver(fl, label, flat_of_comp, token_branch)

  # What keeps each leaf position: its channel; a producer chain's also its
  # branch; a consumer's input axis what keeps its input.
  chain_label = components(fl, chains=True) if token_branch else None
  chain_token = np.full(int(chain_label.max()) + 1 if chain_label is not None else 0, -1)
  for t in token_branch:
    ids = fl.tokens[t].out_ids
    chain_token[chain_label[ids[ids >= 0]]] = t
  expands = {s.event for s in branch_site.values() if s.event is not None}
  gathers = {k for k in range(len(fl.events)) if k not in expands}
  consumers = Consumers(resolver, fl.consumers if token_branch else [], gathers)
  leaf_axes = []
  for v in leaf_vals:
    axes = {}
    for ax, ids in v.ids.items():
      e = leaf_expr(resolver, ids, chain_label, chain_token, consumers)
      if (e.prod[0] != ONE).any() or (e.prod[1:] >= FIRST).any() or e.union.shape[0]:
        axes[ax] = e
    leaf_axes.append(axes)

  all_groups = ch_groups + br_groups
  starts = np.cumsum([FIRST] + [g[1] for g in all_groups])[:-1]
  members = _members(all_groups, starts, names, leaf_axes, index_leaves)
  groups = tuple(Group(n, size, tuple(m), kind) for (n, size, kind), m in zip(all_groups, members))

  def factor_expr(op, k, ids):
    # a conv/dense input read at full width keeps its known-zero channels
    full = op.kind in ("conv", "dense") and k == 0 and op.event not in gathers
    return resolver.expr(ids, empty_alive=full)

  terms = [
    Term(op.kind, op.name, op.coef, tuple(factor_expr(op, k, f) for k, f in enumerate(op.factors)), op.groups)
    for op in fl.ops
  ]
  flags = _param_flags(variables, len(names))
  for li, shape in enumerate(shapes):
    if not flags[li]:
      continue
    coef, factors = 1.0, []
    for ax, n in enumerate(shape):
      if ax in leaf_axes[li]:
        factors.append(leaf_axes[li][ax])
      else:
        coef *= n
    terms.append(Term("param", names[li], coef, tuple(factors)))

  idx = _index_leaves(fl, resolver, token_branch, branch_site, leaf_vals, leaves, names)
  for il in idx:
    leaf_axes[il.leaf] = {il.axis: il.own}
  physical = _physical(fl, resolver, branch_site, gathers)
  example = tuple(
    jax.ShapeDtypeStruct(np.shape(a), getattr(a, "dtype", np.float32)) for a in jax.tree_util.tree_leaves(example_args)
  )
  return ChannelGraph(
    groups,
    names,
    shapes,
    tuple(flags),
    tuple(leaf_axes),
    tuple(terms),
    treedef,
    tuple(idx),
    tuple(physical),
    tuple(branch_table),
    example,
    branches,
  )


def _atoms(label, ncomp, prunable, dims) -> list[np.ndarray]:
  """Prunable components grouped by the exact set of dims they appear in.

  Groups are ordered by the first dim that holds them, and a group's channels
  in the order that dim holds them.
  """
  dim_comps, pairs_c, pairs_d = [], [], []
  for d, ids in enumerate(dims):
    comps = label[ids[ids >= 0]]
    comps = comps[prunable[comps]]
    uniq, first = np.unique(comps, return_index=True)
    dim_comps.append(uniq[np.argsort(first)])
    pairs_c.append(uniq)
    pairs_d.append(np.full(uniq.size, d))
  if not dim_comps:
    return []
  c, d = np.concatenate(pairs_c), np.concatenate(pairs_d)
  key_of = np.full(ncomp, -1, np.int64)
  if c.size:
    # Each component's sorted list of dims as a padded row; equal rows, one key.
    order = np.lexsort((d, c))
    c, d = c[order], d[order]
    comps, start, count = np.unique(c, return_index=True, return_counts=True)
    rank = np.arange(c.size) - np.repeat(start, count)
    rows = np.full((comps.size, int(count.max())), -1, np.int64)
    rows[np.repeat(np.arange(comps.size), count), rank] = d
    _, key = np.unique(rows, axis=0, return_inverse=True)
    key_of[comps] = np.ravel(key)
  atom_of: dict[int, list[int]] = {}
  order_keys: list[int] = []
  assigned = np.zeros(ncomp, bool)
  for uniq in dim_comps:
    for comp in uniq[~assigned[uniq]].tolist():
      key = int(key_of[comp])
      if key not in atom_of:
        atom_of[key] = []
        order_keys.append(key)
      atom_of[key].append(comp)
    assigned[uniq] = True
  return [np.asarray(atom_of[k], np.int64) for k in order_keys]


def _members(groups, starts, names, leaf_axes, skip) -> list[list[Member]]:
  members: list[list[Member]] = [[] for _ in groups]
  for li, axes in enumerate(leaf_axes):
    if li in skip:
      continue
    for ax, e in axes.items():
      for row in e.prod:
        sel = np.nonzero(row >= FIRST)[0]
        if not sel.size:
          continue
        g = np.searchsorted(starts, row[sel], side="right") - 1
        for k in np.unique(g):
          s = sel[g == k]
          members[k].append(Member(names[li], ax, s, row[s] - starts[k]))
  return members


def _index_leaves(fl, resolver, token_branch, branch_site, leaf_vals, leaves, names) -> list[IndexLeaf]:
  expand_events = {s.event: t for t, s in branch_site.items() if s.event is not None}
  seen: dict[int, int] = {}
  out = []
  for k, ev in enumerate(fl.events):
    v = leaf_vals[ev.leaf]
    if not np.array_equal(v.ids.get(0, np.zeros(0)), ev.leaf_ids):
      continue
    if ev.leaf in seen:
      raise ValueError(
        f"jaxprune.trace: index vector {names[ev.leaf]} is used at two places; give each gather/expand its own vector."
      )
    seen[ev.leaf] = k
    x = leaves[ev.leaf]
    if not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)) and hasattr(x, "shape"):
      if not np.array_equal(np.asarray(x), np.arange(np.size(x))):
        raise ValueError(
          f"jaxprune.trace: index vector {names[ev.leaf]} is not 0..n-1: this network was "
          "slimmed. Trace, mask and slim the unslimmed network."
        )
    ch = Expr.of([resolver.channel(ev.ids)])
    if k in expand_events:
      t = expand_events[k]
      comps = resolver.label[ev.ids]
      br = resolver.entry(t, comps).astype(np.int32)
      out.append(IndexLeaf(ev.leaf, 0, ch, Expr.of([ch.prod[0], br]), "expand"))
    else:
      out.append(IndexLeaf(ev.leaf, 0, resolver.expr(ev.ids), ch, "gather"))
  return out


def _physical(fl, resolver, branch_site, gathers) -> list[Physical]:
  """Places where slim cannot shrink more than the channel masks do: a branch
  added into its stream without an expand vector, a consumer that reads the
  stream at full width (no gather vector)."""
  if not branch_site:
    return []
  out = []
  for t, s in branch_site.items():
    if s.event is None:
      br = resolver.entry(t, resolver.label[s.ids])
      out.append(
        Physical(
          f"{fl.tokens[t].name.rsplit('.', 1)[0]} adds its branch into the residual stream without an index vector",
          Expr.of([resolver.channel(s.ids), br.astype(np.int32)]),
        )
      )
  expands = {s.event for s in branch_site.values()}
  for site in fl.sites:
    if site.event in gathers:
      continue
    if site.event not in expands and site.chain:
      continue  # reads a producer's own (narrow) output: slim realises it
    e = resolver.expr(site.ids, empty_alive=True)
    if e.prod.shape[0] > 1 or e.union.shape[0]:
      out.append(Physical(f"the layer at equation {site.path} reads the residual stream without an index vector", e))
  return out


def _unique(name: str, used: set) -> str:
  base, k = name, 0
  while name in used:
    k += 1
    name = f"{base}#{k}"
  used.add(name)
  return name


def _name_atoms(fl, atoms, channel, names, leaf_vals) -> list[str]:
  """Name each group after the first conv/dense layer that produces it."""
  result: list[str | None] = [None] * len(atoms)
  starts = np.cumsum([0] + [a.size for a in atoms])[:-1] + FIRST

  def atoms_in(ids):
    f = channel(ids)
    f = f[f >= FIRST]
    return set(np.searchsorted(starts, f, side="right") - 1) if f.size else set()

  for op in fl.ops:
    if op.kind in ("conv", "dense") and op.factors:
      for k in atoms_in(op.factors[-1]):
        if result[k] is None:
          result[k] = op.name.rsplit(".", 1)[0] if op.name != "?" else None
  for li, v in enumerate(leaf_vals):
    for ids in v.ids.values():
      for k in atoms_in(ids):
        if result[k] is None:
          result[k] = names[li]
  out, used = [], set()
  for k, n in enumerate(result):
    out.append(_unique(n or f"group{k}", used))
  return out


__all__ = ["trace", "analyze", "leaf_names", "NONE"]
