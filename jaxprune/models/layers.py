"""Small building blocks shared by the model zoo.

Every module here computes its channel counts from the *shapes of its arrays*
at call time, never from Python ints stored at construction. This is what lets
the pruning core slim a model by slicing ``nnx.split`` state and re-merging it
with the unchanged graphdef.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

__all__ = [
  "BN_EPSILON",
  "BN_MOMENTUM",
  "ChannelIndex",
  "ConvBN",
  "DepthwiseConv",
  "ZeroPad",
  "batch_norm",
  "conv",
  "channel_index",
  "conv_kernel_init",
  "expand_channels",
  "gather_channels",
  "global_avg_pool",
  "linear",
  "linear_kernel_init",
  "residual_stages",
]

# PyTorch's BatchNorm momentum 0.1 weights the *new* batch statistic; flax's
# momentum weights the *old* running value, hence 0.9 for the same behaviour.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e. an
# untruncated normal with variance 2 / (kh * kw * out_channels). With HWIO
# kernels jax's fan_out is exactly that product (out axis -1).
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
# (Biases start at zero here rather than torch's uniform; it does not matter
# for training from scratch and keeps the init deterministic per kernel.)
linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv(
  in_features: int,
  out_features: int,
  kernel_size: int,
  stride: int = 1,
  *,
  padding: int | None = None,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """Bias-free ``nnx.Conv`` with PyTorch-style symmetric padding.

  ``padding`` defaults to ``kernel_size // 2`` on every side, which matches
  ``nn.Conv2d(padding=k//2)`` also for stride 2 (jax's ``'SAME'`` would pad
  asymmetrically there and break weight porting).

  Example:
      >>> c = conv(3, 16, 3, rngs=nnx.Rngs(0))
      >>> c(jnp.ones((1, 8, 8, 3))).shape
      (1, 8, 8, 16)
  """
  p = kernel_size // 2 if padding is None else padding
  return nnx.Conv(
    in_features,
    out_features,
    kernel_size=(kernel_size, kernel_size),
    strides=(stride, stride),
    padding=((p, p), (p, p)),
    use_bias=False,
    kernel_init=conv_kernel_init,
    rngs=rngs,
  )


def batch_norm(num_features: int, *, rngs: nnx.Rngs, zero_init: bool = False) -> nnx.BatchNorm:
  """``nnx.BatchNorm`` with torch-equivalent momentum/epsilon.

  ``zero_init=True`` starts the scale at 0 (torchvision's
  ``zero_init_residual`` for the last BN of a residual branch).

  Example:
      >>> bn = batch_norm(16, rngs=nnx.Rngs(0))
      >>> bn.momentum, bn.epsilon
      (0.9, 1e-05)
  """
  return nnx.BatchNorm(
    num_features,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
    rngs=rngs,
  )


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  """``nnx.Linear`` with PyTorch's default kernel init and a zero bias.

  Example:
      >>> linear(64, 10, rngs=nnx.Rngs(0)).kernel.shape
      (64, 10)
  """
  return nnx.Linear(
    in_features,
    out_features,
    kernel_init=linear_kernel_init,
    bias_init=nnx.initializers.zeros,
    rngs=rngs,
  )


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of an NHWC tensor -> (N, C)."""
  return jnp.mean(x, axis=(1, 2))


def residual_stages(
  block: Callable[..., nnx.Module],
  in_planes: int,
  widths: Sequence[int],
  blocks_per_stage: int,
  *,
  rngs: nnx.Rngs,
) -> list[nnx.List]:
  """One ``nnx.List`` of ``blocks_per_stage`` blocks per width in ``widths``.

  ``block(in_planes, planes, stride, rngs=rngs)`` builds a block; the first
  block of every stage after the first has stride 2. Blocks are built in
  order, so the rng draws (and the initial weights) follow the network's order.

  Example:
      >>> from jaxprune.models.resnet_cifar import BasicBlockA
      >>> stages = residual_stages(BasicBlockA, 16, (16, 32), 2, rngs=nnx.Rngs(0))
      >>> [len(s) for s in stages]
      [2, 2]
  """
  stages = []
  for s, planes in enumerate(widths):
    blocks = []
    for i in range(blocks_per_stage):
      stride = 2 if (s > 0 and i == 0) else 1
      blocks.append(block(in_planes, planes, stride, rngs=rngs))
      in_planes = planes
    stages.append(nnx.List(blocks))
  return stages


