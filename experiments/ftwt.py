"""Pipeline: pretrain (or load) -> train FTWT predictors with gating on -> per-sample MACs.

The backbone keeps training (SGD lr 0.01, steps at 81/122/151 of 200 epochs,
scaled to `method.epochs`) with the *predicted* per-sample masks applied; the
predictors train on the mask loss only (SGD lr 0.1 constant, no decay), whose
weight drops to 0 after `cooldown` of the epochs (official code, spec B4).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

import jaxprune
from jaxprune import data as data_lib
from jaxprune import training as T
from jaxprune.methods import ftwt
from experiments import pruning
from experiments.magnitude import check_method_config
from experiments.train import global_batch, run_phase, steps_per_epoch

DEFAULTS = {
    "name": "ftwt",
    "r": 0.9,                 # share of activation mass kept per sample and layer, in (0, 1]
    "mode": "decoupled",      # decoupled | joint
    "pool": "avg",            # avg (official code) | max (paper figure)
    "pretrained": config_dict.placeholder(str),  # workdir of a finished dense/pretrain run
    "epochs": 4,              # predictor training epochs (backbone trains too)
    "backbone_lr": 0.01,
    "predictor_lr": 0.1,
    "weight_decay": 5e-4,     # backbone only
    "cooldown": 0.5,          # mask-loss weight 1 before this fraction of the epochs, 0 after
    "seed": 0,                # predictor init
}


def setup(graphdef: nnx.GraphDef, state: T.TrainState, image_shape, *, pool: str = "avg",
          mode: str = "decoupled"):
  """(graph, eval points, train apply_fn, eval apply_fn, jitted eval gated fn).

  Gate points are found separately in the train- and eval-mode jaxprs (their
  equation paths differ); predictors are shared by group name.
  """
  train_fn, eval_fn = pruning.core_fns(graphdef)
  v = pruning.core_variables(state)
  x1 = np.zeros((1, *image_shape), np.float32)
  graph = jaxprune.trace(eval_fn, v, x1)
  pts_eval = ftwt.gate_points(eval_fn, graph, v, x1)
  pts_train = ftwt.gate_points(train_fn, graph, v, x1)
  gated_train = ftwt.gated(train_fn, graph, pts_train, pool=pool, mode=mode)
  gated_eval = ftwt.gated(eval_fn, graph, pts_eval, pool=pool, mode=mode)

  def apply_fn(v, images, *, train, rng=None, hparams=None):
    del rng, hparams
    if train:
      (logits, stats), aux = gated_train(pruning.core_variables(v), v.extra["predictors"], images)
      return T.Forward(logits, stats, aux)
    logits, aux = gated_eval(pruning.core_variables(v), v.extra["predictors"], images)
    return T.Forward(logits, v.batch_stats, aux)

  def eval_apply(v, images, *, train=False, rng=None, hparams=None):
    return apply_fn(v, images, train=False)

  return graph, pts_eval, apply_fn, eval_apply, jax.jit(gated_eval)


def evaluate(config, gated_eval, graph, points, state
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Accuracy and per-sample MACs (exact, paper, legacy) over the test split: a summary
  and the per-image arrays."""
  bs = global_batch(config, "eval_batch_size")
  v, preds = pruning.core_variables(state), state.extra["predictors"]
  cost_fn = jax.jit(lambda m: (ftwt.per_sample_cost(graph, m).macs,
                               ftwt.per_sample_cost(graph, m, mode="paper").flops,
                               ftwt.legacy_macs(graph, m)))
  macs, paper, legacy, keep, right, labels = [], [], [], [], [], []
  for b in data_lib.eval_batches(config.data.name, "test", batch_size=bs,
                                 data_dir=config.data.data_dir):
    logits, aux = gated_eval(v, preds, jnp.asarray(b["image"]))
    hit = np.asarray(logits).argmax(-1) == np.asarray(b["label"])
    e, p, old = cost_fn(aux.masks)
    macs.append(np.asarray(e))
    paper.append(np.asarray(p))
    legacy.append(np.asarray(old))
    right.append(hit)
    labels.append(np.asarray(b["label"]))
    keep.append(np.concatenate([np.asarray(aux.masks[q.name]) for q in points], -1).mean(-1))
  macs, paper, legacy, keep, right, labels = map(
      np.concatenate, (macs, paper, legacy, keep, right, labels))
  dense = jaxprune.cost(graph)
  dense_paper = jaxprune.cost(graph, mode="paper").flops
  pm = ftwt.predictor_macs(points)
  base = ftwt.legacy_base(graph)
  return {
      "accuracy": float(right.mean()), "count": int(macs.size),
      "macs_mean": float(macs.mean()), "macs_std": float(macs.std()),
      "macs_min": float(macs.min()), "macs_max": float(macs.max()),
      # mode="paper": 2 x conv/dense MACs, no BN/ReLU/add/pool terms (compare with papers)
      "flops_paper_mean": float(paper.mean()),
      "predictor_macs": pm, "predictor_params": ftwt.predictor_params(points),
      "macs_with_predictors_mean": float(macs.mean()) + pm,
      "dense_macs": float(dense.macs), "dense_flops_paper": float(dense_paper),
      "macs_ratio": float(macs.mean() / dense.macs),
      "macs_ratio_with_predictors": float((macs.mean() + pm) / dense.macs),
      "flops_ratio_paper": float(paper.mean() / dense_paper),
      "gates_open_mean": float(keep.mean()), "gates_open_std": float(keep.std()),
      # FTWT's own count (spec B6): what its "FLOPs red." means
      "macs_legacy_mean": float(legacy.mean()), "legacy_base": base,
      "reduction_legacy": 1 - float(legacy.mean()) / base,
  }, {"macs": macs, "macs_legacy": legacy, "correct": right, "label": labels,
      "gates_open": keep}


