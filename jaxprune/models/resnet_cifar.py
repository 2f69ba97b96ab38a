"""CIFAR ResNets of He et al. (2016), Sec. 4.2: ResNet-20/32/44/56/110, and the
wide variant ChipNet uses (WRN-26-12: projection shortcuts, stages 16w/32w/64w).

A 3x3 conv stem with 16 channels, three stages of ``n`` BasicBlocks with
16/32/64 channels (the first block of stages 2 and 3 has stride 2), global
average pooling and one Linear layer; depth = 6n + 2. Shortcuts are
parameter-free "option A": identity, or strided subsampling plus zero
channels when a block changes width.

Structure (attribute paths as they appear in ``nnx.split`` state)::

    conv1, bn1                      stem
    layer{1,2,3}[i].conv1/bn1       first conv of block i
    layer{1,2,3}[i].conv2/bn2       second conv of block i
    layer{2,3}[0].pad_lo/pad_hi     ZeroPad vectors of the option-A shortcut
    stem_index, layer*[i].in_index/out_index, fc_index
                                    ChannelIndex vectors: where a block reads
                                    and writes its residual stream (0..n-1
                                    until residual branches are slimmed)
    fc                              classifier

The residual stream of stage s+1 is ``[pad_lo | stream of stage s | pad_hi]``,
so stage-s stream channel j continues as stage-(s+1) channel
``len(pad_lo) + j``: residual channels are coupled *across* stages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.models.layers import (
  ZeroPad,
  batch_norm,
  channel_index,
  conv,
  expand_channels,
  gather_channels,
  global_avg_pool,
  linear,
  residual_stages,
)
from jaxprune.models.resnet_imagenet import BasicBlock

__all__ = ["BasicBlockA", "CifarResNet", "cifar_resnet", "wide_resnet"]

STAGE_WIDTHS = (16, 32, 64)


class BasicBlockA(nnx.Module):
  """Two 3x3 conv-BN layers plus an option-A (parameter-free) shortcut.

  ``avg=False`` (He et al.): the shortcut subsamples ``x[:, ::s, ::s]`` and
  pads zero channels on both sides. ``avg=True`` (FTWT's official code):
  2x2 average pooling, zero channels after the stream's, and no gradient
  through the shortcut (it reads ``x.data`` there).

  Example:
      >>> blk = BasicBlockA(16, 32, stride=2, rngs=nnx.Rngs(0))
      >>> blk(jnp.ones((1, 8, 8, 16))).shape
      (1, 4, 4, 32)
  """

  def __init__(self, in_planes: int, planes: int, stride: int = 1, *, rngs: nnx.Rngs, avg: bool = False) -> None:
    self.conv1 = conv(in_planes, planes, 3, stride, rngs=rngs)
    self.bn1 = batch_norm(planes, rngs=rngs)
    self.conv2 = conv(planes, planes, 3, 1, rngs=rngs)
    self.bn2 = batch_norm(planes, rngs=rngs)
    self.in_index = channel_index(in_planes)
    self.out_index = channel_index(planes)
    self.stride = stride
    self.avg = avg
    if stride != 1 or in_planes != planes:
      # Zero channels as array shapes, not jnp.pad widths: slimming can
      # slice these vectors, whereas static pad ints would go stale.
      lo = 0 if avg else (planes - in_planes) // 2
      self.pad_lo: ZeroPad | None = ZeroPad(jnp.zeros((lo,), jnp.float32))
      self.pad_hi: ZeroPad | None = ZeroPad(jnp.zeros((planes - in_planes - lo,), jnp.float32))
    else:
      self.pad_lo = None
      self.pad_hi = None

  def shortcut(self, x: jax.Array) -> jax.Array:
    """Identity, or ``x[:, ::s, ::s]`` with zero channels on both sides."""
    if self.pad_lo is None or self.pad_hi is None:
      return x
    if self.avg:
      x = jax.lax.stop_gradient(x)
      if self.stride != 1:
        s = self.stride
        x = nnx.avg_pool(x, (s, s), strides=(s, s))
    elif self.stride != 1:
      x = x[:, :: self.stride, :: self.stride, :]
    # "* 0": the vectors are zeros; saying so lets jaxprune.trace see that
    # these channels are dead until a residual branch writes them.
    lo = self.pad_lo[...].astype(x.dtype) * 0
    hi = self.pad_hi[...].astype(x.dtype) * 0
    batch_spatial = x.shape[:-1]
    return jnp.concatenate(
      [
        jnp.broadcast_to(lo, batch_spatial + lo.shape),
        x,
        jnp.broadcast_to(hi, batch_spatial + hi.shape),
      ],
      axis=-1,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    out = nnx.relu(self.bn1(self.conv1(gather_channels(x, self.in_index))))
    out = expand_channels(self.bn2(self.conv2(out)), self.out_index)
    return nnx.relu(out + self.shortcut(x))


class CifarResNet(nnx.Module):
  """CIFAR ResNet with ``blocks_per_stage`` BasicBlocks per stage (depth 6n+2).

  ``shortcut="A"``: parameter-free zero-padding shortcuts (He et al.);
  ``"A_avg"``: FTWT's variant (average pooling, zeros after the stream, no
  gradient through the shortcut); ``"B"``: 1x1 conv + BN projections
  wherever the shape changes.

  Example:
      >>> m = CifarResNet(3, num_classes=10, rngs=nnx.Rngs(0))  # ResNet-20
      >>> m(jnp.ones((2, 32, 32, 3))).shape
      (2, 10)
  """

  def __init__(
    self,
    blocks_per_stage: int,
    *,
    num_classes: int,
    rngs: nnx.Rngs,
    in_channels: int = 3,
    widths: tuple[int, int, int] = STAGE_WIDTHS,
    stem: int | None = None,
    shortcut: str = "A",
  ) -> None:
    if shortcut not in ("A", "A_avg", "B"):
      raise ValueError(
        f"shortcut must be 'A' (zero padding), 'A_avg' (FTWT's average-pooled "
        f"zero padding) or 'B' (1x1 conv + BN), got {shortcut!r}"
      )
    block = {"A": BasicBlockA, "A_avg": functools.partial(BasicBlockA, avg=True), "B": BasicBlock}[shortcut]
    stem = widths[0] if stem is None else stem
    self.conv1 = conv(in_channels, stem, 3, 1, rngs=rngs)
    self.bn1 = batch_norm(stem, rngs=rngs)
    self.stem_index = channel_index(stem)
    self.layer1, self.layer2, self.layer3 = residual_stages(block, stem, widths, blocks_per_stage, rngs=rngs)
    self.fc_index = channel_index(widths[-1])
    self.fc = linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = expand_channels(nnx.relu(self.bn1(self.conv1(x))), self.stem_index)
    for stage in (self.layer1, self.layer2, self.layer3):
      for block in stage:
        x = block(x)
    return self.fc(gather_channels(global_avg_pool(x), self.fc_index))


def cifar_resnet(depth: int, *, num_classes: int, rngs: nnx.Rngs, **kwargs) -> CifarResNet:
  """Build the depth-``depth`` CIFAR ResNet (depth = 6n + 2, e.g. 20, 56).

  Example:
      >>> cifar_resnet(56, num_classes=10, rngs=nnx.Rngs(0)).layer1.__len__()
      9
  """
  if (depth - 2) % 6 != 0 or depth < 8:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2 (n >= 1), got {depth}")
  return CifarResNet((depth - 2) // 6, num_classes=num_classes, rngs=rngs, **kwargs)


def wide_resnet(depth: int, width: int, *, num_classes: int, rngs: nnx.Rngs, **kwargs) -> CifarResNet:
  """The wide CIFAR ResNet of ChipNet's code (``ResNetCifar(BasicBlock, [n]*3, width)``):
  a 16-channel stem, stages of 16w/32w/64w channels, post-activation basic
  blocks with projection shortcuts (every stage needs one, 16 -> 16w too).
  WRN-26-12: ``wide_resnet(26, 12, ...)``, stages 192/384/768.

  Example:
      >>> m = wide_resnet(26, 12, num_classes=10, rngs=nnx.Rngs(0))
      >>> m.layer3[0].conv1.kernel.shape
      (3, 3, 384, 768)
  """
  w = (16 * width, 32 * width, 64 * width)
  return cifar_resnet(depth, num_classes=num_classes, rngs=rngs, widths=w, stem=16, shortcut="B", **kwargs)
