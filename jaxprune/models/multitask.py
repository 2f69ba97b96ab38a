"""A multitask CNN: one shared residual conv encoder, one small head per task.

The model PAGCP prunes on MultiMNIST: the encoder (3x3 stem, residual stages
of BasicBlocks with projection shortcuts where the shape changes, global
average pooling) is shared by every task; each task has its own head
(Linear -> ReLU -> Linear, or one Linear with ``head_hidden=0``). The forward
pass returns ``{task: logits}``.

Structure (attribute paths as they appear in ``nnx.split`` state)::

    encoder.stem.conv/bn                          stem
    encoder.stages[s][i].conv1/bn1/conv2/bn2      BasicBlock i of stage s
    encoder.stages[s][0].downsample.conv/bn       projection (stages s > 0)
    encoder.stem_index, encoder.out_index         ChannelIndex vectors (as the
                                                  zoo's ResNets: branch-slimmed
                                                  networks run)
    heads[task].hidden, heads[task].out           per-task head

Channel groups come from ``jaxprune.trace`` like for any model; the encoder's
groups are named ``encoder.…`` and each head's hidden group ``heads.<task>.…``,
so a method can keep the heads whole by selecting only ``encoder.`` groups.
Widths are read from array shapes, so a slimmed state merges and runs.

Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from jaxprune import models
    >>> m = models.create("multitask_resnet", num_classes={"left": 10, "right": 10},
    ...                   rngs=nnx.Rngs(0))
    >>> m.eval()
    >>> {t: y.shape for t, y in m(jnp.ones((2, 36, 36, 1))).items()}
    {'left': (2, 10), 'right': (2, 10)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from jaxprune.models.layers import (
  ConvBN,
  channel_index,
  expand_channels,
  gather_channels,
  global_avg_pool,
  linear,
  residual_stages,
)
from jaxprune.models.resnet_imagenet import BasicBlock

__all__ = ["MultitaskEncoder", "MultitaskHead", "MultitaskNet", "multitask_resnet"]

DEFAULT_TASKS = ("left", "right")


class MultitaskEncoder(nnx.Module):
  """3x3 conv-BN-ReLU stem, residual stages, global average pooling -> ``[B, C]``.

  Example:
      >>> enc = MultitaskEncoder(1, (8, 16), 1, rngs=nnx.Rngs(0))
      >>> enc(jnp.ones((2, 36, 36, 1))).shape
      (2, 16)
  """

  def __init__(self, in_channels: int, widths: Sequence[int], blocks_per_stage: int, *, rngs: nnx.Rngs) -> None:
    self.stem = ConvBN(in_channels, widths[0], 3, rngs=rngs)
    self.stages = nnx.List(residual_stages(BasicBlock, widths[0], widths, blocks_per_stage, rngs=rngs))
    self.stem_index = channel_index(widths[0])
    self.out_index = channel_index(widths[-1])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = expand_channels(nnx.relu(self.stem(x)), self.stem_index)
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return gather_channels(global_avg_pool(x), self.out_index)


class MultitaskHead(nnx.Module):
  """``Linear(C, hidden) -> ReLU -> Linear(hidden, classes)``; one Linear if hidden is 0.

  Example:
      >>> MultitaskHead(16, 10, 8, rngs=nnx.Rngs(0))(jnp.ones((2, 16))).shape
      (2, 10)
  """

  def __init__(self, in_features: int, num_classes: int, hidden: int, *, rngs: nnx.Rngs) -> None:
    self.hidden = linear(in_features, hidden, rngs=rngs) if hidden else None
    self.out = linear(hidden or in_features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.hidden is not None:
      x = nnx.relu(self.hidden(x))
    return self.out(x)


class MultitaskNet(nnx.Module):
  """Shared encoder, one head per task; ``model(x) -> {task: logits}``.

  Args:
      num_classes: classes per task, ``{task: n}``; an int gives every task of
          ``tasks`` that many classes.
      tasks: task names when ``num_classes`` is an int (default left, right).
      in_channels: input channels (1 for MultiMNIST).
      widths: channels of the stem and of each residual stage; stages after
          the first halve the resolution.
      blocks_per_stage: BasicBlocks per stage.
      head_hidden: hidden width of each head (0: a single Linear).

  Example:
      >>> m = MultitaskNet(num_classes=10, tasks=("a", "b", "c"), rngs=nnx.Rngs(0))
      >>> sorted(m.heads)
      ['a', 'b', 'c']
  """

  def __init__(
    self,
    *,
    num_classes: int | Mapping[str, int],
    rngs: nnx.Rngs,
    tasks: Sequence[str] | None = None,
    in_channels: int = 1,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    head_hidden: int = 32,
  ) -> None:
    classes = _task_classes(num_classes, tasks)
    if not widths or min(widths) < 1 or blocks_per_stage < 1 or head_hidden < 0:
      raise ValueError(
        f"need widths >= 1 (got {tuple(widths)}), blocks_per_stage >= 1 (got "
        f"{blocks_per_stage}) and head_hidden >= 0 (got {head_hidden})"
      )
    self.encoder = MultitaskEncoder(in_channels, tuple(widths), blocks_per_stage, rngs=rngs)
    self.heads = nnx.Dict({t: MultitaskHead(widths[-1], n, head_hidden, rngs=rngs) for t, n in classes.items()})

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.heads)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    features = self.encoder(x)
    return {t: head(features) for t, head in self.heads.items()}


def _task_classes(num_classes: int | Mapping[str, int], tasks: Sequence[str] | None) -> dict[str, int]:
  if isinstance(num_classes, Mapping):
    if tasks is not None and tuple(tasks) != tuple(num_classes):
      raise ValueError(
        f"tasks {tuple(tasks)} disagree with the keys of num_classes {tuple(num_classes)}; pass one of the two"
      )
    classes = {str(t): int(n) for t, n in num_classes.items()}
  else:
    names = DEFAULT_TASKS if tasks is None else tuple(tasks)
    classes = {str(t): int(num_classes) for t in names}
  if not classes or len(classes) != len(set(classes)) or min(classes.values()) < 1:
    raise ValueError(f"a multitask model needs at least one task with >= 1 class, got {classes}")
  return classes


def multitask_resnet(*, num_classes: int | Mapping[str, int], rngs: nnx.Rngs, **kwargs) -> MultitaskNet:
  """The zoo's multitask model (see :class:`MultitaskNet` for the options).

  Example:
      >>> m = multitask_resnet(num_classes={"left": 10, "sum": 19}, rngs=nnx.Rngs(0))
      >>> m.heads["sum"].out.kernel.shape
      (32, 19)
  """
  return MultitaskNet(num_classes=num_classes, rngs=rngs, **kwargs)
