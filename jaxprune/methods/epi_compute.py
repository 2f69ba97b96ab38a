"""The training compute EPI saves: MACs of a pruning-aware schedule (dense until the
prune epoch, pruned after) against pruning at initialisation and against
train -> prune -> finetune. Exported from `jaxprune.methods.epi`.

>>> epi.training_macs([40.6e6] * 2, samples_per_epoch=100) == 3 * 40.6e6 * 2 * 100
True
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

import jaxprune
from jaxprune.graph import ChannelGraph

Pytree = Any

# Backward ~ 2 forwards (gradients w.r.t. activations and w.r.t. weights).
TRAIN_MACS_PER_FORWARD = 3


# ---------------------------------------------------------------------------
# Training compute: forward + backward = TRAIN_MACS_PER_FORWARD x forward MACs.


def train_macs_per_sample(
  graph: ChannelGraph, masks: Mapping | None = None, *, unit: str = "macs", mode: str = "exact"
) -> float:
  """Training MACs (or another cost unit) per sample: 3 x the forward count."""
  return TRAIN_MACS_PER_FORWARD * float(getattr(jaxprune.cost(graph, masks, mode=mode), unit))


def training_macs(forward_per_epoch: Sequence[float], samples_per_epoch: int) -> float:
  """Sum over epochs of 3 x forward MACs per sample x samples (eval passes not counted)."""
  return float(TRAIN_MACS_PER_FORWARD * samples_per_epoch * np.sum(forward_per_epoch))


class Compute(NamedTuple):
  """Training MACs of the schedules EPI is compared with."""

  pat: float  # dense to prune_epoch, pruned to `epochs` (same schedule)
  at_init: float  # pruned from epoch 0
  train_prune_finetune: float  # dense for `epochs`, then `finetune_epochs` pruned
  dense: float  # dense for `epochs`

  @property
  def saving(self) -> float:
    """How many times less than train -> prune -> finetune PaT costs."""
    return self.train_prune_finetune / self.pat


def compare_compute(
  dense_forward: float,
  pruned_forward: float,
  *,
  epochs: int,
  prune_epoch: int,
  samples_per_epoch: int,
  finetune_epochs: int = 0,
) -> Compute:
  """Training compute of pruning at `prune_epoch` vs at 0 vs after training.

  `dense_forward` / `pruned_forward`: forward MACs per sample
  (`jaxprune.cost(graph).macs`, `jaxprune.cost(graph, masks).macs`).

  >>> c = epi.compare_compute(40.6e6, 20.3e6, epochs=30, prune_epoch=8,
  ...                         samples_per_epoch=5085, finetune_epochs=30)
  """
  if not 0 <= prune_epoch <= epochs:
    raise ValueError(f"prune_epoch must lie in [0, epochs={epochs}], got {prune_epoch}")
  m = lambda dense_epochs, pruned_epochs: training_macs(
    [dense_forward] * dense_epochs + [pruned_forward] * pruned_epochs, samples_per_epoch
  )
  return Compute(m(prune_epoch, epochs - prune_epoch), m(0, epochs), m(epochs, finetune_epochs), m(epochs, 0))
