"""Fold every BatchNorm into the conv or dense layer before it, for inference.

An eval-mode BatchNorm after a conv is a per-channel affine map of the conv's
output, `y = a * conv(x) + b` with `a = scale / sqrt(var + eps)` and
`b = bias - mean * a`; multiplying the kernel's output channels by `a` leaves
only `+ b`. `find_batchnorms` finds the conv/dense -> BatchNorm pairs in the
jaxpr of any `fn(variables, x)` (flax's BatchNorm formula, nnx or linen, with
or without scale and bias; a conv bias is folded too), so it works on dense,
slimmed and branch-slimmed networks alike: the BN's channels are the conv's
output channels wherever the block later gathers or expands them.

Two ways to run the folded network:

- `fold_batchnorm(variables, folds)`: the same variable tree, for the same
  `fn`. The kernel carries `a`, the BN becomes a pure bias add (scale 1,
  mean 0, var 1 - eps, bias b). Works for any function; the network's graph,
  and so its speed, is unchanged.
- `fold_module(model, x)`: an NNX model whose folded `nnx.BatchNorm` layers are
  replaced by `BiasAdd` (one add per channel, no centring or scaling), for
  inference and export.

Example:
  >>> folded = jaxprune.deploy.fold_module(small_model, x[:1])
  >>> bool(jnp.allclose(folded(x), small_model(x), atol=1e-4))   # up to float rounding
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune.interpret import CALLS
from jaxprune.trace import leaf_name

COLLECTIONS = ("params", "batch_stats", "other")  # jaxprune.functional's variables

# Ops that carry a per-channel vector to the shape it is broadcast at, keeping
# its element order.
_SHAPE_OPS = ("reshape", "broadcast_in_dim", "convert_element_type", "squeeze", "expand_dims", "copy", "copy_p")


@dataclasses.dataclass(frozen=True)
class Fold:
  """One conv/dense -> BatchNorm pair (leaf names as `leaf_paths` gives them).

  `kernel_axis` is the kernel's output-feature axis; `conv_bias` the conv's own
  bias (or None); `scale` / `bias` are None for a BatchNorm without them.
  """

  kernel: str
  kernel_axis: int
  conv_bias: str | None
  mean: str
  var: str
  scale: str | None
  bias: str | None
  epsilon: float

  @property
  def bn(self) -> str:
    """The BatchNorm's module path, e.g. 'layer1.0.bn1' (without the collection of
    `jaxprune.functional`'s variables)."""
    path = self.mean.rsplit(".", 1)[0]
    head, _, rest = path.partition(".")
    return rest if head in COLLECTIONS and rest else path


def leaf_paths(variables: Any) -> list[str]:
  """Dotted names of the leaves in flattening order ('params.layer1.0.conv1.kernel')."""
  return [leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]


# ------------------------------------------------------------------ matching --
# Every jaxpr variable gets a description of what it holds, as far as folding
# cares: a vector or kernel taken from a leaf by shape ops only, a conv/dense
# output, then the stages of flax's `(y - mean) * (rsqrt(var + eps) * scale) +
# bias`. Each description knows the leaves it depends on; any other op that
# reads it *taints* them, and a pair with a tainted leaf is not folded (its
# values are read elsewhere, so changing them would change the network).


@dataclasses.dataclass
class _Conv:
  kernel: int
  kernel_axis: int
  feature_axis: int  # of its output
  channels: int
  bias: int | None = None


@dataclasses.dataclass
class _Match:
  conv: _Conv
  mean: int | None = None
  var: int | None = None
  eps: float | None = None
  scale: int | None = None
  bias: int | None = None

  @property
  def leaves(self) -> list[int]:
    own = [self.conv.kernel, self.conv.bias, self.mean, self.var, self.scale, self.bias]
    return [li for li in own if li is not None]


@dataclasses.dataclass
class _D:
  """What a jaxpr variable holds: kind is "leaf" (payload: leaf index, shape), "lit"
  (a literal value), "conv" (a _Conv), "var+eps" / "inv" ((var, eps, scale)),
  "centred" / "normed" (a _Match)."""

  kind: str
  deps: frozenset
  payload: Any = None


