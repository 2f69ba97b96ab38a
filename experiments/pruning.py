"""The pruning steps every method shares: dense start, trace and count, slim, time, finetune.

The model travels as ``(graphdef, TrainState)``; the core sees it through
the one NNX bridge (:mod:`jaxprune.nnx_bridge`) as a pure function of
``{"params", "batch_stats", "other"}`` (:func:`core_view`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxprune
from experiments import phases, results, timing
from experiments.recipe import Dense, Experiment, Outcome
from jaxprune import nnx_bridge
from jaxprune import training as T


class Slimmed(NamedTuple):
  """A physically smaller network and what was measured on it before finetuning."""

  state: T.TrainState
  cost: dict[str, float]  # `count` of the slimmed network
  accuracy: float | None  # test accuracy before finetuning
  speedup: dict[str, Any]  # `measure_speedup` against the dense network


def core_fns(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
  """(train_fn, eval_fn) over ``T.core_variables``; train_fn also returns the new BN stats."""
  return nnx_bridge.apply_fn(graphdef, train=True), nnx_bridge.apply_fn(graphdef)


def core_view(graphdef: nnx.GraphDef, state: T.TrainState) -> tuple[Callable, dict[str, Any]]:
  """``(fn, variables)`` for the core: the eval-mode forward over the model's collections.

  Only ``variables["params"]`` count as parameters in ``jaxprune.cost``.
  """
  return nnx_bridge.apply_fn(graphdef), T.core_variables(state)


def with_variables(state: T.TrainState, v: dict[str, Any]) -> T.TrainState:
  """The train state holding (slimmed) variables; optimizer state is reset by the next phase."""
  return state._replace(params=v['params'], batch_stats=v['batch_stats'], other=v['other'])


def trace(
  exp: Experiment, graphdef: nnx.GraphDef, state: T.TrainState, *, branches: bool = False
) -> jaxprune.ChannelGraph:
  return trace_state(graphdef, state, exp.info.image_shape, branches=branches)


def trace_state(
  graphdef: nnx.GraphDef, state: T.TrainState, image_shape, *, branches: bool = False
) -> jaxprune.ChannelGraph:
  fn, v = core_view(graphdef, state)
  return jaxprune.trace(fn, v, np.zeros((1, *image_shape), np.float32), branches=branches)


UNITS = ('branch', 'stream')


def branch_units(method) -> bool:
  """Whether a method's ``units`` are residual branches ("branch": the seed methods'
  units, traced with branch groups) or channel groups ("stream")."""
  units = method.get('units', 'stream')
  if units not in UNITS:
    raise ValueError(f'method.units must be one of {UNITS}, got {units!r}')
  return units == 'branch'


def method_graph(exp: Experiment, dense: Dense) -> jaxprune.ChannelGraph:
  """The graph a method masks: traced with branch groups on ``method.units='branch'``,
  the dense network's channel graph on ``'stream'``."""
  if branch_units(exp.config.method):
    return trace(exp, dense.graphdef, dense.state, branches=True)
  return dense.graph


def masked_apply(graphdef: nnx.GraphDef, graph: jaxprune.ChannelGraph, masks_fn: Callable) -> T.steps.ApplyFn:
  """An ``apply_fn`` running the network with every channel group scaled by
  ``masks_fn(variables, hparams)`` (soft, hard or per sample), through ``jaxprune.masked``,
  which scales a channel at every op that consumes it."""
  train_fn, eval_fn = (jaxprune.masked(f, graph) for f in core_fns(graphdef))

  def apply_fn(v, images, *, train, rng=None, hparams=None):
    masks = masks_fn(v, hparams)
    if train:
      return T.Forward(*train_fn(T.core_variables(v), masks, images))
    return T.Forward(eval_fn(T.core_variables(v), masks, images), v.batch_stats)

  return apply_fn


