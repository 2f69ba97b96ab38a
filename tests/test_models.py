"""Tests for the model zoo (jaxprune.models).

Speed notes (2 CPU cores): compiling a jax.random initializer costs ~1 s per
distinct kernel shape here, so parameter counts and output shapes use
abstract models (``nnx.eval_shape``), the numerical tests fill abstract
models with numpy random values, and real initialization runs only for a
DepthwiseConv.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import models
from jaxprune.models.layers import BN_EPSILON, BN_MOMENTUM, ChannelIndex, DepthwiseConv, ZeroPad
from jaxprune.models.resnet_cifar import BasicBlockA

IMAGENET = ("resnet18", "resnet34", "resnet50", "mobilenet_v1")
Path = tuple[str | int, ...]


# ----------------------------------------------------------------- helpers ---


@functools.cache
def _abstract_cached(name: str, num_classes: int, kwargs: tuple[tuple[str, object], ...]) -> nnx.Module:
  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0), **dict(kwargs)))


def _abstract(name: str, num_classes: int = 10, **kwargs) -> nnx.Module:
  """Shape-only model (no initializer runs); cached, so callers must not mutate it."""
  return _abstract_cached(name, num_classes, tuple(sorted(kwargs.items())))


def _random_model(name: str | Callable[[], nnx.Module], seed: int = 0, **kwargs) -> nnx.Module:
  """A model (registry name or constructor) filled with numpy random values.

  Convs use std sqrt(2 / fan_in) so activations neither explode nor vanish
  with non-trivial BN statistics; ZeroPad vectors stay zero. Returned in
  eval mode.
  """
  abstract = _abstract(name, **kwargs) if isinstance(name, str) else nnx.eval_shape(name)
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, var in nnx.to_flat_state(state):
    shape, leaf = var.get_value().shape, path[-1]
    if isinstance(var, ChannelIndex):
      flat[path] = var.replace(value=jnp.arange(shape[0], dtype=jnp.int32))  # positions
      continue
    if isinstance(var, ZeroPad):
      value = np.zeros(shape)
    elif leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      gain = 2.0 if len(shape) == 4 else 1.0
      value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BN bias/mean, Linear bias
      value = rng.normal(0.0, 0.1, shape)
    flat[path] = var.replace(value=jnp.asarray(value, jnp.float32))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  model.eval()
  return model


def _slice(state: nnx.State, cuts: Iterable[tuple[Path, int, Iterable[int]]]) -> nnx.State:
  """Remove indices ``drop`` along ``axis`` of the leaf at ``path``, as slimming does."""
  flat = dict(nnx.to_flat_state(state))
  for path, axis, drop in cuts:
    value = flat[path].get_value()
    keep = np.setdiff1d(np.arange(value.shape[axis]), np.asarray(list(drop), np.int64))
    if isinstance(flat[path], ChannelIndex):
      # with whole stream channels removed, the positions stay 0..n-1
      flat[path] = flat[path].replace(value=jnp.arange(keep.size, dtype=jnp.int32))
      continue
    flat[path] = flat[path].replace(value=jnp.take(value, keep, axis=axis))
  return nnx.from_flat_state(flat)


def _zero_bn_channels(model: nnx.Module, bn_paths: Iterable[tuple[Path, Iterable[int]]]) -> None:
  """Zero BN scale and bias of some channels: in eval mode their output is 0."""
  for path, chans in bn_paths:
    bn = model
    for key in path:
      bn = bn[key] if isinstance(key, int) else getattr(bn, key)
    idx = np.asarray(list(chans))
    bn.scale[...] = bn.scale[...].at[idx].set(0.0)
    bn.bias[...] = bn.bias[...].at[idx].set(0.0)


def _bn_leaves(path: Path, drop: Iterable[int]) -> list[tuple[Path, int, list[int]]]:
  drop = list(drop)
  return [(path + (leaf,), 0, drop) for leaf in ("scale", "bias", "mean", "var")]


def _x(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------- registry ---


def test_available_and_unknown_name() -> None:
  names = models.available()
  for expected in ("vgg11", "vgg16", "resnet20", "resnet32", "resnet56", "resnet110",
                     "resnet18", "resnet34", "resnet50", "mobilenet_v1", "mobilenet_v1_cifar"):  # fmt: skip
    assert expected in names
  with pytest.raises(ValueError) as err:
    models.create("nope", num_classes=10, rngs=nnx.Rngs(0))
  for name in names:
    assert name in str(err.value)


# ------------------------------------------------------------ param counts ---

# (name, kwargs, num_classes, reference, tolerance). References are published
# numbers; rounded ones get half a unit of their last digit as tolerance.
LITERATURE = [
  # He et al. 2016, "Deep Residual Learning", Table 6 (CIFAR-10).
  ("resnet20", {}, 10, 0.27e6, 0.005e6),
  ("resnet32", {}, 10, 0.46e6, 0.005e6),
  ("resnet56", {}, 10, 0.85e6, 0.005e6),
  ("resnet110", {}, 10, 1.7e6, 0.05e6),
  # torchvision model docs, num_params of resnet18/34/50 (IMAGENET1K_V1).
  ("resnet18", {}, 1000, 11_689_512, 0),
  ("resnet34", {}, 1000, 21_797_672, 0),
  ("resnet50", {}, 1000, 25_557_032, 0),
  # Keras applications MobileNet(alpha=1): 4,253,864 total of which 21,888
  # are BN moving statistics -> 4,231,976 trainable. Paper: 4.2M.
  ("mobilenet_v1", {}, 1000, 4_231_976, 0),
  # Howard et al. 2017, Table 6 (width multiplier).
  ("mobilenet_v1", {"width": 0.75}, 1000, 2.6e6, 0.05e6),
  ("mobilenet_v1", {"width": 0.5}, 1000, 1.3e6, 0.05e6),
  ("mobilenet_v1", {"width": 0.25}, 1000, 0.5e6, 0.05e6),
  # Network Slimming (Liu et al. 2017), Table 1: VGGNet (VGG-19) on CIFAR-10.
  ("vgg19", {}, 10, 20.04e6, 0.005e6),
  # Li et al. 2017 / HRank: VGG-16 with the Linear-BN-ReLU-Linear head, 14.99M.
  ("vgg16", {"head": "mlp"}, 10, 14.99e6, 0.005e6),
]


@pytest.mark.parametrize(("name", "kwargs", "num_classes", "reference", "tol"), LITERATURE)
def test_param_count_matches_literature(name, kwargs, num_classes, reference, tol) -> None:
  n = models.count_params(_abstract(name, num_classes, **kwargs))
  assert abs(n - reference) <= tol, (name, kwargs, n, reference)


def _vgg_count(cfg: list[int], num_classes: int) -> int:
  """Closed form: 3x3 bias-free convs + BN (scale, bias) + one Linear."""
  widths = [3, *cfg]
  convs = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:]))
  return convs + widths[-1] * num_classes + num_classes


def test_param_count_closed_forms() -> None:
  # Single-Linear CIFAR VGG (Network Slimming cfg): no published figure is
  # exact, so check against the arithmetic instead (VGG-16: 14,724,042).
  vgg16 = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  vgg11 = [64, 128, 256, 256, 512, 512, 512, 512]
  assert models.count_params(_abstract("vgg16")) == _vgg_count(vgg16, 10) == 14_724_042
  assert models.count_params(_abstract("vgg11")) == _vgg_count(vgg11, 10)
  # CIFAR MobileNet = ImageNet MobileNet with a 10-way instead of 1000-way Linear.
  assert models.count_params(_abstract("mobilenet_v1_cifar")) == 4_231_976 - 1024 * 990 - 990


def _wrn_count(n: int, width: int, num_classes: int) -> int:
  """Closed form of ChipNet's wide CIFAR ResNet: 3x3 stem to 16, n basic blocks per
  stage (two 3x3 convs + BNs), a 1x1 conv + BN projection at each stage's first
  block (16 -> 16w too), one Linear. Convs are bias-free; a BN has 2 params/channel."""
  total, c_in = 9 * 3 * 16 + 2 * 16, 16
  for c in (16 * width, 32 * width, 64 * width):
    total += c_in * c + 2 * c  # projection
    for i in range(n):
      total += 9 * (c_in if i == 0 else c) * c + 2 * c + 9 * c * c + 2 * c
    c_in = c
  return total + c_in * num_classes + num_classes


def test_wide_resnet_param_count_closed_form() -> None:
  # WRN-26-12, ChipNet's main CIFAR network: 4 blocks per stage, 192/384/768 channels.
  assert models.count_params(_abstract("wrn26_12")) == _wrn_count(4, 12, 10)
  assert models.count_params(_abstract("wrn26_12", 100)) == _wrn_count(4, 12, 100)
  with pytest.raises(ValueError, match="6n\\+2"):
    models.wide_resnet(25, 2, num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="shortcut"):
    models.CifarResNet(1, num_classes=10, rngs=nnx.Rngs(0), shortcut="C")


# ------------------------------------------------------------ output shapes ---


# resnet44 is built by the same code as resnet20/32/56/110; skipped for time.
# multitask_resnet returns {task: logits} on 1-channel input (tests/test_pagcp.py).
@pytest.mark.parametrize("name", [n for n in models.available() if n not in ("resnet44", "multitask_resnet")])
def test_output_shape(name: str) -> None:
  size, num_classes = (224, 1000) if name in IMAGENET else (32, 10)
  graphdef, state = nnx.split(_abstract(name, num_classes))
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  assert out.shape == (2, num_classes)


def test_imagenet_resnet_small_input_forward() -> None:
  # ImageNet ResNet on a 32x32 input: stem, max-pool and projections run.
  y = nnx.jit(lambda m, x: m(x))(_random_model("resnet18"), _x((1, 32, 32, 3)))
  assert y.shape == (1, 10) and bool(jnp.all(jnp.isfinite(y)))


# --------------------------------------------------------- real init, modes ---


def test_train_and_eval_modes() -> None:
  model = _random_model("resnet20")
  bn = model.layer1[0].bn1
  assert (bn.momentum, bn.epsilon) == (BN_MOMENTUM, BN_EPSILON) == (0.9, 1e-5)
  # ZeroPad is neither a Param nor a BatchStat (optimizers and counts skip it).
  assert len(jax.tree.leaves(nnx.state(model, ZeroPad))) == 4
  for kind in (nnx.Param, nnx.BatchStat):
    assert not any("pad_" in str(path) for path, _ in nnx.to_flat_state(nnx.state(model, kind)))

  x = _x((4, 32, 32, 3))
  stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  model.train()
  assert model.layer1[0].bn1.use_running_average is False
  y_train = model(x)
  new_stats = nnx.state(model, nnx.BatchStat)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), stats, new_stats)
  assert all(jax.tree.leaves(changed))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, nnx.state(model, nnx.Param))))
  # torch-equivalent update: running = 0.9 * running + 0.1 * batch statistic.
  batch_mean = model.conv1(x).mean(axis=(0, 1, 2))
  expected_mean = 0.9 * stats["bn1"]["mean"] + 0.1 * batch_mean
  np.testing.assert_allclose(model.bn1.mean[...], expected_mean, rtol=1e-5, atol=1e-6)
  model.eval()
  y_eval = model(x)
  assert model.layer1[0].bn1.use_running_average is True
  assert not np.allclose(y_train, y_eval)
  frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  model(x)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, frozen, nnx.state(model, nnx.BatchStat))))


def test_depthwise_conv_matches_per_channel_convolution() -> None:
  # Real init is torch's kaiming_normal_(mode="fan_out"); torch's fan_out of
  # a (C, 1, 3, 3) depthwise weight is 9 * C.
  k = np.asarray(DepthwiseConv(256, 3, rngs=nnx.Rngs(0)).kernel[...])
  assert k.shape == (3, 3, 1, 256)
  assert abs(k.std() / np.sqrt(2 / (9 * 256)) - 1) < 0.06 and abs(k.mean()) < 0.1 * k.std()

  dw = _random_model(lambda: DepthwiseConv(6, 3, stride=2, rngs=nnx.Rngs(0)))
  k = np.asarray(dw.kernel[...])
  x = _x((1, 7, 7, 6))
  y = dw(x)
  ref = jnp.concatenate(
        [
            jax.lax.conv_general_dilated(
                x[..., c : c + 1], k[..., c : c + 1], (2, 2), ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            for c in range(6)
        ],
        axis=-1,
    )  # fmt: skip
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # Fewer channels in, fewer groups: nothing stored pins the width.
  dw.kernel.set_value(dw.kernel[...][..., :4])
  assert dw(x[..., :4]).shape == (1, 4, 4, 4)


# ------------------------------------------------------- option-A shortcut ---


def test_option_a_shortcut_matches_jnp_pad() -> None:
  block = _random_model(lambda: BasicBlockA(16, 32, stride=2, rngs=nnx.Rngs(0)))
  assert block.pad_lo[...].shape == block.pad_hi[...].shape == (8,)
  x = _x((2, 8, 8, 16))
  ref_shortcut = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))
  np.testing.assert_array_equal(block.shortcut(x), ref_shortcut)
  branch = block.bn2(block.conv2(nnx.relu(block.bn1(block.conv1(x)))))
  np.testing.assert_allclose(block(x), nnx.relu(branch + ref_shortcut), rtol=1e-6, atol=1e-6)
  # Pad vectors may be sliced down to nothing.
  block.pad_lo.set_value(jnp.zeros((0,)))
  np.testing.assert_array_equal(block.shortcut(x), ref_shortcut[..., 8:])
  # Identity blocks have no pad vectors.
  assert nnx.eval_shape(lambda: BasicBlockA(16, 16, 1, rngs=nnx.Rngs(0))).pad_lo is None


# ----------------------------------------------------- widths from arrays ---


def _check_slimmed(model: nnx.Module, cuts, zero_bns, x: jax.Array) -> None:
  graphdef, state = nnx.split(model)
  slim = nnx.merge(graphdef, _slice(state, cuts))
  slim.eval()
  _zero_bn_channels(model, zero_bns)
  expected = model(x)
  got = slim(x)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Traceable with the new widths too (what the pruning core will do).
  out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(x), nnx.split(slim)[1])
  assert out.shape == expected.shape


def test_resnet20_slim_inner_conv() -> None:
  drop = [3, 7, 11]
  b = ("layer1", 0)
  cuts = [(b + ("conv1", "kernel"), 3, drop), *_bn_leaves(b + ("bn1",), drop),
            (b + ("conv2", "kernel"), 2, drop)]  # fmt: skip
  model = _random_model("resnet20")
  _check_slimmed(model, cuts, [(b + ("bn1",), drop)], _x((2, 32, 32, 3)))


def test_resnet20_slim_residual_stream_and_zero_pads() -> None:
  """Drop stage-2 stream channel 2 (from layer2[0].pad_lo) and stage-3 channel 60
  (from layer3[0].pad_hi).

  Option A maps stage-2 channel j to stage-3 channel len(layer3[0].pad_lo) + j
  = 16 + j, so stage-3 channel 18 goes too.
  """
  s2, s3 = [2], [18, 60]
  cuts, zero_bns = [], []
  cuts.append((("layer2", 0, "pad_lo"), 0, s2))
  cuts.append((("layer3", 0, "pad_lo"), 0, []))
  cuts.append((("layer3", 0, "pad_hi"), 0, [60 - 48]))
  for stage, drop in (("layer2", s2), ("layer3", s3)):
    for i in range(3):
      cuts += [
        ((stage, i, "conv2", "kernel"), 3, drop),
        *_bn_leaves((stage, i, "bn2"), drop),
        ((stage, i, "out_index"), 0, drop),
      ]
      zero_bns.append(((stage, i, "bn2"), drop))
      if i > 0:  # blocks fed by the stream of this stage
        cuts += [((stage, i, "conv1", "kernel"), 2, drop), ((stage, i, "in_index"), 0, drop)]
  cuts += [(("layer3", 0, "conv1", "kernel"), 2, s2), (("layer3", 0, "in_index"), 0, s2)]
  cuts += [(("fc", "kernel"), 0, s3), (("fc_index",), 0, s3)]
  model = _random_model("resnet20")
  _check_slimmed(model, cuts, zero_bns, _x((2, 32, 32, 3)))


def test_mobilenet_cifar_slim_pointwise_and_depthwise() -> None:
  drop = [0, 5, 100, 255]  # output channels of blocks[3] (256 wide)
  b3, b4 = ("blocks", 3), ("blocks", 4)
  cuts = [(b3 + ("pw_conv", "kernel"), 3, drop), *_bn_leaves(b3 + ("pw_bn",), drop),
            (b4 + ("dw_conv", "kernel"), 3, drop), *_bn_leaves(b4 + ("dw_bn",), drop),
            (b4 + ("pw_conv", "kernel"), 2, drop)]  # fmt: skip
  model = _random_model("mobilenet_v1_cifar")
  # Zeroing the pointwise output is not enough: block 4's depthwise BN would
  # turn the zero channels into constants, so zero that BN's channels too.
  zero_bns = [(b3 + ("pw_bn",), drop), (b4 + ("dw_bn",), drop)]
  _check_slimmed(model, cuts, zero_bns, _x((2, 32, 32, 3)))
