"""`jaxprune.trace`: the channel groups found, against structures derived by hand.

A graph is compared as plain sets (`custom_models.structure`): each group is a
set of channels, each channel the set of (leaf, axis, index) places it lives
in. The expected sets below are built from the architectures' definitions,
not from the code's output.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import abstract_graph, abstract_zoo, custom_setup, structure

import jaxprune
from jaxprune.models.vgg import CFGS

BN = ("scale", "bias", "mean", "var")


def bn(prefix: str, pos: int) -> set:
  return {(f"{prefix}.{k}", 0, pos) for k in BN}


def channel_group(*channels) -> frozenset:
  return frozenset(frozenset(c) for c in channels)


# ------------------------------------------------------------- ResNet-20 ----


def resnet_cifar_expected(n: int) -> frozenset:
  """Hand-derived groups of a CIFAR ResNet with n blocks per stage.

  Residual stream: stage 1 has the stem's 16 channels; the option-A shortcut
  of layer{s}.0 (s = 2, 3) builds stage s's stream as [pad_lo | stage s-1
  stream | pad_hi] with (w_s - w_{s-1}) / 2 zeros on each side (8, then 16).
  So a stream channel born at stage b sits at position p in stage b and at
  lo_t + p in each later stage t, where lo_2 = 8, lo_3 = 16. The stream
  splits into 5 groups by where the channels are born: the stem (16),
  layer2.0.pad_lo (8), layer2.0.pad_hi (8), layer3.0.pad_lo (16) and
  layer3.0.pad_hi (16): they live in different leaves, so each is its own
  group. Each block's conv1 output (16/32/64) is one more group, coupled to
  its BN and its conv2's input only: 3n groups. For ResNet-20 (n = 3) that is
  5 + 9 = 14 groups.
  """
  widths = {1: 16, 2: 32, 3: 64}
  lo = {2: 8, 3: 16}

  def stream_channel(birth: int, p: int, extra: set) -> set:
    pos = {birth: p}
    for t in range(birth + 1, 4):
      pos[t] = lo[t] + pos[t - 1]
    c = set(extra)
    if birth == 1:
      c |= {("conv1.kernel", 3, p)} | bn("bn1", p)
    for s in pos:
      for i in range(n):
        c |= {(f"layer{s}.{i}.conv2.kernel", 3, pos[s])} | bn(f"layer{s}.{i}.bn2", pos[s])
        if i > 0:
          c.add((f"layer{s}.{i}.conv1.kernel", 2, pos[s]))
      if s + 1 <= 3:  # the next stage's first block reads this stage's stream
        c.add((f"layer{s + 1}.0.conv1.kernel", 2, pos[s]))
    if birth == 1:
      c.add(("layer1.0.conv1.kernel", 2, p))
    c.add(("fc.kernel", 0, pos[3]))
    return c

  groups = [channel_group(*[stream_channel(1, j, set()) for j in range(16)])]
  for s in (2, 3):
    half = (widths[s] - widths[s - 1]) // 2
    groups.append(channel_group(*[stream_channel(s, k, {(f"layer{s}.0.pad_lo", 0, k)}) for k in range(half)]))
    groups.append(
      channel_group(
        *[stream_channel(s, lo[s] + widths[s - 1] + k, {(f"layer{s}.0.pad_hi", 0, k)}) for k in range(half)]
      )
    )
  for s in (1, 2, 3):
    for i in range(n):
      b = f"layer{s}.{i}"
      groups.append(
        channel_group(
          *[{(f"{b}.conv1.kernel", 3, c), (f"{b}.conv2.kernel", 2, c)} | bn(f"{b}.bn1", c) for c in range(widths[s])]
        )
      )
  return frozenset(groups)


@pytest.fixture(scope="module")
def resnet20():
  return abstract_graph("resnet20", 32, 10)


def test_resnet20_groups_match_hand_derivation(resnet20):
  expected = resnet_cifar_expected(3)
  assert len(expected) == 14
  assert len(resnet20.groups) == 14
  assert sorted(g.size for g in resnet20.groups) == sorted([16, 8, 8, 16, 16] + [16] * 3 + [32] * 3 + [64] * 3)
  assert structure(resnet20) == expected


def test_resnet20_residual_stream_holds_every_conv2_and_zeropad(resnet20):
  stream = [g for g in resnet20.groups if any(m.leaf.endswith("conv2.kernel") and m.axis == 3 for m in g.members)]
  assert len(stream) == 5  # stem channels + the four ZeroPad vectors
  places = {(m.leaf, m.axis, int(i)) for g in stream for m in g.members for i in m.index}
  widths = {1: 16, 2: 32, 3: 64}
  for s in (1, 2, 3):
    for i in range(3):
      assert {(f"layer{s}.{i}.conv2.kernel", 3, c) for c in range(widths[s])} <= places
  for s, half in ((2, 8), (3, 16)):
    for side in ("pad_lo", "pad_hi"):
      assert {(f"layer{s}.0.{side}", 0, k) for k in range(half)} <= places
  # every stream group holds exactly one kind of birth: the stem or one ZeroPad
  births = sorted(
    sorted(
      {m.leaf for m in g.members if m.leaf.endswith(("pad_lo", "pad_hi"))}
      | ({"conv1.kernel"} & {m.leaf for m in g.members})
    )
    for g in stream
  )
  assert births == [
    ["conv1.kernel"],
    ["layer2.0.pad_hi"],
    ["layer2.0.pad_lo"],
    ["layer3.0.pad_hi"],
    ["layer3.0.pad_lo"],
  ]


def _no_io_members(graph, first_kernel, last_leaves):
  for g in graph.groups:
    for m in g.members:
      assert not (m.leaf == first_kernel and m.axis == 2), "input channels are never pruned"
      for leaf, axis in last_leaves:
        assert not (m.leaf == leaf and m.axis == axis), "logits are never pruned"


def test_inputs_and_logits_never_in_a_group(resnet20):
  _no_io_members(resnet20, "conv1.kernel", [("fc.kernel", 1), ("fc.bias", 0)])
  _no_io_members(abstract_graph("vgg16", 32, 10), "features.0.conv.kernel", [("fc.kernel", 1), ("fc.bias", 0)])


def test_resnet56_group_count():
  # 5 stream groups + one per block (3 stages x 9 blocks)
  g = abstract_graph("resnet56", 32, 10)
  assert structure(g) == resnet_cifar_expected(9)


# ---------------------------------------------------------------- VGG-16 ----


def test_vgg16_one_group_per_conv():
  # Each conv's output channels (kernel axis 3 + its BN) feed only the next
  # conv's input axis (max-pool keeps channels), the last one the classifier
  # through the global average pool: one group per conv, 13 in all.
  graph = abstract_graph("vgg16", 32, 10)
  widths = [c for c in CFGS[16] if c != "M"]
  assert len(widths) == 13
  expected = []
  for i, w in enumerate(widths):
    nxt = (f"features.{i + 1}.conv.kernel", 2) if i + 1 < len(widths) else ("fc.kernel", 0)
    expected.append(
      channel_group(
        *[{(f"features.{i}.conv.kernel", 3, c), (nxt[0], nxt[1], c)} | bn(f"features.{i}.bn", c) for c in range(w)]
      )
    )
  assert len(graph.groups) == 13
  assert structure(graph) == frozenset(expected)


# -------------------------------------------------------- custom network ----


def custom_expected() -> frozenset:
  """Hand derivation for `custom_models.Custom` (see its docstring)."""
  # stem output: read by a, b and the side branch q
  stem = channel_group(
    *[
      {("stem.kernel", 3, j), ("a.kernel", 2, j), ("b.kernel", 2, j), ("q.kernel", 2, j)} | bn("bn0", j)
      for j in range(8)
    ]
  )

  # concat [a (6) | b (4)] = 10 channels; the depthwise conv ties its in and
  # out channel c (dw kernel axis 3, bnd); the grouped conv (2 groups of 5
  # inputs) reads input c and c + 5 with the same kernel slice, tying them.
  def concat_channel(c):
    s = {("dw.kernel", 3, c)} | bn("bnd", c)
    if c < 6:
      s |= {("a.kernel", 3, c)} | bn("bna", c)
    else:
      s |= {("b.kernel", 3, c - 6), ("b.bias", 0, c - 6)}
    return s

  pairs = [concat_channel(k) | concat_channel(k + 5) | {("g.kernel", 2, k)} for k in range(5)]
  # pair 0 = (a0, a5) has no b leaf, pairs 1..4 do: different groups
  pair0, pairs14 = channel_group(pairs[0]), channel_group(*pairs[1:])

  # grouped conv outputs: both groups keep the same count, o ~ o + 4; the
  # residual adds r(x) and qq(q) channel-wise; the static pad puts the 8
  # channels at positions 1..8 of the 11 p reads (0, 9, 10 face the padding)
  def res(o):
    return (
      {("g.kernel", 3, o), ("r.kernel", 3, o), ("r.kernel", 2, o), ("qq.kernel", 3, o), ("p", 1, 1 + o)}
      | bn("bng", o)
      | bn("bnr", o)
    )

  stream = channel_group(*[res(k) | res(k + 4) for k in range(4)])

  # after p (OIHW, axis 0 = output): w reads them; the shortcut puts them at
  # 2..7 of w's 12 outputs, lo at 0..1, hi at 8..11; 2x2 spatial flatten: fc1
  # row (h * 2 + w) * 12 + c holds channel c
  def tail(c, extra):
    return {("w.kernel", 3, c)} | bn("bnw", c) | extra | {("fc1.kernel", 0, pos * 12 + c) for pos in range(4)}

  p_out = channel_group(*[tail(2 + o, {("p", 0, o), ("w.kernel", 2, o)} | bn("bnp", o)) for o in range(6)])
  lo = channel_group(*[tail(k, {("lo", 0, k)}) for k in range(2)])
  hi = channel_group(*[tail(8 + k, {("hi", 0, k)}) for k in range(4)])
  fc1 = channel_group(*[{("fc1.kernel", 1, j), ("fc1.bias", 0, j), ("fc2.kernel", 0, j)} for j in range(16)])
  # q's 4 outputs go through a static split/slice: frozen, in no group
  return frozenset([stem, pair0, pairs14, stream, p_out, lo, hi, fc1])


def test_custom_groups_match_hand_derivation():
  graph = custom_setup().graph
  assert structure(graph) == custom_expected()


def test_custom_static_pad_and_split_channels_are_frozen():
  graph = custom_setup().graph
  places = {(m.leaf, m.axis, int(i)) for g in graph.groups for m in g.members for i in m.index}
  # p's input channels 0, 9, 10 face the static channel pad: never pruned
  assert {("p", 1, i) for i in (0, 9, 10)}.isdisjoint(places)
  assert {("p", 1, i) for i in range(1, 9)} <= places
  # the split/sliced side branch q keeps all its channels
  assert not any((leaf, axis) in {("q.kernel", 3), ("qq.kernel", 2)} for leaf, axis, _ in places)
  assert {("q.kernel", 2, j) for j in range(8)} <= places  # q's input is the (free) stem
  # inputs and logits
  assert not any((leaf, axis) in {("stem.kernel", 2), ("fc2.kernel", 1), ("fc2.bias", 0)} for leaf, axis, _ in places)


def test_group_sizes_and_offsets_consistent():
  graph = custom_setup().graph
  assert graph.num_channels == sum(g.size for g in graph.groups)
  names = [g.name for g in graph.groups]
  assert len(set(names)) == len(names)
  ones = graph.ones((3,))
  assert all(v.shape == (3, graph.group(k).size) for k, v in ones.items())
  assert graph.flat(graph.ones()).shape == (2 + graph.num_channels,)  # constants 1 and 0 first


# ---------------------------------------------------------- nested jaxprs ----


def _wrappers(fn):
  jitted = jax.jit(fn)

  @jax.custom_jvp
  def cjvp(state, x):
    return fn(state, x)

  cjvp.defjvp(lambda primals, tangents: jax.jvp(fn, primals, tangents))

  @jax.custom_vjp
  def cvjp(state, x):
    return fn(state, x)

  def fwd(state, x):
    out, vjp = jax.vjp(fn, state, x)
    return out, vjp

  cvjp.defvjp(fwd, lambda vjp, g: vjp(g))

  return {
    "jit": lambda s, x: jitted(s, x),
    "checkpoint": jax.checkpoint(fn),
    "custom_jvp": cjvp,
    "custom_vjp": cvjp,
    "jit_in_checkpoint": jax.checkpoint(lambda s, x: jitted(s, x)),
  }


@pytest.mark.parametrize("kind", ["jit", "checkpoint", "custom_jvp", "custom_vjp", "jit_in_checkpoint"])
def test_nested_jaxprs_trace_to_the_same_groups(kind, resnet20):
  fn, state = abstract_zoo("resnet20", num_classes=10)
  wrapped = _wrappers(fn)[kind]
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  graph = jaxprune.trace(wrapped, state, x)
  assert structure(graph) == structure(resnet20)
  assert [g.name for g in graph.groups] == [g.name for g in resnet20.groups]
  # the cost sees the layers inside too
  np.testing.assert_allclose(float(jaxprune.cost(graph).macs), float(jaxprune.cost(resnet20).macs), rtol=1e-6)


def test_trace_of_a_plain_function_of_dicts():
  # Two dense layers as a pure function of a dict: the hidden units are one
  # group of 7 with the first kernel's columns, the bias and the second
  # kernel's rows; all leaves count as params.
  params = {"w1": jnp.ones((5, 7)), "b1": jnp.ones(7), "w2": jnp.ones((7, 3))}
  fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  graph = jaxprune.trace(fn, params, jnp.ones((4, 5)))
  assert structure(graph) == frozenset([channel_group(*[{("w1", 1, j), ("b1", 0, j), ("w2", 0, j)} for j in range(7)])])
  assert all(graph.is_param)


# ---------------------------------------------------------------- errors ----


def _conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _take(y):
  return jnp.take(y, jnp.array([2, 0, 1, 3]), axis=-1)


def _sort(y):
  return jnp.sort(y, axis=-1)


def _sort_lax(y):
  return jax.lax.sort(y, dimension=3)


@pytest.mark.parametrize("op,prim", [(_take, "gather"), (_sort, "sort"), (_sort_lax, "sort")])
def test_unknown_primitive_on_channels_names_it_and_its_line(op, prim):
  # gather/sort have no channel rule; jnp.take and jnp.sort wrap them in an
  # inner jit, lax.sort does not
  p = {"k": jnp.ones((3, 3, 3, 4)), "w": jnp.ones((4, 2))}
  lines = {}

  def f(p, x):
    y = _conv(x, p["k"])
    lines["op"] = inspect.currentframe().f_lineno + 1
    y = op(y)
    return y.mean(axis=(1, 2)) @ p["w"]

  with pytest.raises(jaxprune.UnsupportedPrimitiveError) as err:
    jaxprune.trace(f, p, jnp.ones((1, 6, 6, 3)))
  msg = str(err.value)
  assert f"'{prim}'" in msg
  # the source line of the user's call: in the helper (one line below its
  # def), or the call site in f
  helper = inspect.getsourcelines(op)[1] + 1
  assert (f"test_trace.py:{helper}" in msg) or (f"test_trace.py:{lines['op']}" in msg), msg


def test_unknown_primitive_off_channels_is_fine():
  # the same gather on the network input (never pruned) is no problem
  p = {"k": jnp.ones((3, 3, 3, 4)), "w": jnp.ones((4, 2))}
  f = lambda p, x: _conv(jnp.take(x, jnp.array([2, 0, 1]), axis=-1), p["k"]).mean(axis=(1, 2)) @ p["w"]
  graph = jaxprune.trace(f, p, jnp.ones((1, 6, 6, 3)))
  assert [g.size for g in graph.groups] == [4]


# ------------------------------------------------------------ invariances ----


def test_batch_size_and_abstract_values_do_not_change_the_graph():
  setup = custom_setup()
  ref = structure(setup.graph)
  dense = float(jaxprune.cost(setup.graph).macs)
  for batch in (1, 3):
    g = jaxprune.trace(setup.fn, setup.state, jnp.zeros((batch, 16, 16, 3)))
    assert structure(g) == ref
    assert float(jaxprune.cost(g).macs) == dense  # cost is per sample
  # abstract inputs (ShapeDtypeStruct) trace the same as arrays
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), setup.state)
  g = jaxprune.trace(setup.fn, abstract, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
  assert structure(g) == ref