def write_per_sample(workdir: str, arrays: dict[str, np.ndarray]) -> str:
  """Per test image: MACs (exact and legacy), correct, label, share of gates open, as
  `per_sample.npz` (written atomically), for histograms such as results/ftwt/summarize.py."""
  path = os.path.join(workdir, "per_sample.npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def pipeline(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.method`: r, mode, pool, pretrained, epochs, backbone_lr, predictor_lr,
  weight_decay, cooldown, seed."""
  check_method_config(config.method, DEFAULTS)
  m = config.method
  ftwt.check_r(m.r)
  info = data_lib.get_info(config.data.name)
  graphdef, state, dense_eval = pruning.dense_start(config, workdir, m.pretrained)
  graph, points, apply_fn, eval_apply, gated_eval = setup(
      graphdef, state, info.image_shape, pool=m.pool, mode=m.mode)

  spe = steps_per_epoch(config)
  total = max(1, int(round(m.epochs * spe)))
  # The official MultiStep at epochs 81/122/151 of 200, as fractions of the run.
  backbone_lr = optax.piecewise_constant_schedule(
      m.backbone_lr, {int(total * f): 0.1 for f in (81 / 200, 122 / 200, 151 / 200)})
  tx = T.partition({
      "params": optax.chain(optax.add_decayed_weights(m.weight_decay),
                            optax.sgd(backbone_lr, momentum=0.9)),
      "predictors": optax.sgd(m.predictor_lr, momentum=0.9),
  })
  cool = int(m.cooldown * total)
  r = float(m.r)

  def extra_loss(v, batch, fwd, *, rng=None, hparams=None):
    aux = fwd.aux
    loss = ftwt.mask_loss(aux.logits, ftwt.targets(aux.peaks, r))
    open_ = jnp.mean(jnp.stack([aux.masks[p.name].mean() for p in points]))
    return hparams * loss, {"mask_loss": loss, "gates_open": open_}

  extra = {"predictors": ftwt.init_predictors(int(m.seed), points)}
  res = run_phase(config, workdir, phase="ftwt", init=(graphdef, state),
                  train_overrides={"epochs": m.epochs, "lr": m.backbone_lr},
                  tx=tx, schedule=backbone_lr, apply_fn=apply_fn, eval_apply_fn=eval_apply,
                  extra_loss=extra_loss, extra=extra,
                  hparams_fn=lambda step: jnp.float32(1.0 if step < cool else 0.0),
                  seed_offset=1)
  ev, per_sample = evaluate(config, gated_eval, graph, points, res.state)
  if jax.process_index() == 0:
    write_per_sample(workdir, per_sample)
  return {
      "test_accuracy": ev["accuracy"],
      "dense_accuracy": dense_eval.get("accuracy"),
      "macs": ev["macs_mean"], "params": float(jaxprune.cost(graph).params),
      "r": r, "mode": m.mode, "pool": m.pool, "gates": len(points),
      "dynamic": ev, "dense": pruning.count(graph),
  }


def oracle_curve(config, graphdef: nnx.GraphDef, state: T.TrainState,
                 rs=(0.8, 0.9, 0.95, 1.0)) -> list[dict[str, float]]:
  """Before training (spec B6): per r, the test accuracy and mean per-sample MACs of the
  network run with FTWT's targets as masks (`ftwt.oracle_masks`, ungated upstream).

  Example (no training; forward passes only):
    >>> graphdef, state = pruning.load_dense(config, "runs/dense_r20")
    >>> oracle_curve(config, graphdef, state)
  """
  info = data_lib.get_info(config.data.name)
  _, eval_fn = pruning.core_fns(graphdef)
  v = pruning.core_variables(state)
  x1 = np.zeros((1, *info.image_shape), np.float32)
  graph = jaxprune.trace(eval_fn, v, x1)
  points = ftwt.gate_points(eval_fn, graph, v, x1)
  gated_fn = jax.jit(ftwt.gated(eval_fn, graph, points))
  run = jax.jit(jaxprune.masked(eval_fn, graph))
  macs_fn = jax.jit(lambda m: ftwt.per_sample_cost(graph, m).macs)
  batches = list(data_lib.eval_batches(config.data.name, "test", data_dir=config.data.data_dir,
                                       batch_size=global_batch(config, "eval_batch_size")))
  dense = float(jaxprune.cost(graph).macs)
  rows = []
  for r in rs:
    correct, macs = 0, []
    for b in batches:
      x = jnp.asarray(b["image"])
      m = ftwt.oracle_masks(gated_fn, points, v, x, r)
      correct += int((np.asarray(run(v, m, x)).argmax(-1) == np.asarray(b["label"])).sum())
      macs.append(np.asarray(macs_fn(m)))
    macs = np.concatenate(macs)
    rows.append({"r": float(r), "accuracy": correct / macs.size, "macs_mean": float(macs.mean()),
                 "macs_std": float(macs.std()), "macs_reduction": 1 - float(macs.mean()) / dense})
  return rows