class _Walker:
  def __init__(self, leaves: Sequence[Any]):
    self.leaves = leaves
    self.taint = np.zeros(len(leaves), int)
    self.found: list[_Match] = []

  def run(self, jaxpr, descs: list, top: bool = True) -> list:
    env: dict = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return _D("lit", frozenset(), v.val)
      return env.get(v)

    for v, d in zip(jaxpr.invars, descs):
      env[v] = d
    for e in jaxpr.eqns:
      ins = [read(v) for v in e.invars]
      name = e.primitive.name
      if name in CALLS and CALLS[name] in e.params:
        inner = e.params[CALLS[name]]
        outs = self.run(inner.jaxpr if hasattr(inner, "jaxpr") else inner, ins, top=False)
        for v, d in zip(e.outvars, outs):
          env[v] = d
        continue
      out = self.step(e, name, ins) if len(e.outvars) == 1 else None
      if out is None:
        for d in ins:
          if d is not None and d.kind == "normed":
            self.found.append(d.payload)  # a BatchNorm without bias, used as is
          elif d is not None:
            self.taint[list(d.deps)] += 1
      for v in e.outvars:
        env[v] = out
    outs = [read(v) for v in jaxpr.outvars]
    if top:
      for d in outs:
        if d is not None:
          self.taint[list(d.deps)] += 1
    return outs

  def leaf_vector(self, d: _D | None, act_shape, axis: int) -> int | None:
    """Leaf index if `d` is a leaf vector laid along `axis` of `act_shape`."""
    if d is None or d.kind != "leaf":
      return None
    li, shape = d.payload
    n = act_shape[axis]
    if np.shape(self.leaves[li]) != (n,) or len(shape) > len(act_shape):
      return None
    full = (1,) * (len(act_shape) - len(shape)) + tuple(shape)
    if any(s != 1 for k, s in enumerate(full) if k != axis) or full[axis] != n:
      return None
    return li

  def step(self, e, name: str, ins: list) -> _D | None:
    shape = tuple(e.outvars[0].aval.shape)
    kinds = [None if d is None else d.kind for d in ins]
    if name in _SHAPE_OPS and kinds == ["leaf"]:
      return _D("leaf", ins[0].deps, (ins[0].payload[0], shape))
    if name == "conv_general_dilated":
      return self.conv(e, ins)
    if name == "dot_general":
      return self.dense(e, ins, shape)
    if name == "rsqrt" and kinds == ["var+eps"]:
      return _D("inv", ins[0].deps, ins[0].payload)
    if len(ins) != 2:
      return None
    deps = ins[0].deps | ins[1].deps if None not in kinds else None
    for a, b in ((ins[0], ins[1]), (ins[1], ins[0])):
      ka, kb = (a.kind if a else None), (b.kind if b else None)
      if name == "add" and ka == "conv" and a.payload.bias is None:
        li = self.leaf_vector(b, shape, a.payload.feature_axis)
        if li is not None:  # a conv's own bias
          return _D("conv", deps, dataclasses.replace(a.payload, bias=li))
      if name == "add" and ka == "leaf" and kb == "lit" and np.ndim(b.payload) == 0:
        return _D("var+eps", deps, (a.payload[0], float(np.asarray(b.payload)), None))
      if name == "mul" and ka == "inv" and a.payload[2] is None and kb == "leaf":
        return _D("inv", deps, a.payload[:2] + (b.payload[0],))
      if name == "mul" and ka == "centred" and kb == "inv":
        m = a.payload
        var, eps, scale = b.payload
        if all(np.shape(self.leaves[li]) == (m.conv.channels,) for li in (var, scale) if li is not None):
          return _D("normed", deps, dataclasses.replace(m, var=var, eps=eps, scale=scale))
      if name == "add" and ka == "normed":
        li = self.leaf_vector(b, shape, a.payload.conv.feature_axis)
        if li is not None:
          self.found.append(dataclasses.replace(a.payload, bias=li))
          return _D("bn", frozenset())  # complete: what reads it is no concern
    a, b = ins
    if name == "sub" and a is not None and a.kind == "conv":
      li = self.leaf_vector(b, shape, a.payload.feature_axis)
      if li is not None:
        return _D("centred", deps, _Match(a.payload, mean=li))
    return None

  def conv(self, e, ins) -> _D | None:
    rhs = ins[1]
    if rhs is None or rhs.kind != "leaf" or e.params["batch_group_count"] != 1:
      return None
    li, shape = rhs.payload
    if tuple(shape) != np.shape(self.leaves[li]):
      return None
    if ins[0] is not None:
      self.taint[list(ins[0].deps)] += 1
    dn = e.params["dimension_numbers"]
    out = e.outvars[0].aval.shape
    return _D("conv", rhs.deps, _Conv(li, dn.rhs_spec[0], dn.out_spec[1], out[dn.out_spec[1]]))

  def dense(self, e, ins, shape) -> _D | None:
    rhs = ins[1]
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    if rhs is None or rhs.kind != "leaf" or lb or rb:
      return None
    li, kshape = rhs.payload
    lhs_ndim = len(e.invars[0].aval.shape)
    if (
      len(kshape) != 2
      or tuple(kshape) != np.shape(self.leaves[li])
      or tuple(rc) != (0,)
      or tuple(lc) != (lhs_ndim - 1,)
    ):
      return None
    if ins[0] is not None:
      self.taint[list(ins[0].deps)] += 1
    return _D("conv", rhs.deps, _Conv(li, 1, len(shape) - 1, shape[-1]))


