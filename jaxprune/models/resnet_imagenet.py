"""ImageNet ResNet-18/34/50 (He et al. 2016), laid out like torchvision.

7x7/2 conv stem + 3x3/2 max-pool, four stages (64/128/256/512 base widths)
of BasicBlocks (18, 34) or Bottlenecks (50, expansion 4, stride on the 3x3
conv as in torchvision "v1.5"), projection shortcuts ("option B": 1x1 conv +
BN) wherever shape changes, global average pooling and one Linear layer.

Attribute names follow torchvision so a torch ``state_dict`` maps 1:1::

    conv1, bn1                          stem
    layer{1..4}[i].conv{1,2[,3]}        block convs (nnx.Conv)
    layer{1..4}[i].bn{1,2[,3]}          their BatchNorms
    layer{1..4}[i].downsample.conv/bn   projection shortcut (or None)
    stem_index, layer*[i].in_index/out_index/downsample_index, fc_index
                                        ChannelIndex vectors: where a block
                                        reads and writes its residual stream
    fc                                  classifier
"""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx

from jaxprune.models.layers import (
  ConvBN,
  batch_norm,
  channel_index,
  conv,
  expand_channels,
  gather_channels,
  global_avg_pool,
  linear,
)

__all__ = ["BasicBlock", "Bottleneck", "ImageNetResNet", "imagenet_resnet"]

STAGE_WIDTHS = (64, 128, 256, 512)
DEPTHS: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
}


def _downsample(in_planes: int, out_planes: int, stride: int, rngs: nnx.Rngs) -> ConvBN | None:
  if stride == 1 and in_planes == out_planes:
    return None
  return ConvBN(in_planes, out_planes, 1, stride, padding=0, rngs=rngs)


def _indices(block: nnx.Module, in_planes: int, out_planes: int) -> None:
  """The block's ChannelIndex vectors: its input (read by conv1 and the
  projection), its branch output, and the projection's output."""
  block.in_index = channel_index(in_planes)
  block.out_index = channel_index(out_planes)
  block.downsample_index = None if block.downsample is None else channel_index(out_planes)


def _identity(block: nnx.Module, x: jax.Array, h: jax.Array) -> jax.Array:
  """The shortcut: the stream itself, or the projection of the gathered input."""
  if block.downsample is None:
    return x
  return expand_channels(block.downsample(h), block.downsample_index)


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with identity or projection shortcut.

  Example:
      >>> import jax.numpy as jnp
      >>> blk = BasicBlock(64, 128, stride=2, rngs=nnx.Rngs(0))
      >>> blk(jnp.ones((1, 8, 8, 64))).shape
      (1, 4, 4, 128)
  """

  expansion = 1

  def __init__(
    self,
    in_planes: int,
    planes: int,
    stride: int = 1,
    *,
    rngs: nnx.Rngs,
    zero_init_residual: bool = False,
  ) -> None:
    self.conv1 = conv(in_planes, planes, 3, stride, rngs=rngs)
    self.bn1 = batch_norm(planes, rngs=rngs)
    self.conv2 = conv(planes, planes, 3, 1, rngs=rngs)
    self.bn2 = batch_norm(planes, rngs=rngs, zero_init=zero_init_residual)
    self.downsample = _downsample(in_planes, planes, stride, rngs)
    _indices(self, in_planes, planes)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = gather_channels(x, self.in_index)
    out = nnx.relu(self.bn1(self.conv1(h)))
    out = expand_channels(self.bn2(self.conv2(out)), self.out_index)
    return nnx.relu(out + _identity(self, x, h))


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand (x4), identity/projection shortcut.

  Example:
      >>> import jax.numpy as jnp
      >>> blk = Bottleneck(64, 64, stride=1, rngs=nnx.Rngs(0))
      >>> blk(jnp.ones((1, 8, 8, 64))).shape
      (1, 8, 8, 256)
  """

  expansion = 4

  def __init__(
    self,
    in_planes: int,
    planes: int,
    stride: int = 1,
    *,
    rngs: nnx.Rngs,
    zero_init_residual: bool = False,
  ) -> None:
    out_planes = planes * self.expansion
    self.conv1 = conv(in_planes, planes, 1, 1, padding=0, rngs=rngs)
    self.bn1 = batch_norm(planes, rngs=rngs)
    self.conv2 = conv(planes, planes, 3, stride, rngs=rngs)
    self.bn2 = batch_norm(planes, rngs=rngs)
    self.conv3 = conv(planes, out_planes, 1, 1, padding=0, rngs=rngs)
    self.bn3 = batch_norm(out_planes, rngs=rngs, zero_init=zero_init_residual)
    self.downsample = _downsample(in_planes, out_planes, stride, rngs)
    _indices(self, in_planes, out_planes)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = gather_channels(x, self.in_index)
    out = nnx.relu(self.bn1(self.conv1(h)))
    out = nnx.relu(self.bn2(self.conv2(out)))
    out = expand_channels(self.bn3(self.conv3(out)), self.out_index)
    return nnx.relu(out + _identity(self, x, h))


class ImageNetResNet(nnx.Module):
  """torchvision-style ResNet.

  Example:
      >>> import jax.numpy as jnp
      >>> m = ImageNetResNet("basic", (2, 2, 2, 2), num_classes=10, rngs=nnx.Rngs(0))
      >>> m(jnp.ones((1, 64, 64, 3))).shape
      (1, 10)
  """

  def __init__(
    self,
    block: Literal["basic", "bottleneck"],
    blocks_per_stage: tuple[int, int, int, int],
    *,
    num_classes: int,
    rngs: nnx.Rngs,
    in_channels: int = 3,
    zero_init_residual: bool = False,
  ) -> None:
    block_cls = BasicBlock if block == "basic" else Bottleneck
    self.conv1 = conv(in_channels, 64, 7, 2, padding=3, rngs=rngs)
    self.bn1 = batch_norm(64, rngs=rngs)
    self.stem_index = channel_index(64)
    in_planes = 64
    stages = []
    for s, (planes, n) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
      blocks = []
      for i in range(n):
        stride = 2 if (s > 0 and i == 0) else 1
        blocks.append(block_cls(in_planes, planes, stride, rngs=rngs, zero_init_residual=zero_init_residual))
        in_planes = planes * block_cls.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.fc_index = channel_index(in_planes)
    self.fc = linear(in_planes, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = expand_channels(x, self.stem_index)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return self.fc(gather_channels(global_avg_pool(x), self.fc_index))


def imagenet_resnet(depth: int, *, num_classes: int, rngs: nnx.Rngs, **kwargs) -> ImageNetResNet:
  """Build torchvision's ResNet-``depth`` (18, 34, 50, 101 or 152).

  Example:
      >>> imagenet_resnet(50, num_classes=1000, rngs=nnx.Rngs(0)).fc.kernel.shape
      (2048, 1000)
  """
  if depth not in DEPTHS:
    raise ValueError(f"ImageNet ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
  block, layout = DEPTHS[depth]
  return ImageNetResNet(block, layout, num_classes=num_classes, rngs=rngs, **kwargs)
