"""MobileNetV1 (Howard et al. 2017) for ImageNet and its common CIFAR port.

ImageNet: 3x3/2 conv stem (32 ch), 13 depthwise-separable blocks
(dw3x3-BN-ReLU, pw1x1-BN-ReLU), global average pooling, Linear(1024, C);
``width`` is the width multiplier alpha (channels ``int(c * alpha)`` as in
Keras). CIFAR port (as in kuangliu/pytorch-cifar): the stem has stride 1
(the blocks keep their strides), so a 32x32 input ends at 2x2 before the
global pool, where the ImageNet model ends at 7x7 for 224x224.

Structure::

    conv1, bn1                                stem
    blocks[i].dw_conv (DepthwiseConv), dw_bn  depthwise part of block i
    blocks[i].pw_conv (nnx.Conv 1x1), pw_bn   pointwise part of block i
    fc                                        classifier

Depthwise channels are tied: ``blocks[i].dw_conv`` / ``dw_bn`` /
``blocks[i].pw_conv`` input axis all index the output channels of the
previous pointwise conv (or the stem for i = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jaxprune.models.layers import DepthwiseConv, batch_norm, conv, global_avg_pool, linear

__all__ = ["BLOCKS_IMAGENET", "DepthwiseSeparable", "MobileNetV1"]

# (output channels, depthwise stride) of the 13 separable blocks.
BLOCKS_IMAGENET: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class DepthwiseSeparable(nnx.Module):
  """dw3x3-BN-ReLU then pw1x1-BN-ReLU.

  Example:
      >>> import jax.numpy as jnp
      >>> blk = DepthwiseSeparable(32, 64, stride=2, rngs=nnx.Rngs(0))
      >>> blk(jnp.ones((1, 8, 8, 32))).shape
      (1, 4, 4, 64)
  """

  def __init__(self, in_planes: int, out_planes: int, stride: int = 1, *, rngs: nnx.Rngs) -> None:
    self.dw_conv = DepthwiseConv(in_planes, 3, stride, rngs=rngs)
    self.dw_bn = batch_norm(in_planes, rngs=rngs)
    self.pw_conv = conv(in_planes, out_planes, 1, 1, padding=0, rngs=rngs)
    self.pw_bn = batch_norm(out_planes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.dw_bn(self.dw_conv(x)))
    return nnx.relu(self.pw_bn(self.pw_conv(x)))


class MobileNetV1(nnx.Module):
  """MobileNetV1 with width multiplier.

  Example:
      >>> import jax.numpy as jnp
      >>> m = MobileNetV1(num_classes=10, rngs=nnx.Rngs(0), cifar=True, width=0.25)
      >>> m(jnp.ones((1, 32, 32, 3))).shape
      (1, 10)
  """

  def __init__(
    self,
    *,
    num_classes: int,
    rngs: nnx.Rngs,
    width: float = 1.0,
    cifar: bool = False,  # stride-1 stem for 32x32 inputs
    in_channels: int = 3,
    blocks: Sequence[tuple[int, int]] | None = None,
  ) -> None:
    if width <= 0:
      raise ValueError(f"width multiplier must be positive, got {width}")
    if blocks is None:
      blocks = BLOCKS_IMAGENET

    def w(c: int) -> int:
      return max(1, int(c * width))

    c = w(32)
    self.conv1 = conv(in_channels, c, 3, 1 if cifar else 2, rngs=rngs)
    self.bn1 = batch_norm(c, rngs=rngs)
    layers = []
    for out, stride in blocks:
      layers.append(DepthwiseSeparable(c, w(out), stride, rngs=rngs))
      c = w(out)
    self.blocks = nnx.List(layers)
    self.fc = linear(c, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    for block in self.blocks:
      x = block(x)
    return self.fc(global_avg_pool(x))
