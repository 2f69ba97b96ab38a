"""Magnitude pruning (the baseline): score channels, keep a budget; one-shot or iterative.

dense start -> [score -> keep a budget -> slim -> finetune] x (steps - 1) -> score -> keep
the final budget -> (pipeline) slim -> finetune. ``config.method``: see
``experiments/configs/defaults.py``.
"""

from __future__ import annotations

import optax

import jaxprune
from experiments import phases, pruning
from experiments.configs import defaults
from experiments.recipe import Dense, Experiment, Outcome, Recipe
from jaxprune import training as T
from jaxprune.methods import chipnet, magnitude


def volumes(graph, masks) -> dict[str, float]:
  """Both volume counts (the core's exact one, ChipNet's official one) of hard masks."""
  units = chipnet.unit_groups(graph)
  return {
    'volume': float(jaxprune.ratio(graph, masks, 'volume')),
    'volume_paper': float(chipnet.paper_volume(graph, {n: masks[n] for n in units})),
  }


def paper_volume(graph):
  """ChipNet's official volume count as a budget unit (a function of the keep masks)."""
  units = chipnet.unit_groups(graph)
  return lambda h: chipnet.paper_volume(graph, {n: h[n] for n in units})


def _prune(m, v, graph, budget, reference, criterion=None):
  paper = m.unit == 'volume_paper'  # ChipNet's official volume count, on ChipNet's units
  return magnitude.prune(
    v,
    graph,
    criterion=criterion or m.criterion,
    budget=budget,
    unit=paper_volume(graph) if paper else m.unit,
    scope=m.scope,
    min_channels=m.min_channels,
    round_to=m.round_to,
    reference=None if paper else reference,
  )


def check(exp: Experiment) -> None:
  """A budget outside (0, 1] or below what ``min_channels`` allows fails before any
  training: the final budget is selected once on the untrained network."""
  m = exp.config.method
  magnitude.schedule(m.budget, m.steps)
  if pruning.branch_units(m) and m.steps > 1:
    raise ValueError(
      'iterative magnitude pruning (method.steps > 1) re-traces slimmed networks: use '
      "method.units='stream' (a branch-slimmed network gathers channels by index)"
    )
  graphdef, state = T.create_train_state(phases.build_model(exp.config), optax.identity(), 0)
  graph = pruning.trace(exp, graphdef, state, branches=pruning.branch_units(m))
  _prune(m, T.core_variables(state), graph, float(m.budget), None, criterion='l1')


def run(exp: Experiment, dense: Dense) -> Outcome:
  """Prunes to ``method.budget`` in ``method.steps`` geometric stages, finetuning
  ``iter_finetune_epochs`` after each stage but the last."""
  m = exp.config.method
  branches = pruning.branch_units(m)
  state, budgets = dense.state, magnitude.schedule(m.budget, m.steps)
  for k, b in enumerate(budgets):
    if k == 0:
      graph = pruning.trace(exp, dense.graphdef, state, branches=True) if branches else dense.graph
    else:
      graph = pruning.trace(exp, dense.graphdef, state)
    v = T.core_variables(state)
    masks = _prune(m, v, graph, b, dense.cost.get(m.unit))
    if k == len(budgets) - 1:
      details = {'units': m.units, **(volumes(graph, masks) if branches else {})}
      return Outcome(masks=masks, variables=v, graph=graph, budget=float(m.budget), unit=m.unit, details=details)
    small = pruning.with_variables(state, jaxprune.slim(v, graph, masks))
    overrides = {**m.finetune, 'epochs': m.iter_finetune_epochs}
    state = pruning.finetune(exp, dense.graphdef, small, overrides, phase=f'prune{k}_finetune').state


recipe = Recipe(defaults=defaults.magnitude, run=run, check=check)
