"""`trace`: channel groups of any function of (variables, *inputs), from its jaxpr."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jaxprune.channel_flow import NONE, ChannelFlow, Value
from jaxprune.graph import ChannelGraph, Group, Member, Term


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


COLLECTIONS = ("params", "batch_stats", "other")


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
    return [leaf_name(p).split(".", 1)[0] == "params"
            for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  return [True] * n


def analyze(fn: Callable, variables, args: tuple):
  """Run the channel rules over `fn(variables, *args)`.

  Returns the flow, the leaf values, the output values, the closed jaxpr and
  the output tree structure.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(variables, *args)
  path_leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  leaves = [x for _, x in path_leaves]
  arg_leaves = jax.tree_util.tree_leaves(args)
  fl = ChannelFlow()
  arg_vals = []
  for a in arg_leaves:
    v = fl.fresh_value(np.shape(a), act=True)
    if np.ndim(a):
      fl.batch_ids.append(v.ids[0])
    for ids in v.ids.values():
      fl.freeze(ids)
    arg_vals.append(v)
  fl.arg_id_end = fl.num_ids
  leaf_vals = [fl.fresh_value(np.shape(x), act=False) for x in leaves]
  for name, v in zip(leaf_names(variables), leaf_vals):
    for ids in v.ids.values():
      fl.name_ids(ids, name)
  consts = [Value({}, False) for _ in closed.consts]
  outs = fl.run(closed.jaxpr, consts, leaf_vals + arg_vals)
  return fl, leaf_vals, outs, closed, jax.tree_util.tree_structure(out_shape)


def components(fl: ChannelFlow) -> np.ndarray:
  """Label of the connected component of every id under the recorded ties."""
  n = fl.num_ids
  if fl.ties:
    a = np.concatenate([t[0] for t in fl.ties])
    b = np.concatenate([t[1] for t in fl.ties])
  else:
    a = b = np.zeros(0, np.int64)
  adj = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
  return connected_components(adj, directed=False)[1]


def trace(fn: Callable, variables: Any, *example_args: Any) -> ChannelGraph:
  """Find the prunable channel groups of `fn(variables, *example_args)`.

  Inputs are batched along axis 0; the inputs' channels and the outputs are
  never pruned. Leaves of NNX state count as parameters when they are
  `nnx.Param`s (otherwise every leaf does).

  Example:
    >>> graphdef, state = nnx.split(model)
    >>> fn = lambda state, x: nnx.merge(graphdef, state)(x)
    >>> graph = jaxprune.trace(fn, state, jnp.zeros((1, 32, 32, 3)))
    >>> [g.size for g in graph.groups][:3]
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names = leaf_names(variables)
  shapes = tuple(tuple(np.shape(x)) for _, x in path_leaves)
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
  dims: list[tuple[np.ndarray, int | None]] = [(s.ids, None) for s in fl.sites]
  for li, v in enumerate(leaf_vals):
    for ax, ids in v.ids.items():
      dims.append((ids, li))
  rng = np.random.default_rng(0)
  sig = np.zeros(ncomp, np.uint64)
  dim_comps = []
  for ids, _ in dims:
    comps = label[ids[ids >= 0]]
    comps = comps[prunable[comps]]
    uniq, first = np.unique(comps, return_index=True)
    uniq = uniq[np.argsort(first)]
    sig[uniq] += rng.integers(1, 2**63, dtype=np.uint64)
    dim_comps.append(uniq)
  atom_of: dict[int, list[int]] = {}
  order: list[int] = []
  assigned = np.zeros(ncomp, bool)
  for uniq in dim_comps:
    for c in uniq[~assigned[uniq]]:
      key = int(sig[c])
      if key not in atom_of:
        atom_of[key] = []
        order.append(key)
      atom_of[key].append(int(c))
    assigned[uniq] = True

  flat_of_comp = np.zeros(ncomp + 1, np.int64)  # entry -1 (for NONE ids) stays 0
  atoms = [np.asarray(atom_of[k]) for k in order]
  offset = 1
  for comps in atoms:
    flat_of_comp[comps] = offset + np.arange(comps.size)
    offset += comps.size

  def flat(ids: np.ndarray) -> np.ndarray:
    lab = np.where(ids >= 0, label[np.maximum(ids, 0)], -1)
    return flat_of_comp[lab].astype(np.int32)

  names_of_atoms = _name_atoms(fl, atoms, flat, names, leaf_vals, flat_of_comp)
  leaf_axes = []
  members: list[list[Member]] = [[] for _ in atoms]
  starts = np.cumsum([0] + [a.size for a in atoms])[:-1] + 1
  for li, v in enumerate(leaf_vals):
    axes = {}
    for ax, ids in v.ids.items():
      f = flat(ids)
      if (f > 0).any():
        axes[ax] = f
        for k in np.unique(np.searchsorted(starts, f[f > 0], side="right") - 1):
          sel = np.nonzero((f >= starts[k]) & (f < starts[k] + atoms[k].size))[0]
          members[k].append(Member(names[li], ax, sel, f[sel] - starts[k]))
    leaf_axes.append(axes)
  groups = tuple(Group(n, int(a.size), tuple(m)) for n, a, m in zip(names_of_atoms, atoms, members))

  terms = [Term(op.kind, op.name, op.coef, tuple(flat(f) for f in op.factors), op.groups)
           for op in fl.ops]
  flags = _param_flags(variables, len(names))
  for li, (v, shape) in enumerate(zip(leaf_vals, shapes)):
    if not flags[li]:
      continue
    coef, factors = 1.0, []
    for ax, n in enumerate(shape):
      if ax in leaf_axes[li]:
        factors.append(leaf_axes[li][ax])
      else:
        coef *= n
    terms.append(Term("param", names[li], coef, tuple(factors)))
  return ChannelGraph(groups, names, shapes, tuple(flags), tuple(leaf_axes), tuple(terms), treedef)


def _name_atoms(fl, atoms, flat, names, leaf_vals, flat_of_comp) -> list[str]:
  """Name each group after the first conv/dense layer that produces it."""
  result: list[str | None] = [None] * len(atoms)
  starts = np.cumsum([0] + [a.size for a in atoms])[:-1] + 1
  sizes = np.array([a.size for a in atoms])

  def atoms_in(ids):
    f = flat(ids)
    f = f[f > 0]
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
  out, seen = [], {}
  for k, n in enumerate(result):
    n = n or f"group{k}"
    if n in seen:
      seen[n] += 1
      n = f"{n}#{seen[n]}"
    else:
      seen[n] = 0
    out.append(n)
  del sizes, flat_of_comp
  return out
