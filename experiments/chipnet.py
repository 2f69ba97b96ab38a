"""Pipeline: pretrain -> ChipNet soft pruning -> best hard mask -> slim -> finetune.

Phases (each resumable, in ``workdir/<phase>``):

1. ``pretrain``: the dense network (``config.train``), or taken from another
   run with ``config.method.pretrained=<workdir>`` (its ``pretrain`` or dense
   ``train`` checkpoint), so many budgets share one dense start.
2. ``soft_prune``: ChipNet (``jaxprune.methods.chipnet``). AdamW on the
   weights, Adam without decay on ζ, batch ``method.soft.batch_size``; β, γ, s
   follow the per-step schedule. At every epoch end a callback thresholds ζ
   to the budget, evaluates the hard-pruned network on the selection split
   and keeps the best one (``soft_prune/best.msgpack``); the hard mask also
   lives in ``state.extra['hard']``, so the phase's own eval (on test) is the
   hard-pruned network's.
3. slim the best hard mask; ``finetune`` (SGD, ``method.finetune``).

With ``method.compare_magnitude`` the same dense network is also pruned by
the magnitude baseline to the same budget and finetuned the same way
(``magnitude_finetune``); its numbers go to ``results['magnitude']``.

Mask transfer (``method.transfer_from=<workdir of a ChipNet run>``): its
``chipnet_masks.json`` is applied to a freshly initialised model of this
config (another data set), which is slimmed and trained from scratch
(``train_pruned``, ``config.train``), as the official code does.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization
from ml_collections import config_dict

import jaxprune
from jaxprune import data as data_lib
from jaxprune import training as T
from jaxprune.methods import chipnet, magnitude
from experiments import pruning
from experiments.magnitude import check_method_config
from experiments.train import build_model, global_batch, make_eval_fn, run_phase

DEFAULTS = {
    "name": "chipnet",
    "budget": 0.5,               # fraction of the dense network kept, in (0, 1]
    "budget_type": "volume",     # channels | volume | params | flops (= MACs)
    "min_channels": 1,           # every group keeps this many: no layer/stage vanishes
    "w_budget": chipnet.W_BUDGET,
    "w_crisp": chipnet.W_CRISP,
    "zeta_init": chipnet.ZETA_INIT_HIGH,  # ζ ~ U(0, zeta_init)
    # Steps per "epoch" of the β/γ/s schedules: the paper's 45k images / batch 32.
    # Smaller values compress the schedule (with a larger soft.zeta_lr to match).
    "schedule_steps_per_epoch": chipnet.PAPER_STEPS_PER_EPOCH,
    "soft": {"epochs": 20, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-3,
             "zeta_lr": 1e-3},
    "select_on": "train",        # train (a fixed slice, no augmentation) | test | last
    "select_size": 1000,         # images of the train slice used for selection
    "finetune": {"epochs": 4, "lr": 0.02, "optimizer": "sgd", "weight_decay": 5e-4},
    "pretrained": "",            # workdir whose dense checkpoint to start from
    "transfer_from": "",         # workdir of a ChipNet run whose masks to apply
    "compare_magnitude": False,  # also run the magnitude baseline from the same start
    "magnitude_criterion": "l1",
}
MASKS_FILE = "chipnet_masks.json"
SELECT_ON = ("train", "test", "last")


# -------------------------------------------------------------------- helpers

def _host(tree):
  """A host copy: train steps donate (delete) the device arrays of their input state."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _device(tree):
  return jax.tree.map(jnp.asarray, tree)


def trace_state(graphdef: nnx.GraphDef, state: T.TrainState, image_shape) -> jaxprune.ChannelGraph:
  fn, v = pruning.core_view(graphdef, state)
  return jaxprune.trace(fn, v, np.zeros((1, *image_shape), np.float32))


def make_apply_fns(graphdef: nnx.GraphDef, graph: jaxprune.ChannelGraph):
  """(soft_apply, hard_apply) for the training loop.

  soft_apply runs the network with every channel group scaled by its
  projected mask z(ζ; β, γ) (β, γ from the traced ``hparams``); hard_apply
  with the binary mask in ``extra['hard']``. Both through `jaxprune.masked`,
  which scales a channel at every op that consumes it.
  """
  train_fn, eval_fn = pruning.core_fns(graphdef)
  masked_train, masked_eval = jaxprune.masked(train_fn, graph), jaxprune.masked(eval_fn, graph)

  def soft_apply(v, images, *, train, rng=None, hparams=None):
    del rng
    _, z = chipnet.project(v.extra["zeta"], hparams.beta, hparams.gamma)
    if train:
      logits, stats = masked_train(pruning.core_variables(v), z, images)
      return T.Forward(logits, stats)
    return T.Forward(masked_eval(pruning.core_variables(v), z, images), v.batch_stats)

  def hard_apply(v, images, *, train=False, rng=None, hparams=None):
    del rng, hparams, train
    return T.Forward(masked_eval(pruning.core_variables(v), v.extra["hard"], images), v.batch_stats)

  return soft_apply, hard_apply


