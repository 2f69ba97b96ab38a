"""PAGCP: greedy, per-task-loss-aware pruning of a multitask network's shared encoder.

The method's phases, ``round0``, ``round1``, ...: each round scans every encoder channel
group (largest FLOPs contribution first), prunes it at the largest ratio whose
per-task validation losses stay within the unit's tolerance, keeps the top-k units by
loss rise per FLOP, and finetunes the network under the round's masks. The validation
set is the training holdout (``config.data.holdout``), never the test split. Then the
pipeline slims and finetunes. ``method.guide`` picks what guides the scan: every task
(PAGCP), one task's loss (ablation), or nothing (``l1``: task-blind global L1 of the
encoder to ``method.target``, the baseline at equal FLOPs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import phases, pruning
from experiments.configs import defaults
from experiments.recipe import Dense, Experiment, Outcome, Recipe
from jaxprune import training as T
from jaxprune.methods import magnitude, pagcp

ENCODER = 'encoder.'  # the shared part (the heads stay whole)


def tasks(config) -> tuple[str, ...]:
  """The network's tasks in label-column order (sorted names, see ``T.steps.task_outputs``)."""
  classes = config.model.kwargs.get('num_classes')
  if not hasattr(classes, 'keys'):
    raise ValueError('PAGCP needs a multitask model: set config.model.kwargs.num_classes to {task: classes}')
  return tuple(sorted(classes.keys()))


def settings(m) -> pagcp.Config:
  return pagcp.Config(delta0=float(m.delta0), total=float(m.total), topk=float(m.topk), criterion=m.criterion,
                      target=float(m.target) or None, target_unit=m.target_unit,
                      official_quirks=bool(m.official_quirks))  # fmt: skip


def validation(exp: Experiment) -> dict[str, np.ndarray]:
  batches = phases.eval_slice(exp.config, 'holdout')
  return {k: np.concatenate([b[k] for b in batches]) for k in ('image', 'label')}


def run(exp: Experiment, dense: Dense) -> Outcome:
  m, graph = exp.config.method, dense.graph
  v, config = T.core_variables(dense.state), settings(m)
  if m.guide == 'l1':
    whole = [g.name for g in graph.groups if not g.name.startswith(ENCODER)]
    unit = 'macs' if m.target_unit == 'flops' else m.target_unit  # paper FLOPs = 2 x MACs: the same ratio
    masks = magnitude.prune(v, graph, criterion=m.criterion, budget=config.target, unit=unit, whole=whole)
    return Outcome(masks=masks, budget=config.target, unit=m.target_unit, details={'guide': 'l1'})
  guides = tasks(exp.config) if m.guide == 'all' else (m.guide,)
  losses = {t: f for t, f in pagcp.cross_entropy_losses(tasks(exp.config)).items() if t in guides}
  _, eval_fn = pruning.core_fns(dense.graphdef)
  oracle = pagcp.make_oracle(eval_fn, graph, losses, validation(exp), batch_size=int(m.oracle_batch))

  def finetune(variables, masks, r):  # the round's network, masked (the next round scores it)
    apply = pruning.masked_apply(dense.graphdef, graph, lambda v, hp: masks)
    start = pruning.with_variables(dense.state, variables)
    step = phases.Step(apply_fn=apply)
    res = phases.train(exp, f'round{r}', (dense.graphdef, start), overrides=dict(m.round_finetune), step=step)
    return T.core_variables(res.state)

  result = pagcp.prune(v, graph, oracle, rounds=int(m.rounds), finetune=finetune, prefix=ENCODER, config=config)
  details = {'guide': m.guide, 'guides': list(guides), 'reached': result.reached,
             'rounds': [_round(r) for r in result.rounds]}  # fmt: skip
  budget = config.target
  return Outcome(masks=result.masks, variables=result.variables, budget=budget, unit=m.target_unit, details=details)


def _round(r: pagcp.Round) -> dict[str, Any]:
  """What one round decided, per unit in scan order (for the per-unit ratio plot)."""
  scans = [{'unit': s.name, 'size': s.size, 'ratio': s.ratio, 'kept_ratio': r.ratios.get(s.name, 0.0),
            'sensitive': s.sensitive, 'delta': s.delta, 'contribution': s.contribution} for s in r.state.scans]  # fmt: skip
  return {'lambda': r.state.lam, 'cost': r.cost, 'units': scans}


def check(exp: Experiment) -> None:
  m, names = exp.config.method, tasks(exp.config)
  pagcp.check_config(settings(m))
  if m.guide not in ('all', 'l1', *names):
    raise ValueError(f"method.guide must be 'all', 'l1' or a task of {names}, got {m.guide!r}")
  if m.guide == 'l1' and not m.target:
    raise ValueError('method.guide=l1 prunes to method.target: set it (e.g. the PAGCP run\'s ratios.flops)')
  if m.guide != 'l1' and not exp.config.data.holdout:
    raise ValueError('PAGCP scans on a validation set: set config.data.holdout to the training images to keep out')


recipe = Recipe(defaults=defaults.pagcp, run=run, check=check)