def count(graph: jaxprune.ChannelGraph, masks=None) -> dict[str, float]:
  """The network's cost per image in every unit: exact (``macs``, ``flops``,
  ``params``, ``channels``, ``volume``) and the papers' ``flops_paper``."""
  c = jaxprune.cost(graph, masks)
  paper = jaxprune.cost(graph, masks, mode='paper')
  return {
    'macs': float(c.macs),
    'flops': float(c.flops),
    'flops_paper': float(paper.flops),
    'params': float(c.params),
    'channels': float(c.channels),
    'volume': float(c.volume),
  }


def ratios(pruned: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
  """``count`` of a pruned network over the dense one's, per unit."""
  return {k: pruned[k] / dense[k] for k in dense if k in pruned}


def measure_speedup(
  graphdef: nnx.GraphDef,
  dense: T.TrainState,
  small: T.TrainState,
  image_shape: tuple[int, ...],
  batch: int = 128,
  reps: int = 5,
) -> dict[str, Any]:
  """Inference time of the dense and the slimmed network, measured side by side."""
  fn, vd = core_view(graphdef, dense)
  f = jax.jit(fn)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *image_shape)), jnp.float32)
  vs = T.core_variables(small)
  t = timing.interleaved({'dense': lambda: f(vd, x), 'slim': lambda: f(vs, x)}, reps=reps)
  return {
    'dense_ms': 1e3 * t['dense'],
    'slim_ms': 1e3 * t['slim'],
    'speedup': t['dense'] / t['slim'],
    'batch': batch,
    'device': jax.devices()[0].device_kind,
    'machine': timing.machine(),
  }


def load_dense(config, workdir: str) -> tuple[nnx.GraphDef, T.TrainState]:
  """The dense state of another run (its ``pretrain`` or dense ``train`` phase), read-only.

  Used by ``method.pretrained=<workdir>`` to share one dense training between runs.
  """
  for phase in ('pretrain', 'train'):
    d = os.path.join(workdir, phase, 'checkpoints')
    if os.path.isdir(d):
      break
  else:
    raise FileNotFoundError(f'method.pretrained={workdir!r}: no pretrain/ or train/ checkpoints')
  tx, _ = T.optim_from_config(dict(config.train), 1)
  graphdef, template = T.create_train_state(phases.build_model(config), tx, config.seed)
  ckpt = T.Checkpointer(d, read_only=True)
  try:
    state, _ = ckpt.restore(template)
  except ValueError as e:  # a structure mismatch: another model or optimizer (corruption raises as itself)
    raise ValueError(
      f"cannot restore {d} into this config's model and optimizer ({config.model.name}, {config.train.optimizer}): {e}"
    ) from e
  finally:
    ckpt.close()
  return graphdef, state


def counted(exp: Experiment, graphdef: nnx.GraphDef, state: T.TrainState, metrics: dict) -> Dense:
  """``Dense`` of a network: traced, counted, with its test metrics."""
  graph = trace(exp, graphdef, state)
  return Dense(graphdef, state, graph, count(graph), metrics)


def dense_start(exp: Experiment, *, phase: str = 'pretrain') -> Dense:
  """The dense network a method starts from and its test metrics: another run's
  (``method.pretrained``, read-only) or this run's ``phase`` (trained, resumable)."""
  pretrained = exp.config.method.get('pretrained')
  if pretrained:
    graphdef, state = load_dense(exp.config, pretrained)
    metrics = {}
  else:
    pre = phases.train(exp, phase, phases.build_model(exp.config))
    graphdef, state, metrics = pre.graphdef, pre.state, pre.eval
  if not metrics:  # a loaded run, or a phase with no eval to report (0 steps)
    metrics = phases.evaluate(exp, graphdef, state)
  return counted(exp, graphdef, state, metrics)


SLIM_FILE = 'slim.json'


