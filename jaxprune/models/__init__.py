"""Model zoo: CIFAR/ImageNet ResNets, CIFAR VGG-BN and MobileNetV1 in Flax NNX.

All models take NHWC float inputs and return logits; ``model.train()`` /
``model.eval()`` switch BatchNorm between batch and running statistics.
Forward passes derive every channel count from array shapes, so a model can
be slimmed by slicing its ``nnx.split`` state and ``nnx.merge``-ing it again.

Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from jaxprune import models
    >>> m = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
    >>> m.eval()
    >>> m(jnp.ones((1, 32, 32, 3))).shape
    (1, 10)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jaxprune.models.layers import ConvBN, DepthwiseConv, ZeroPad
from jaxprune.models.mobilenet import DepthwiseSeparable, MobileNetV1
from jaxprune.models.multitask import MultitaskNet, multitask_resnet
from jaxprune.models.resnet_cifar import BasicBlockA, CifarResNet, cifar_resnet, wide_resnet
from jaxprune.models.resnet_imagenet import BasicBlock, Bottleneck, ImageNetResNet, imagenet_resnet
from jaxprune.models.vgg import VGG, vgg

__all__ = [
  "VGG",
  "BasicBlock",
  "BasicBlockA",
  "Bottleneck",
  "CifarResNet",
  "ConvBN",
  "DepthwiseConv",
  "DepthwiseSeparable",
  "ImageNetResNet",
  "MobileNetV1",
  "MultitaskNet",
  "ZeroPad",
  "available",
  "count_params",
  "create",
  "wide_resnet",
]

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
  "vgg11": functools.partial(vgg, 11),
  "vgg13": functools.partial(vgg, 13),
  "vgg16": functools.partial(vgg, 16),
  "vgg19": functools.partial(vgg, 19),
  "resnet20": functools.partial(cifar_resnet, 20),
  "resnet32": functools.partial(cifar_resnet, 32),
  "resnet44": functools.partial(cifar_resnet, 44),
  "resnet56": functools.partial(cifar_resnet, 56),
  "resnet110": functools.partial(cifar_resnet, 110),
  "wrn26_12": functools.partial(wide_resnet, 26, 12),
  "resnet18": functools.partial(imagenet_resnet, 18),
  "resnet34": functools.partial(imagenet_resnet, 34),
  "resnet50": functools.partial(imagenet_resnet, 50),
  "mobilenet_v1": functools.partial(MobileNetV1, cifar=False),
  "mobilenet_v1_cifar": functools.partial(MobileNetV1, cifar=True),
  "multitask_resnet": multitask_resnet,  # num_classes={task: n}; returns {task: logits}
}


def available() -> list[str]:
  """Sorted names accepted by :func:`create`.

  Example:
      >>> "resnet56" in available()
      True
  """
  return sorted(_REGISTRY)


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Instantiate model ``name`` (see :func:`available`).

  Extra keyword arguments go to the model class, e.g. ``width=0.5`` for the
  MobileNets, ``head="mlp"`` or ``cfg=[...]`` for VGG, ``in_channels=1``
  for all, ``zero_init_residual=True`` for the ImageNet ResNets.

  Example:
      >>> m = create("mobilenet_v1", num_classes=1000, rngs=nnx.Rngs(0), width=0.5)
      >>> m.fc.kernel.shape
      (512, 1000)

  Raises:
      ValueError: ``name`` is unknown; the message lists the valid names.
  """
  try:
    builder = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available())}") from None
  from jaxprune import compilation_cache
  from jaxprune.models import initialise

  compilation_cache.enable()
  # The same values as `builder(...)` run eagerly, drawn in a few programs instead
  # of one compiled program per kernel shape (see initialise.py).
  return initialise.create(lambda r: builder(num_classes=num_classes, rngs=r, **kwargs), rngs)


def count_params(model: nnx.Module) -> int:
  """Number of ``nnx.Param`` elements (BatchStats and ZeroPad excluded).

  Works on abstract models from ``nnx.eval_shape`` too, so big models can
  be counted without allocating them.

  Example:
      >>> count_params(create("resnet20", num_classes=10, rngs=nnx.Rngs(0)))
      269722
  """
  params = nnx.state(model, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
