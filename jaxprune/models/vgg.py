"""CIFAR VGG with BatchNorm, as used by channel-pruning papers.

Configurations are Network Slimming's (Liu et al. 2017, ``defaultcfg``):
conv3x3-BN-ReLU layers with 2x2 max-pools in between, *no* pool after the
last conv block but global average pooling (== their ``AvgPool2d(2)`` at
32x32), then a single ``Linear(512, num_classes)``.

``head="mlp"`` instead uses the classifier of Li et al. 2017 ("Pruning Filters
for Efficient ConvNets", also HRank etc.): ``Linear(512, 512)-BN-ReLU-Linear``.
That variant is the one behind the frequently quoted "VGG-16: 14.99M params";
the single-Linear default has 14.72M.

Structure::

    features[i].conv / features[i].bn      i-th conv layer (ConvBN)
    pool_after                             static tuple[bool]: max-pool after layer i
    fc1, bn_fc1                            only for head="mlp"
    fc                                     classifier
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
from flax import nnx

from jaxprune.models.layers import ConvBN, batch_norm, global_avg_pool, linear

__all__ = ["CFGS", "VGG", "vgg"]

CfgItem = int | Literal["M"]

CFGS: dict[int, tuple[CfgItem, ...]] = {
  11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
  13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
  16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
  19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}


class VGG(nnx.Module):
  """VGG-BN for small images, built from a cfg list (ints = conv widths, "M" = max-pool).

  A custom ``cfg`` gives the thin architectures found by pruning (e.g. to
  train a pruned layout from scratch).

  Example:
      >>> import jax.numpy as jnp
      >>> m = VGG(CFGS[11], num_classes=10, rngs=nnx.Rngs(0))
      >>> m(jnp.ones((2, 32, 32, 3))).shape
      (2, 10)
  """

  def __init__(
    self,
    cfg: Sequence[CfgItem],
    *,
    num_classes: int,
    rngs: nnx.Rngs,
    in_channels: int = 3,
    head: Literal["linear", "mlp"] = "linear",
  ) -> None:
    if head not in ("linear", "mlp"):
      raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
    layers: list[ConvBN] = []
    pool_after: list[bool] = []
    c = in_channels
    for item in cfg:
      if item == "M":
        if not layers:
          raise ValueError("cfg may not start with 'M'")
        pool_after[-1] = True
        continue
      layers.append(ConvBN(c, int(item), 3, 1, rngs=rngs))
      pool_after.append(False)
      c = int(item)
    self.features = nnx.List(layers)
    self.pool_after = tuple(pool_after)
    self.head = head
    if head == "mlp":
      self.fc1 = linear(c, 512, rngs=rngs)
      self.bn_fc1 = batch_norm(512, rngs=rngs)
      c = 512
    self.fc = linear(c, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer, pool in zip(self.features, self.pool_after):
      x = nnx.relu(layer(x))
      if pool:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = global_avg_pool(x)
    if self.head == "mlp":
      x = nnx.relu(self.bn_fc1(self.fc1(x)))
    return self.fc(x)


def vgg(depth: int, *, num_classes: int, rngs: nnx.Rngs, **kwargs) -> VGG:
  """Build CIFAR VGG-``depth`` (11, 13, 16, 19); ``cfg=`` overrides the widths.

  Example:
      >>> len(vgg(16, num_classes=10, rngs=nnx.Rngs(0)).features)
      13
  """
  cfg = kwargs.pop("cfg", None)
  if cfg is None:
    if depth not in CFGS:
      raise ValueError(f"VGG depth must be one of {sorted(CFGS)}, got {depth}")
    cfg = CFGS[depth]
  return VGG(cfg, num_classes=num_classes, rngs=rngs, **kwargs)
