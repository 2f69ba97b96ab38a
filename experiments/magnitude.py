"""Magnitude pruning (the baseline): score channels, keep a budget; one-shot or iterative.

dense start -> [score -> keep a budget -> slim -> finetune] x (steps - 1) -> score -> keep
the final budget -> (pipeline) slim -> finetune. ``config.method``: see
``experiments/configs/defaults.py``.
"""

from __future__ import annotations

import jaxprune
from experiments import pruning
from experiments.configs import defaults
from experiments.recipe import Dense, Experiment, Outcome, Recipe
from jaxprune import training as T
from jaxprune.methods import magnitude


def run(exp: Experiment, dense: Dense) -> Outcome:
  """Prunes to ``method.budget`` in ``method.steps`` geometric stages, finetuning
  ``iter_finetune_epochs`` after each stage but the last."""
  m = exp.config.method
  state, budgets = dense.state, magnitude.schedule(m.budget, m.steps)
  for k, b in enumerate(budgets):
    graph = dense.graph if k == 0 else pruning.trace(exp, dense.graphdef, state)
    v = T.core_variables(state)
    masks = magnitude.prune(
      v,
      graph,
      criterion=m.criterion,
      budget=b,
      unit=m.unit,
      scope=m.scope,
      min_channels=m.min_channels,
      round_to=m.round_to,
      reference=dense.cost[m.unit],
    )
    if k == len(budgets) - 1:
      return Outcome(masks=masks, variables=v, graph=graph, budget=float(m.budget), unit=m.unit)
    small = pruning.with_variables(state, jaxprune.slim(v, graph, masks))
    overrides = {**m.finetune, 'epochs': m.iter_finetune_epochs}
    state = pruning.finetune(exp, dense.graphdef, small, overrides, phase=f'prune{k}_finetune').state


recipe = Recipe(defaults=defaults.magnitude, run=run)