class ConvBN(nnx.Module):
  """``conv`` followed by ``bn`` (no activation; callers add ReLU).

  Attributes ``conv`` (``nnx.Conv``) and ``bn`` (``nnx.BatchNorm``).

  Example:
      >>> m = ConvBN(3, 8, 3, rngs=nnx.Rngs(0))
      >>> m(jnp.ones((2, 4, 4, 3))).shape
      (2, 4, 4, 8)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int,
    stride: int = 1,
    *,
    padding: int | None = None,
    rngs: nnx.Rngs,
  ) -> None:
    self.conv = conv(in_features, out_features, kernel_size, stride, padding=padding, rngs=rngs)
    self.bn = batch_norm(out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class ZeroPad(nnx.Variable):
  """A non-trainable vector of zeros whose *length* is a channel count.

  Used for option-A residual shortcuts: the number of zero channels padded
  onto the shortcut is the shape of this array, so slicing it (like any
  per-channel leaf) keeps a slimmed model consistent. Being neither
  ``nnx.Param`` nor ``nnx.BatchStat``, it is skipped by optimizers
  (``nnx.Param`` filters) and by :func:`jaxprune.models.count_params`.
  """


class ChannelIndex(nnx.Variable):
  """Channel positions (int32) where a residual block reads or writes its stream.

  In a dense model it is ``0..n-1``. When the pruning core slims a block's
  residual branch (``jaxprune.trace(..., branches=True)``), the branch
  computes fewer channels than its stream carries, and these vectors, sliced
  and renumbered by ``jaxprune.slim``, say where they go: a consumer reads
  ``x[..., index]`` (:func:`gather_channels`), a producer's output is spread
  into the stream (:func:`expand_channels`). Neither ``nnx.Param`` nor
  ``nnx.BatchStat``: optimizers skip it.
  """


def channel_index(n: int) -> ChannelIndex:
  """``ChannelIndex(0..n-1)``."""
  return ChannelIndex(jnp.arange(n, dtype=jnp.int32))


def gather_channels(x: jax.Array, index: ChannelIndex) -> jax.Array:
  """``x[..., index]``: the stream channels a consumer reads.

  With every channel (the dense model) it is ``x`` itself, written as
  ``x + 0 * index`` so that a traced jaxpr shows where the vector belongs.

  Example:
      >>> gather_channels(jnp.ones((1, 2, 2, 4)), channel_index(4)).shape
      (1, 2, 2, 4)
  """
  idx = index[...]
  if idx.shape[0] == x.shape[-1]:
    return x + (idx * 0).astype(x.dtype)
  return x.at[..., idx].get(mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True)


def expand_channels(b: jax.Array, index: ChannelIndex) -> jax.Array:
  """A branch's channels spread to the stream's width: stream channel ``j`` is
  ``b[..., index[j]]``, or 0 where ``index[j] == b.shape[-1]`` (the branch
  does not compute it).

  With every channel (the dense model) it is ``b`` itself (``b + 0 * index``).

  Example:
      >>> expand_channels(jnp.ones((1, 2, 2, 4)), channel_index(4)).shape
      (1, 2, 2, 4)
  """
  idx = index[...]
  if idx.shape[0] == b.shape[-1]:
    return b + (idx * 0).astype(b.dtype)
  padded = jnp.concatenate([b, jnp.zeros(b.shape[:-1] + (1,), b.dtype)], axis=-1)
  return padded.at[..., idx].get(mode="promise_in_bounds")


class DepthwiseConv(nnx.Module):
  """Depthwise 2-D convolution, groups taken from the input at call time.

  ``nnx.Conv`` stores ``feature_group_count`` as a Python int, which goes
  stale when the pruning core removes channels; here the kernel has shape
  ``(kh, kw, 1, C)`` and ``feature_group_count = x.shape[-1]``.

  Example:
      >>> dw = DepthwiseConv(8, 3, stride=2, rngs=nnx.Rngs(0))
      >>> dw.kernel.shape, dw(jnp.ones((1, 8, 8, 8))).shape
      ((3, 3, 1, 8), (1, 4, 4, 8))
  """

  def __init__(
    self,
    channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    *,
    padding: int | None = None,
    rngs: nnx.Rngs,
  ) -> None:
    kh, kw = _pair(kernel_size)
    # fan_out of an HWIO (kh, kw, 1, C) kernel is kh*kw*C, as torch
    # computes for its (C, 1, kh, kw) depthwise weight.
    self.kernel = nnx.Param(conv_kernel_init(rngs.params(), (kh, kw, 1, channels), jnp.float32))
    ph, pw = (kh // 2, kw // 2) if padding is None else _pair(padding)
    self.strides = _pair(stride)
    self.padding = ((ph, ph), (pw, pw))

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = promote_dtype((x, self.kernel[...]), dtype=None)
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=self.strides,
      padding=self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
    )