def find_batchnorms(fn: Callable, variables: Any, *example_args: Any) -> list[Fold]:
  """The BatchNorms of `fn(variables, *example_args)` that fold into the conv or
  dense layer before them (in program order).

  A pair folds when the conv's output feeds the BatchNorm alone and every leaf
  involved is used by that pair alone (a shared kernel or a BatchNorm whose
  statistics are read elsewhere is left as it is). Trace in eval mode.

  Example:
    >>> fn, variables = jaxprune.functional(model)
    >>> folds = jaxprune.deploy.find_batchnorms(fn, variables, x[:1])
    >>> folds[0].kernel, folds[0].bn
    ('params.conv1.kernel', 'bn1')
  """
  leaves = jax.tree_util.tree_leaves(variables)
  treedef = jax.tree_util.tree_structure(variables)
  closed = jax.make_jaxpr(lambda ls, *a: fn(jax.tree_util.tree_unflatten(treedef, ls), *a))(leaves, *example_args)
  w = _Walker(leaves)
  descs = [_D("leaf", frozenset([i]), (i, np.shape(x))) for i, x in enumerate(leaves)]
  descs += [None] * (len(closed.jaxpr.invars) - len(descs))
  w.run(closed.jaxpr, descs)
  names = leaf_paths(variables)
  seen = np.zeros(len(leaves), int)
  for m in w.found:
    seen[m.leaves] += 1
  folds = []
  for m in w.found:
    own = m.leaves
    if len(set(own)) != len(own) or any(w.taint[li] or seen[li] != 1 for li in own):
      continue
    folds.append(
      Fold(
        kernel=names[m.conv.kernel],
        kernel_axis=m.conv.kernel_axis,
        conv_bias=None if m.conv.bias is None else names[m.conv.bias],
        mean=names[m.mean],
        var=names[m.var],
        scale=None if m.scale is None else names[m.scale],
        bias=None if m.bias is None else names[m.bias],
        epsilon=m.eps,
      )
    )
  return folds


# ------------------------------------------------------------------- folding --


def unit_variance(epsilon: float, dtype) -> np.ndarray:
  """A variance `v` with `v + epsilon == 1` exactly in `dtype` (so rsqrt is 1)."""
  dtype = np.dtype(dtype)
  one = np.asarray(1, dtype)
  eps = np.asarray(epsilon, dtype)
  v = np.asarray(one - eps, dtype)
  for _ in range(4):
    s = np.asarray(v + eps, dtype)
    if s == one:
      break
    v = np.nextafter(v, -np.inf if s > one else np.inf).astype(dtype)
  return v


def fold_factors(variables: Any, f: Fold) -> tuple[np.ndarray, np.ndarray]:
  """`(a, b)` of the pair, in float64: BatchNorm(conv(x)) == a * conv_without_bias(x) + b."""
  leaf = dict(zip(leaf_paths(variables), jax.tree_util.tree_leaves(variables)))
  get = lambda n: np.asarray(leaf[n], np.float64)
  a = 1.0 / np.sqrt(get(f.var) + f.epsilon)
  if f.scale is not None:
    a = a * get(f.scale)
  shift = -get(f.mean)
  if f.conv_bias is not None:
    shift = shift + get(f.conv_bias)
  b = a * shift + (get(f.bias) if f.bias is not None else 0.0)
  return a, b


def fold_batchnorm(variables: Any, folds: Sequence[Fold]) -> Any:
  """The same variable tree with each pair's BatchNorm folded into its conv.

  The kernel's output channels carry `a`; the BatchNorm computes `x + b` (scale
  1, mean 0, variance 1 - eps, bias b; without a bias leaf, mean -b), so the
  unchanged `fn` runs the folded variables. Pure: `variables` is not modified.

  Example:
    >>> folds = jaxprune.deploy.find_batchnorms(fn, variables, x[:1])
    >>> folded = jaxprune.deploy.fold_batchnorm(variables, folds)
    >>> bool(jnp.allclose(fn(folded, x), fn(variables, x), atol=1e-4))
    True
  """
  names = leaf_paths(variables)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  new = dict(zip(names, leaves))
  for f in folds:
    a, b = fold_factors(variables, f)
    k = np.asarray(new[f.kernel])
    shape = [1] * k.ndim
    shape[f.kernel_axis] = a.shape[0]
    new[f.kernel] = jnp.asarray((k.astype(np.float64) * a.reshape(shape)).astype(k.dtype))
    if f.conv_bias is not None:
      new[f.conv_bias] = _like(np.zeros_like(b), new[f.conv_bias])
    mdtype = np.asarray(new[f.mean]).dtype
    if f.bias is not None:
      new[f.bias] = _like(b, new[f.bias])
      new[f.mean] = _like(np.zeros_like(b), new[f.mean])
    else:
      new[f.mean] = _like(-b, new[f.mean])
    new[f.var] = jnp.full(np.shape(new[f.var]), unit_variance(f.epsilon, mdtype))
    if f.scale is not None:
      new[f.scale] = _like(np.ones_like(a), new[f.scale])
  return jax.tree_util.tree_unflatten(treedef, [new[n] for n in names])


def _like(values: np.ndarray, ref) -> jax.Array:
  return jnp.asarray(np.asarray(values).astype(np.asarray(ref).dtype))


def cast_floats(variables: Any, dtype=jnp.bfloat16) -> Any:
  """Floating leaves cast to `dtype` (e.g. bf16 weights); integer leaves (index
  vectors) kept.

  Example:
    >>> half = jaxprune.deploy.cast_floats(variables, jnp.bfloat16)
  """

  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x

  return jax.tree.map(cast, variables)