def selection_batches(config, size: int, seed: int = 0):
  """A fixed random slice of the training set, unaugmented, in eval batches."""
  x, y = data_lib.load_arrays(config.data.name, "train", data_dir=config.data.data_dir)
  idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:size])
  info = data_lib.get_info(config.data.name)
  x = data_lib.normalize(x[idx], info.mean, info.std)
  bs = global_batch(config, "eval_batch_size")
  return [{"image": x[i:i + bs], "label": np.asarray(y[idx][i:i + bs], np.int32)}
          for i in range(0, len(idx), bs)]


class BestHard:
  """Epoch-end callback: threshold ζ to the budget, evaluate, keep the best.

  Returns the state with ``extra['hard']`` set to the new hard mask. The best
  (by the hard-pruned accuracy on the selection split; with
  ``select_on='last'`` simply the latest) is written to ``path`` so that a
  resumed phase keeps it.
  """

  def __init__(self, path: str, graph, *, budget: float, unit: str, min_channels: int,
               evaluate, log_path: str, select_on: str, cost_fn, evaluate_soft=None):
    self.path, self.graph, self.budget, self.unit = path, graph, budget, unit
    self.min_channels, self.evaluate, self.log_path = min_channels, evaluate, log_path
    self.select_on, self.cost_fn, self.evaluate_soft = select_on, cost_fn, evaluate_soft
    self.best = self.load(path) if os.path.exists(path) else None

  @staticmethod
  def load(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
      return serialization.msgpack_restore(f.read())

  def __call__(self, step, state, metrics, *, epoch_end):
    del metrics
    if not epoch_end:
      return None
    zeta = _host(state.extra["zeta"])
    hard = chipnet.threshold(zeta, self.graph, self.budget, self.unit,
                             min_channels=self.min_channels)
    state = state._replace(extra={**state.extra, "hard": hard})
    acc = float("nan") if self.select_on == "last" else self.evaluate(state)["accuracy"]
    record = {"step": int(step), "select_accuracy": acc,
              # The soft network (z at this step's β, γ) on the same split: a gap
              # between the two means the soft masks are not crisp yet.
              "soft_accuracy": (self.evaluate_soft(state, step)["accuracy"]
                                if self.evaluate_soft else None),
              "hard_ratio": float(self.cost_fn(hard)),
              "kept_channels": int(sum(np.asarray(m).sum() for m in hard.values()))}
    better = self.best is None or self.select_on == "last" or acc > float(self.best["accuracy"])
    record["best"] = bool(better)
    with open(self.log_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if better:
      self.best = {"step": int(step), "accuracy": acc, "hard": _host(hard),
                   "zeta": zeta, "variables": _host(pruning.core_variables(state))}
      tmp = self.path + ".tmp"
      with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(self.best))
      os.replace(tmp, self.path)
    return state


def soft_prune(config, workdir: str, graphdef, state: T.TrainState, graph, unit: str) -> dict:
  """The soft-pruning phase; returns the best record (step, accuracy, hard, zeta, variables)."""
  m = config.method
  soft = m.soft
  soft_cfg = config.copy_and_resolve_references()
  soft_cfg.data.batch_size = int(soft.batch_size)  # ChipNet prunes at batch 32
  schedule = chipnet.Schedule(steps_per_epoch=float(m.schedule_steps_per_epoch))
  zeta = chipnet.init(jax.random.PRNGKey(config.seed + 1), graph, float(m.zeta_init))
  extra = {"zeta": zeta, "hard": graph.ones()}
  tx = T.partition({
      "params": optax.adamw(soft.lr, weight_decay=soft.weight_decay),
      "zeta": optax.adam(soft.zeta_lr),  # no decay on ζ (official)
      "hard": None,                      # set by the callback, not trained
  })
  soft_apply, hard_apply = make_apply_fns(graphdef, graph)

  def extra_loss(v, batch, fwd, *, rng=None, hparams=None):
    return chipnet.penalty(graph, v.extra["zeta"], hparams, budget=float(m.budget), unit=unit,
                           min_channels=int(m.min_channels), w_budget=float(m.w_budget),
                           w_crisp=float(m.w_crisp))

  mesh = T.make_mesh()
  hparams_fn = lambda step: chipnet.hparams(step, schedule)
  bs = global_batch(config, "eval_batch_size")
  if m.select_on == "test":
    batches = list(data_lib.eval_batches(config.data.name, "test", data_dir=config.data.data_dir,
                                         batch_size=bs))
  else:
    batches = selection_batches(config, int(m.select_size), seed=config.seed)
  hard_step = T.make_eval_step(hard_apply, mesh=mesh)
  soft_step = T.make_eval_step(soft_apply, mesh=mesh)
  evaluate = lambda s: T.evaluate(hard_step, s, batches, batch_size=bs, mesh=mesh)
  evaluate_soft = lambda s, step: T.evaluate(soft_step, s, batches, batch_size=bs, mesh=mesh,
                                             hparams=hparams_fn(step))
  phase_dir = os.path.join(workdir, "soft_prune")
  os.makedirs(phase_dir, exist_ok=True)
  unit_cost = jax.jit(lambda h: jaxprune.ratio(graph, h, unit))
  best = BestHard(os.path.join(phase_dir, "best.msgpack"), graph, budget=float(m.budget),
                  unit=unit, min_channels=int(m.min_channels), evaluate=evaluate,
                  log_path=os.path.join(phase_dir, "selection.jsonl"),
                  select_on=m.select_on, cost_fn=unit_cost, evaluate_soft=evaluate_soft)
  run_phase(soft_cfg, workdir, phase="soft_prune", init=(graphdef, state),
            train_overrides={"epochs": soft.epochs, "optimizer": "adamw", "lr": soft.lr,
                             "weight_decay": soft.weight_decay, "schedule": "constant",
                             "warmup_epochs": 0.0},
            tx=tx, schedule=optax.constant_schedule(soft.lr), apply_fn=soft_apply,
            eval_apply_fn=hard_apply, extra_loss=extra_loss, extra=extra,
            hparams_fn=hparams_fn, callbacks=[best],
            mesh=mesh, seed_offset=1)
  return best.best


def finetune_slim(config, workdir, graphdef, template: T.TrainState, variables, graph, hard,
                  dense_state: T.TrainState, *, phase: str) -> dict[str, Any]:
  """slim -> evaluate -> time -> finetune; the numbers of one pruned network."""
  info = data_lib.get_info(config.data.name)
  small = pruning.with_variables(template, jaxprune.slim(variables, graph, hard))
  small = small._replace(extra={})
  pruned = pruning.count(trace_state(graphdef, small, info.image_shape))
  eval_fn = make_eval_fn(config, T.nnx_apply(graphdef), mesh=T.make_mesh())
  before = eval_fn(small).get("accuracy")
  speed = pruning.measure_speedup(graphdef, dense_state, small, info.image_shape)
  ft = run_phase(config, workdir, phase=phase, init=(graphdef, small), extra={},
                 train_overrides=dict(config.method.finetune))
  return {"test_accuracy": ft.eval.get("accuracy"), "pruned_accuracy_before_finetune": before,
          "params": pruned["params"], "macs": pruned["macs"], "pruned": pruned,
          "speedup": speed}


def save_masks(workdir: str, hard, config, unit: str) -> str:
  path = os.path.join(workdir, MASKS_FILE)
  out = {"budget": float(config.method.budget), "budget_type": config.method.budget_type,
         "unit": unit, "model": config.model.name, "data": config.data.name,
         "masks": {k: [int(v) for v in np.asarray(m)] for k, m in hard.items()}}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(out, f)
  return path


def load_masks(path_or_workdir: str, graph) -> dict[str, jax.Array]:
  """Hard masks saved by a ChipNet run, checked against `graph` (same architecture)."""
  path = path_or_workdir
  if os.path.isdir(path):
    path = os.path.join(path, MASKS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no ChipNet masks at {path} (run the ChipNet pipeline there first)")
  with open(path) as f:
    saved = json.load(f)
  masks = {k: jnp.asarray(v, jnp.float32) for k, v in saved["masks"].items()}
  try:
    jaxprune.check_masks(graph, masks)
  except ValueError as e:
    raise ValueError(f"masks from {path} (model {saved.get('model')}) do not fit this "
                     f"model: {e}") from e
  return masks


# ------------------------------------------------------------------ pipeline

def pipeline(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.method`: see DEFAULTS."""
  check_method_config(config.method, DEFAULTS)
  m = config.method
  if m.select_on not in SELECT_ON:
    raise ValueError(f"method.select_on must be one of {SELECT_ON}, got {m.select_on!r}")
  if m.transfer_from:
    return transfer_pipeline(config, workdir)
  info = data_lib.get_info(config.data.name)

  # Fail on a bad budget before any training.
  graphdef, probe = T.create_train_state(build_model(config), optax.identity(), 0)
  unit = chipnet.check_budget(trace_state(graphdef, probe, info.image_shape), m.budget,
                              m.budget_type, min_channels=m.min_channels)
  del probe

  graphdef, state, dense_eval = pruning.dense_start(config, workdir, m.pretrained)
  dense_accuracy = dense_eval.get("accuracy")
  graph = trace_state(graphdef, state, info.image_shape)
  dense = pruning.count(graph)
  dense_host = _host(state)  # the phases below donate the device arrays

  best = soft_prune(config, workdir, graphdef, state, graph, unit)
  hard = {k: jnp.asarray(v) for k, v in best["hard"].items()}
  save_masks(workdir, hard, config, unit)
  template = _device(dense_host)
  ours = finetune_slim(config, workdir, graphdef, template, _device(best["variables"]), graph,
                       hard, _device(dense_host), phase="finetune")
  results = {
      **ours, "dense_accuracy": dense_accuracy,
      "hard_pruned_select_accuracy": float(best["accuracy"]), "best_step": int(best["step"]),
      "budget": float(m.budget), "budget_type": m.budget_type, "unit": unit,
      "achieved": ours["pruned"][unit] / dense[unit],
      "dense": dense, "ratios": pruning.ratios(ours["pruned"], dense),
      "kept_per_group": {k: int(np.asarray(v).sum()) for k, v in hard.items()},
      "group_sizes": {g.name: g.size for g in graph.groups},
  }
  if m.compare_magnitude:
    v = pruning.core_view(graphdef, _device(dense_host))[1]
    mag = magnitude.prune(v, graph, criterion=m.magnitude_criterion, budget=float(m.budget),
                          unit=unit, min_channels=int(m.min_channels))
    r = finetune_slim(config, workdir, graphdef, _device(dense_host), v, graph, mag,
                      _device(dense_host), phase="magnitude_finetune")
    results["magnitude"] = {**r, "criterion": m.magnitude_criterion,
                            "achieved": r["pruned"][unit] / dense[unit],
                            "ratios": pruning.ratios(r["pruned"], dense)}
  return results


def transfer_pipeline(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """Masks learned by another ChipNet run, on a fresh model of this config, trained from scratch."""
  m = config.method
  info = data_lib.get_info(config.data.name)
  graphdef, fresh = T.create_train_state(build_model(config), optax.identity(), config.seed)
  graph = trace_state(graphdef, fresh, info.image_shape)
  hard = load_masks(m.transfer_from, graph)
  dense = pruning.count(graph)
  v = pruning.core_view(graphdef, fresh)[1]
  small = pruning.with_variables(fresh, jaxprune.slim(v, graph, hard))
  pruned = pruning.count(trace_state(graphdef, small, info.image_shape))
  speed = pruning.measure_speedup(graphdef, fresh, small, info.image_shape)
  r = run_phase(config, workdir, phase="train_pruned", init=(graphdef, small), extra={})
  with open(os.path.join(m.transfer_from, MASKS_FILE) if os.path.isdir(m.transfer_from)
            else m.transfer_from) as f:
    source = {k: v for k, v in json.load(f).items() if k != "masks"}
  out = {"test_accuracy": r.eval.get("accuracy"), "params": pruned["params"],
         "macs": pruned["macs"], "dense": dense, "pruned": pruned,
         "ratios": pruning.ratios(pruned, dense), "speedup": speed, "source": source,
         "kept_per_group": {k: int(np.asarray(v).sum()) for k, v in hard.items()}}
  if m.pretrained:  # a dense run on this data set, for reference
    out["dense_accuracy"] = pruning.dense_start(config, workdir, m.pretrained)[2].get("accuracy")
  return out
