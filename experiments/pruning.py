"""Glue between the training state and the pruning core, shared by method pipelines."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune
from jaxprune import training as T
from jaxprune.timing import interleaved
from experiments.train import build_model, make_eval_fn, run_phase


def core_variables(state: T.TrainState) -> dict[str, Any]:
  """The core's view of a train state's variables: {"params", "batch_stats", "other"}.

  Works on a TrainState or anything with those attributes.
  """
  return {"params": state.params, "batch_stats": state.batch_stats, "other": state.other}


def core_fns(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
  """(train_fn, eval_fn) over `core_variables`; train_fn also returns the new BN stats."""
  def train_fn(v, x):
    model = nnx.merge(graphdef, v["params"], v["batch_stats"], v["other"], copy=True)
    model.train()
    logits = model(x)
    return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  def eval_fn(v, x):
    model = nnx.merge(graphdef, v["params"], v["batch_stats"], v["other"], copy=True)
    model.eval()
    return model(x)
  return train_fn, eval_fn


def core_view(graphdef: nnx.GraphDef, state: T.TrainState) -> tuple[Callable, dict[str, Any]]:
  """`(fn, variables)` for the core: the eval-mode forward over the model's collections.

  Only `variables["params"]` count as parameters in `jaxprune.cost`.
  """
  return core_fns(graphdef)[1], core_variables(state)


def with_variables(state: T.TrainState, v: dict[str, Any]) -> T.TrainState:
  """The train state holding (slimmed) variables; optimizer state is reset by the next phase."""
  return state._replace(params=v["params"], batch_stats=v["batch_stats"], other=v["other"])


def count(graph: jaxprune.ChannelGraph, masks=None) -> dict[str, float]:
  c = jaxprune.cost(graph, masks)
  paper = jaxprune.cost(graph, masks, mode="paper")
  return {"macs": float(c.macs), "flops": float(c.flops), "flops_paper": float(paper.flops),
          "params": float(c.params), "channels": float(c.channels), "volume": float(c.volume)}


def measure_speedup(graphdef: nnx.GraphDef, dense: T.TrainState, small: T.TrainState,
                    image_shape: tuple[int, ...], batch: int = 128, reps: int = 5) -> dict[str, float]:
  """Inference time of the dense and the slimmed network, measured side by side."""
  fn, _ = core_view(graphdef, dense)
  f = jax.jit(fn)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *image_shape)), jnp.float32)
  vd, vs = core_view(graphdef, dense)[1], core_view(graphdef, small)[1]
  t = interleaved({"dense": lambda: f(vd, x), "slim": lambda: f(vs, x)}, reps=reps)
  return {"dense_ms": 1e3 * t["dense"], "slim_ms": 1e3 * t["slim"],
          "speedup": t["dense"] / t["slim"], "batch": batch, "device": jax.devices()[0].device_kind}


def load_dense(config, workdir: str) -> tuple[nnx.GraphDef, T.TrainState]:
  """The dense state of another run (its `pretrain` or dense `train` phase), read-only.

  Used by `method.pretrained=<workdir>` to share one dense training between runs.
  """
  for phase in ("pretrain", "train"):
    d = os.path.join(workdir, phase, "checkpoints")
    if os.path.isdir(d):
      break
  else:
    raise FileNotFoundError(f"method.pretrained={workdir!r}: no pretrain/ or train/ checkpoints")
  tx, _ = T.optim_from_config(dict(config.train), 1)
  graphdef, template = T.create_train_state(build_model(config), tx, config.seed)
  ckpt = T.Checkpointer(d)
  try:
    state, _ = ckpt.restore(template)
  except Exception as e:  # a structure mismatch: another model or optimizer
    raise ValueError(f"cannot restore {d} into this config's model and optimizer "
                     f"({config.model.name}, {config.train.optimizer}): {e}") from e
  finally:
    ckpt.close()
  return graphdef, state


def dense_start(config, workdir: str, pretrained: str | None = None
                ) -> tuple[nnx.GraphDef, T.TrainState, dict[str, float]]:
  """The dense network a method starts from and its test metrics: another run's
  (`pretrained`, read-only) or this run's `pretrain` phase (resumable)."""
  if pretrained:
    graphdef, state = load_dense(config, pretrained)
    metrics = {}
  else:
    pre = run_phase(config, workdir, phase="pretrain")
    graphdef, state, metrics = pre.graphdef, pre.state, pre.eval
  if not metrics:  # a loaded run, or a phase with no eval to report (0 steps)
    metrics = make_eval_fn(config, T.nnx_apply(graphdef), mesh=T.make_mesh())(state)
  return graphdef, state, metrics


def ratios(pruned: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
  """`count` of a pruned network over the dense one's, per unit."""
  return {k: pruned[k] / dense[k] for k in dense}
