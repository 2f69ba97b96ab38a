"""The contract between the shared pipeline and a method: :class:`Recipe`.

An experiment (``experiments.train.train_and_evaluate``) is one linear
sequence; a method fills in the middle:

  dense start -> the method's phase(s) -> [slim -> finetune] -> evaluate -> results.json
  (Recipe.start)  (Recipe.run -> Outcome)  (when the outcome has masks)

A static method's ``run`` returns hard masks (:class:`Outcome` ``masks``),
and the pipeline slims, times and finetunes the network; a dynamic method
returns its trained network's accuracy and per-sample cost instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from ml_collections import config_dict

import jaxprune
from jaxprune import data as data_lib
from jaxprune import training as T


class Experiment(NamedTuple):
  """What every step of a run reads: the config, where to write, the devices.

  ``times`` collects the wall seconds of the pipeline's steps (``timed``).
  """

  config: config_dict.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  times: dict[str, float]

  @property
  def info(self) -> data_lib.DatasetInfo:
    return data_lib.get_info(self.config.data.name)

  @property
  def example(self) -> np.ndarray:
    """One input image of zeros: the example the core traces with."""
    return np.zeros((1, *self.info.image_shape), np.float32)


class Dense(NamedTuple):
  """The network a method starts from, traced and counted."""

  graphdef: nnx.GraphDef
  state: T.TrainState
  graph: jaxprune.ChannelGraph  # traced from the eval-mode forward
  cost: dict[str, float]  # `pruning.count(graph)`: exact and paper counts
  metrics: dict[str, Any]  # its test accuracy and loss ({} if unknown)


class Outcome(NamedTuple):
  """What a method's phase(s) hand to the rest of the pipeline.

  Static methods: ``masks`` (hard, over ``graph``'s groups) prune
  ``variables`` (default: the dense network's), which the pipeline slims,
  evaluates, times against the dense network and finetunes with the train
  overrides ``finetune`` (default ``config.method.finetune``).
  Dynamic methods (and no method): ``masks`` is None; ``accuracy`` and
  ``cost`` (mean per-sample cost, in ``pruning.count`` units) are final, and
  ``dynamic`` holds the per-sample statistics.
  """

  masks: dict[str, jax.Array] | None = None
  variables: dict[str, Any] | None = None
  graph: jaxprune.ChannelGraph | None = None
  finetune: Mapping[str, Any] | None = None
  budget: float | None = None
  unit: str | None = None  # the cost unit of the budget (a `jaxprune.UNITS` name)
  accuracy: float | None = None
  cost: dict[str, float] | None = None
  dynamic: dict[str, Any] | None = None
  speedup: dict[str, Any] | None = None  # a method that slims itself: `pruning.measure_speedup`
  source: dict[str, Any] | None = None  # where transferred masks came from
  details: dict[str, Any] = {}  # the method's own numbers: results.json "details"


class Recipe(NamedTuple):
  """A method's part of an experiment.

  Attributes:
    defaults: ``() -> ConfigDict``, its ``config.method`` block with defaults
      (from ``experiments/configs/defaults.py`` for the shipped methods).
    run: ``run(exp, dense) -> Outcome``: the method's own phase(s), built
      from the shared pieces in ``experiments.phases`` and
      ``experiments.pruning``. None: no method (plain training).
    check: ``check(exp)``: fails on bad method input before any training.
    start: ``start(exp) -> Dense``; default ``pruning.dense_start`` (train
      the dense network, or reuse ``method.pretrained``).
  """

  defaults: Callable[[], config_dict.ConfigDict]
  run: Callable[[Experiment, Dense], Outcome] | None = None
  check: Callable[[Experiment], None] | None = None
  start: Callable[[Experiment], Dense] | None = None


def check_method_keys(method: config_dict.ConfigDict, defaults: config_dict.ConfigDict) -> None:
  """A misspelled method key is an error that lists the valid ones."""
  unknown = sorted(set(method) - set(defaults))
  if unknown:
    raise ValueError(f'unknown key(s) {unknown} in config.method; valid: {sorted(defaults)}')