def slim(exp: Experiment, dense: Dense, out: Outcome) -> Slimmed:
  """Slims ``out.variables`` (default: the dense network) by ``out.masks``; counts,
  evaluates and times it against the dense network.

  The measurements are kept in ``workdir/slim.json``: a resumed run slims again
  (milliseconds) but does not evaluate and time the slimmed network twice."""
  variables = T.core_variables(dense.state) if out.variables is None else out.variables
  graph = dense.graph if out.graph is None else out.graph
  small = with_variables(dense.state, jaxprune.slim(variables, graph, out.masks))._replace(extra={})
  # Counted on the traced graph: exactly the slimmed network's cost (tested), and a
  # branch-slimmed network (which gathers channels by index) cannot be re-traced.
  cost = count(graph, out.masks)
  path = os.path.join(exp.workdir, SLIM_FILE)
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    return Slimmed(small, cost, done['accuracy'], done['speedup'])
  accuracy = phases.evaluate(exp, dense.graphdef, small).get('accuracy')
  # Speed depends on shapes only, so the slimmed net is timed before finetuning.
  speed = measure_speedup(dense.graphdef, dense.state, small, exp.info.image_shape)
  if jax.process_index() == 0:
    os.makedirs(exp.workdir, exist_ok=True)
    results.write_json(path, {'accuracy': accuracy, 'speedup': speed})
  return Slimmed(small, cost, accuracy, speed)


def finetune(
  exp: Experiment, graphdef: nnx.GraphDef, state: T.TrainState, overrides=None, *, phase: str = 'finetune'
) -> phases.PhaseResult:
  """Trains a slimmed network with ``overrides`` of ``config.train`` (default
  ``config.method.finetune``), as a fresh phase."""
  overrides = exp.config.method.finetune if overrides is None else overrides
  return phases.train(exp, phase, (graphdef, state), overrides=dict(overrides), extra={})


def kept_per_group(masks: dict[str, Any]) -> dict[str, int]:
  return {k: int(np.asarray(v).sum()) for k, v in masks.items()}


