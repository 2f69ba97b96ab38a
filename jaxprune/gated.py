"""`gated`: dynamic, per-sample channel gating in one pass, for methods such as FTWT and ManiDP.

A method gives a gate function; it is called at each gated group's producer
(the conv/dense that computes the group's channels), in program order, in the
same pass that runs the network, on that producer's input as it is at that
point (every upstream gate already applied). It returns per-sample masks for
the group, which then multiply the group's channels wherever they are consumed
(and, for a branch group, its operand of the residual sum). This is the core's
`masked` evaluator with two hooks, so gated outputs equal the per-sample
slimmed networks.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import interpret
from jaxprune.channel_exprs import components, site_exprs
from jaxprune.graph import FIRST, ChannelGraph, Masks
from jaxprune.trace import analyze


class Producer(NamedTuple):
  """Where a group's channels are computed: its gate's input."""

  name: str  # the group
  kind: str  # "channel" | "branch"
  op: str  # "conv" | "dense"
  size: int  # channels of the group
  c_in: int  # features of the producer's input
  feature_axis: int  # of that input
  spatial_axes: tuple[int, ...]  # of that input (pool over them for a per-sample summary)
  order: int = 0  # program order of the producing layer
  layer: str = ""  # its weight's name, e.g. "layer1.0.conv2"
  first: bool = False  # it reads the network's input (a stem)


class GateInput(NamedTuple):
  """What a gate sees: its producer's input `x` (upstream gates applied)."""

  x: jax.Array
  producer: Producer


class Gated(NamedTuple):
  """What `gated` returns beside the network output."""

  masks: dict[str, jax.Array]  # every group, (batch, size); ungated ones as given
  aux: dict[str, Any]  # per gated group: what its gate returned beside the mask
  observed: dict[str, jax.Array]  # per gated group: `observe` of its un-masked output


# gate(GateInput, params) -> (mask (batch, size), aux)
Gate = Callable[[GateInput, Any], tuple[jax.Array, Any]]
# observe(y, axis) -> (batch, y.shape[axis]): a per-channel summary of a group's output
Observe = Callable[[jax.Array, int], jax.Array]


def _tokens_of(graph: ChannelGraph, fl, leaf_vals) -> dict[str, Any]:
  """The producer token of every group: a branch group's by its weight leaf, a channel
  group's first conv/dense (program order) whose outputs hold all its channels."""
  label = components(fl)
  comp_flat = {}
  skip = {il.leaf for il in graph.index_leaves}
  for li, (v, axes) in enumerate(zip(leaf_vals, graph.leaf_axes)):
    if li in skip:
      continue
    for ax, e in axes.items():
      ch = e.channel
      for c, f in zip(label[v.ids[ax]].tolist(), ch.tolist()):
        if f >= FIRST:
          comp_flat[c] = f
  offsets = graph.offsets
  by_leaf = {leaf: name for name, leaf in graph.branches}
  out: dict[str, Any] = {}
  for tok in fl.tokens:
    if tok.leaf in by_leaf and by_leaf[tok.leaf] not in out:
      out[by_leaf[tok.leaf]] = tok
    have = {comp_flat.get(c) for c in label[tok.out_ids[tok.out_ids >= 0]].tolist()}
    for g in graph.groups:
      if g.kind == "channel" and g.name not in out:
        o = offsets[g.name]
        if have.issuperset(range(o, o + g.size)):
          out[g.name] = tok
  return out


def producers(fn: Callable, graph: ChannelGraph, variables: Any, *args: Any) -> dict[str, Producer]:
  """Each group's producer in `fn` (in program order), for sizing gates.

  Groups no conv/dense produces (e.g. channels born in a zero padding) are left
  out; the result is in program order. Example:
    >>> prods = jaxprune.producers(fn, graph, variables, x[:1])
    >>> prods["layer1.0.conv1"].c_in
    16
  """
  fl, leaf_vals, _, _, _ = analyze(fn, variables, args)
  toks = _tokens_of(graph, fl, leaf_vals)
  order = {id(t): k for k, t in enumerate(fl.tokens)}
  out = {}
  for g in graph.groups:
    t = toks.get(g.name)
    if t is not None and t.in_axis >= 0:
      out[g.name] = Producer(
        g.name, g.kind, t.op, g.size, t.c_in, t.in_axis, t.spatial, order[id(t)], t.name.rsplit(".", 1)[0], t.first
      )
  return dict(sorted(out.items(), key=lambda kv: kv[1].order))


