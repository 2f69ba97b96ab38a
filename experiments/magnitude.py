"""Pipeline: train -> score -> select to a budget -> slim -> finetune (magnitude baseline)."""
from __future__ import annotations

from typing import Any

import numpy as np
from ml_collections import config_dict

import jaxprune
from jaxprune import data as data_lib
from jaxprune import training as T
from jaxprune.methods import magnitude
from experiments import pruning
from experiments.train import make_eval_fn, run_phase

DEFAULTS = {
    "name": "magnitude",
    "criterion": "l1",        # l1 | l2 | bn_scale | fpgm | random
    "budget": 0.5,            # fraction of the dense cost kept, in `unit`
    "unit": "macs",           # macs | flops | params | channels | volume
    "scope": "global",        # global (scores normalized per group) | local (same ratio per group)
    "steps": 1,               # 1: one-shot; n: n geometric stages with finetuning between
    "iter_finetune_epochs": 1,
    "min_channels": 1,
    "round_to": 1,            # kept channels per group rounded down to a multiple
    "finetune": {"epochs": 4, "lr": 0.02},  # train overrides for the final finetune
    "pretrained": config_dict.placeholder(str),  # workdir of a finished dense/pretrain run
}


def check_method_config(method: config_dict.ConfigDict, defaults: dict) -> None:
  """A misspelled method key is an error that lists the valid ones."""
  unknown = sorted(set(method) - set(defaults))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in config.method; valid: {sorted(defaults)}")


def pipeline(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.method`: criterion, budget, unit, scope, steps, min_channels, round_to,
  finetune (train overrides of the final finetune), iter_finetune_epochs, pretrained
  (reuse a finished run's dense network instead of pretraining)."""
  check_method_config(config.method, DEFAULTS)
  m = config.method
  info = data_lib.get_info(config.data.name)
  x1 = np.zeros((1, *info.image_shape), np.float32)

  graphdef, state, dense_eval = pruning.dense_start(config, workdir, m.pretrained)
  eval_fn = make_eval_fn(config, T.nnx_apply(graphdef), mesh=T.make_mesh())
  fn, v = pruning.core_view(graphdef, state)
  dense_graph = jaxprune.trace(fn, v, x1)
  dense = pruning.count(dense_graph)
  dense_state = state

  budgets = magnitude.schedule(m.budget, m.steps)
  for k, b in enumerate(budgets):
    fn, v = pruning.core_view(graphdef, state)
    graph = jaxprune.trace(fn, v, x1)
    masks = magnitude.prune(v, graph, criterion=m.criterion, budget=b, unit=m.unit,
                            scope=m.scope, min_channels=m.min_channels, round_to=m.round_to,
                            reference=dense[m.unit])
    state = pruning.with_variables(state, jaxprune.slim(v, graph, masks))
    if k < len(budgets) - 1:
      r = run_phase(config, workdir, phase=f"prune{k}_finetune", init=(graphdef, state),
                    train_overrides={**dict(m.finetune), "epochs": m.iter_finetune_epochs})
      state = r.state

  fn, v = pruning.core_view(graphdef, state)
  pruned = pruning.count(jaxprune.trace(fn, v, x1))
  pruned_eval = eval_fn(state)
  # Speed depends on shapes only, so the slimmed net is timed before finetuning.
  speed = pruning.measure_speedup(graphdef, dense_state, state, info.image_shape)
  ft = run_phase(config, workdir, phase="finetune", init=(graphdef, state),
                 train_overrides=dict(m.finetune))
  return {
      "test_accuracy": ft.eval.get("accuracy"),
      "dense_accuracy": dense_eval.get("accuracy"),
      "pruned_accuracy_before_finetune": pruned_eval.get("accuracy"),
      "params": pruned["params"], "macs": pruned["macs"],
      "dense": dense, "pruned": pruned,
      "ratios": pruning.ratios(pruned, dense),
      "speedup": speed,
  }