def per_sample(
  exp: Experiment, forward: Callable, graph: jaxprune.ChannelGraph, extra: Callable | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A dynamic network over the test split: per image, ``correct``, ``label``, ``loss``
  (cross-entropy: the image's difficulty), the core's cost of its masks (``macs``, ``flops``, ``channels``, ``volume``, the papers'
  ``flops_paper``) and ``extra(masks)``'s arrays; and a summary (accuracy, count,
  mean/std/min/max of the per-image MACs). ``forward(images) -> (logits, masks)``, the
  masks with a leading batch axis."""

  def costs(m):
    c, paper = (jax.vmap(lambda mi, mode=mode: jaxprune.cost(graph, mi, mode=mode))(m) for mode in ('exact', 'paper'))
    out = dict(macs=c.macs, flops=c.flops, channels=c.channels, volume=c.volume, flops_paper=paper.flops)
    return {**out, **(extra(m) if extra else {})}

  cost_fn, per = jax.jit(costs), {}
  for b in phases.eval_slice(exp.config, 'test'):
    logits, masks = forward(jnp.asarray(b['image']))
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32), jnp.asarray(b['label']))
    hits = {'correct': np.asarray(logits).argmax(-1) == b['label'], 'label': b['label'], 'loss': ce}
    for k, x in {**cost_fn(masks), **hits}.items():
      per.setdefault(k, []).append(np.asarray(x))
  per = {k: np.concatenate(x) for k, x in per.items()}
  summary = {'accuracy': float(per['correct'].mean()), 'count': int(per['macs'].size)}
  summary.update({f'macs_{k}': float(getattr(per['macs'], k)()) for k in ('mean', 'std', 'min', 'max')})
  if 'gates' in per:  # distinct gate patterns over the test set: really per sample, or a few static masks?
    patterns, counts = np.unique(per.pop('gates') > 0.5, axis=0, return_counts=True)
    summary.update(patterns=int(len(patterns)), top_pattern_share=float(counts.max() / counts.sum()))
  return per, summary


def gated_forward(gated_train: Callable, gated_eval: Callable, args: Callable) -> tuple[Callable, Callable]:
  """(apply_fn, eval_apply_fn) of a gated network for :class:`phases.Step`.

  ``gated_train(*args(v), images) -> ((logits, batch_stats), aux)`` and
  ``gated_eval(*args(v), images) -> (logits, aux)``; ``args(v)`` picks the
  network's inputs from the train state's variables (e.g. its ``extra`` gates).
  """

  def apply_fn(v, images, *, train, rng=None, hparams=None):
    if train:
      (logits, stats), aux = gated_train(*args(v), images)
      return T.Forward(logits, stats, aux)
    logits, aux = gated_eval(*args(v), images)
    return T.Forward(logits, v.batch_stats, aux)

  return apply_fn, lambda v, images, *, train=False, rng=None, hparams=None: apply_fn(v, images, train=False)


def dynamic_outcome(exp: Experiment, per: dict[str, np.ndarray], summary: dict[str, Any], dense: Dense,
                    details: dict[str, Any]) -> Outcome:  # fmt: skip
  """A dynamic method's :class:`Outcome`: mean per-image cost, every weight stored
  (params: the dense network's); the per-image arrays go to ``per_sample.npz``."""
  if jax.process_index() == 0:  # for histograms; experiments.summarize reads the summary
    tmp = os.path.join(exp.workdir, 'per_sample.tmp.npz')
    np.savez(tmp, **per)
    os.replace(tmp, os.path.join(exp.workdir, 'per_sample.npz'))
  cost = {k: float(per[k].mean()) for k in ('macs', 'flops', 'flops_paper', 'channels', 'volume')}
  cost['params'] = dense.cost['params']
  return Outcome(accuracy=summary['accuracy'], cost=cost, dynamic=summary, details=details)


def host_copy(tree):
  """A numpy copy (a train step donates, i.e. deletes, the device arrays of its input)."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def save_masks(path: str, masks: dict[str, Any], **meta: Any) -> None:
  """Hard masks as JSON (0/1 lists per group) with ``meta`` (budget, model, data, ...)."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    results.write_json(path, {**meta, 'masks': {k: [int(x) for x in np.asarray(m)] for k, m in masks.items()}})


FINAL = 'final'  # workdir/final: the finished slimmed network, read by `python -m experiments.export`


def save_final(
  workdir: str, state: T.TrainState, masks: dict[str, Any], graph: jaxprune.ChannelGraph, dense_graph: bool
) -> None:
  """The run's final (slimmed, finetuned) network: its variables with orbax in
  ``workdir/final/variables`` and the masks it was slimmed by in ``final/masks.json``.

  ``dense_graph``: whether ``graph`` (the masks' graph) is the trace of the run's dense
  network (not of an intermediate, already slimmed one); only then can the export pad
  the widths (``jaxprune.deploy.pad_channels``). Rerunning a finished run rewrites both.
  """
  import orbax.checkpoint as ocp

  d = os.path.abspath(os.path.join(workdir, FINAL))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(d, 'variables'), host_copy(T.core_variables(state)), force=True)
  ckpt.wait_until_finished()
  save_masks(os.path.join(d, 'masks.json'), masks, branches=graph.has_branches, dense_graph=dense_graph)


def load_final(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """What :func:`save_final` wrote: ``(variables, masks meta)``; the meta holds the raw
  ``masks`` lists, ``branches`` and ``dense_graph``."""
  import orbax.checkpoint as ocp

  d = os.path.abspath(os.path.join(workdir, FINAL))
  if not os.path.exists(os.path.join(d, 'masks.json')):
    raise FileNotFoundError(
      f'{workdir} has no {FINAL}/ (the final slimmed network): the run was made before runs saved '
      'it, or its method does not slim. Run the same experiments.main command with the same '
      '--workdir again: finished phases are restored, not retrained, and final/ is written.'
    )
  with open(os.path.join(d, 'masks.json')) as f:
    meta = json.load(f)
  return ocp.StandardCheckpointer().restore(os.path.join(d, 'variables')), meta


def load_masks(path: str, graph: jaxprune.ChannelGraph) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """Masks saved by :func:`save_masks`, checked against ``graph``; and their meta."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no masks at {path} (run the method there first)')
  with open(path) as f:
    meta = json.load(f)
  masks = {k: jnp.asarray(v, jnp.float32) for k, v in meta.pop('masks').items()}
  try:
    jaxprune.check_masks(graph, masks)
  except ValueError as e:
    raise ValueError(f'masks from {path} (model {meta.get("model")}) do not fit this model: {e}') from e
  return masks, meta