def gated(
  fn: Callable,
  graph: ChannelGraph,
  gate: Gate,
  groups: Sequence[str],
  *,
  observe: Observe | None = None,
  combine: str = "first",
) -> Callable:
  """`g(variables, params, *args, masks=None) -> (fn's output, Gated)`.

  For each name in `groups`, `gate(GateInput(x, producer), params[name])` runs
  just before that group's producer, on its input `x` (batch first), and
  returns `(mask, aux)`: the group's per-sample mask `(batch, size)` (hard or
  soft) and anything else the method wants back (logits, saliencies, pooled
  features). Groups not gated keep `masks` (static or per sample; default
  all ones). With `observe`, each gated group's un-masked output is summarised
  where it is used, before its mask applies (e.g. FTWT's peak activations,
  ManiDP's pooled features): at its first use (`combine="first"`), or the
  maximum over every use (`combine="max"`, for non-negative summaries; channels
  never used read 0).

  Example:
    >>> def gate(inp, p):                        # a per-sample gate from pooled input
    ...   h = inp.x.mean(inp.producer.spatial_axes)
    ...   logits = h @ p["w"]
    ...   return (logits > 0).astype(jnp.float32), logits
    >>> params = {"layer1.0.conv1": {"w": jnp.ones((16, 16))}}   # the gates' own parameters
    >>> out, aux = jaxprune.gated(fn, graph, gate, ["layer1.0.conv1"])(variables, params, x)
    >>> aux.masks["layer1.0.conv1"].shape       # (batch, channels)
    (8, 16)
  """
  names = [g.name for g in graph.groups]
  unknown = [n for n in groups if n not in names]
  if unknown:
    raise ValueError(f"gated: unknown groups {unknown}; the graph has {names}")
  if not groups:
    raise ValueError("gated: no groups to gate")
  if combine not in ("first", "max"):
    raise ValueError(f"combine must be 'first' or 'max', got {combine!r}")
  offsets = graph.offsets
  sizes = {g.name: g.size for g in graph.groups}

  def g(variables, params: Mapping[str, Any], *args, masks: Masks | None = None):
    missing = [n for n in groups if n not in params]
    if missing:
      raise ValueError(f"gated: no gate parameters for {missing}")
    batch = interpret.batch_size(args)
    if batch is None:
      raise ValueError("gated: no batched input found (per-sample gates need a batch axis)")
    base = graph.ones() if masks is None else masks
    flat = graph.flat(base)
    flat = jnp.broadcast_to(flat, (batch, flat.shape[-1])) if flat.ndim == 1 else flat
    fl, leaf_vals, _, closed, out_tree = analyze(fn, variables, args)
    sites = site_exprs(graph, fl, leaf_vals)
    toks = _tokens_of(graph, fl, leaf_vals)
    before: dict[tuple, Any] = {}
    for name in groups:
      t = toks.get(name)
      if t is None or t.in_axis < 0:
        raise ValueError(f"gated: group {name!r} has no conv/dense producer to gate at")
      prod = Producer(name, graph.group(name).kind, t.op, sizes[name], t.c_in, t.in_axis, t.spatial)
      before.setdefault(t.path, []).append((name, t.operand, prod))

    def hook(entries):
      def run(invals, state):
        for name, operand, prod in entries:
          m, aux = gate(GateInput(invals[operand], prod), params[name])
          m = jnp.asarray(m, jnp.float32)
          if m.shape != (batch, sizes[name]):
            raise ValueError(f"gate for {name!r} returned a mask of shape {m.shape}; expected {(batch, sizes[name])}")
          o = offsets[name]
          state.flat = state.flat.at[:, o : o + sizes[name]].set(m)
          state.seen.setdefault("aux", {})[name] = aux

      return run

    obs = _observers(graph, sites, groups, observe, combine) if observe is not None else {}
    state = interpret.State(flat)
    leaves = jax.tree_util.tree_leaves((variables, *args))
    outs = interpret.evaluate(closed, leaves, sites, state, before={p: hook(e) for p, e in before.items()}, observe=obs)
    out = jax.tree_util.tree_unflatten(out_tree, outs)
    f = state.flat
    result_masks = {n: f[:, offsets[n] : offsets[n] + sizes[n]] for n in names}
    return out, Gated(result_masks, state.seen.get("aux", {}), state.seen.get("observed", {}))

  return g


def _observers(graph: ChannelGraph, sites, groups, observe: Observe, combine: str) -> dict:
  """Hooks that summarise each gated group's un-masked channels where they are used."""
  offsets = graph.offsets
  spans = {n: (offsets[n], graph.group(n).size) for n in groups}
  hooks: dict = {}
  first_seen: set[str] = set()
  for key in sorted(sites, key=lambda k: k[0]):
    axis, e = sites[key]
    entries = []
    for n, (o, size) in spans.items():
      if combine == "first" and n in first_seen:
        continue
      sel, pos = [], []
      for row in e.prod:
        hit = np.nonzero((row >= o) & (row < o + size))[0]
        sel.append(hit)
        pos.append(row[hit] - o)
      sel, pos = np.concatenate(sel), np.concatenate(pos)
      if sel.size:
        entries.append((n, size, axis, jnp.asarray(sel), jnp.asarray(pos)))
        first_seen.add(n)
    if entries:

      def run(x, state, entries=entries):
        seen = state.seen.setdefault("observed", {})
        for n, size, axis, sel, pos in entries:
          s = jnp.take(observe(x, axis), sel, axis=-1)
          acc = seen.get(n)
          if acc is None:
            acc = jnp.zeros((s.shape[0], size), s.dtype)
          seen[n] = acc.at[:, pos].set(jnp.maximum(acc[:, pos], s) if combine == "max" else s)

      hooks[key] = run
  return hooks
