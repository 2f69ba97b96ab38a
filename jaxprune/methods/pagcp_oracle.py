"""PAGCP's per-task oracle: validation losses of many candidate masks at once.

PAGCP asks, for every candidate pruning ratio of a unit, each task's loss on
a validation set. The official code prunes a copy of the network and runs
one validation pass per candidate. Here the candidates of a unit are masks
stacked on a leading axis and evaluated in one `jax.vmap` over
`jaxprune.masked` (`shard_map`-ed over the candidate axis when there are
several devices): through `jaxprune.gated`, the unit's candidate mask is set
just before the unit's producer runs, so the network up to that point runs
once for all candidates, and one compiled program serves every mask value.

Example:
  >>> from jaxprune.methods import pagcp_oracle
  >>> oracle = pagcp_oracle.make_oracle(
  ...     fn, graph, pagcp_oracle.cross_entropy_losses(("left", "right")),
  ...     {"image": x_val, "label": y_val})
  >>> candidates = np.stack([masks["encoder.stem.conv"]] * 3)   # K = 3 masks of the unit
  >>> candidates[1, :2] = candidates[2, :4] = 0
  >>> oracle.evaluate(variables, masks, "encoder.stem.conv", candidates).shape   # [K, tasks]
  (3, 2)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jaxprune
from jaxprune.graph import ChannelGraph


class Oracle(NamedTuple):
  """Per-task validation losses of the network when one unit's mask varies.

  `evaluate(variables, masks, group, candidates)` runs the network under
  hard `masks` with group `group`'s mask replaced by each row of `candidates`
  (`[K, size]`) and returns float64 `[K, num_tasks]`: each task's loss summed
  over the validation set, per candidate. One `jax.vmap` over the candidates:
  what comes before the group's producer is computed once for all of them.
  `losses` is the pure function it jits,
  `losses(variables, masks, candidates, batches, weights, group=...)`.
  """

  tasks: tuple[str, ...]
  evaluate: Callable[[Any, Mapping[str, Any], str, Any], np.ndarray]
  losses: Callable
  batches: Any
  weights: jax.Array


LossFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]


def cross_entropy_losses(tasks: Sequence[str], label_key: str = "label") -> dict[str, LossFn]:
  """Per-sample softmax cross-entropy of each task: `outputs[task]` against
  column t of `batch[label_key]` (the MultiMNIST layout, labels `[B, T]`).

  >>> losses = cross_entropy_losses(("left", "right"))
  """

  def make(t: int, name: str) -> LossFn:
    def loss(outputs, batch):
      logp = jax.nn.log_softmax(outputs[name])
      label = batch[label_key][:, t]
      return -jnp.take_along_axis(logp, label[:, None], axis=-1)[:, 0]

    return loss

  return {name: make(t, name) for t, name in enumerate(tasks)}


def _batches(data: Any, batch_size: int) -> tuple[Any, jax.Array, int]:
  """Leaves `[nb, B, ...]` (the last batch zero-padded) and weights `[nb, B]` (0 = pad)."""
  paths = jax.tree_util.tree_flatten_with_path(data)[0]
  if not paths:
    raise ValueError("the validation data is empty")
  sizes = {jax.tree_util.keystr(p): (np.shape(x)[0] if np.ndim(x) else None) for p, x in paths}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(
      "the validation data's arrays must share their first (sample) axis, one row per "
      f"sample for every task; got leading sizes {sizes}"
    )
  n = next(iter(sizes.values()))
  if n == 0:
    raise ValueError("the validation data has no samples")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  b = min(batch_size, n)
  nb = -(-n // b)

  def split(x):
    x = np.asarray(x)
    x = np.concatenate([x, np.zeros((nb * b - n, *x.shape[1:]), x.dtype)])
    return jnp.asarray(x.reshape(nb, b, *x.shape[1:]))

  weights = (np.arange(nb * b) < n).astype(np.float32).reshape(nb, b)
  return jax.tree_util.tree_map(split, data), jnp.asarray(weights), b


def make_oracle(
  fn: Callable,
  graph: ChannelGraph,
  task_losses: Mapping[str, LossFn],
  data: Any,
  *,
  inputs: Callable[[Any], tuple] | None = None,
  batch_size: int = 16,
  chunk: int | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Oracle:
  """The batched per-task oracle of a network on a validation set.

  Args:
    fn: `fn(variables, *inputs) -> outputs` in eval mode (the traced function).
    graph: its channel graph.
    task_losses: `{task: loss(outputs, batch) -> per-sample losses [B]}`
      (e.g. `cross_entropy_losses`).
    data: the validation set, a pytree of arrays with one row per sample
      (`{"image": [N, ...], "label": [N, T]}`); every task reads the same rows.
    inputs: `batch -> args of fn` (default `(batch["image"],)`).
    batch_size: samples per step of the scan over the validation set; each
      step runs K candidates x batch_size samples downstream of the unit (on
      CPU, K x batch_size of ~100-300 was fastest; an accelerator wants more).
    chunk: at most this many candidates per compiled call (memory), None: all.
    devices: devices to shard the candidates over (default all local ones).

  Raises:
    ValueError: no task, data arrays of different lengths, or (at the first
      evaluation) a task loss whose per-sample shape does not match the batch.
  """
  if not task_losses:
    raise ValueError("task_losses is empty: give one loss function per task")
  if chunk is not None and chunk < 1:
    raise ValueError(f"chunk must be None or >= 1, got {chunk}")
  tasks = tuple(task_losses)
  inputs = (lambda bt: (bt["image"],)) if inputs is None else inputs
  batches, weights, b = _batches(data, batch_size)
  loss_fns = [task_losses[t] for t in tasks]

  def gate(inp, candidate):
    # The unit's mask, set just before its producer runs: activations before
    # that point do not depend on the candidate, so vmap computes them once.
    return jnp.broadcast_to(candidate, (inp.x.shape[0], candidate.shape[-1])), None

  def losses(variables, masks, candidates, batches, weights, *, group):
    g = jaxprune.gated(fn, graph, gate, [group])

    def one(batch, w, candidate):
      out, _ = g(variables, {group: candidate}, *inputs(batch), masks=masks)
      return jnp.stack([jnp.sum(w * loss(out, batch)) for loss in loss_fns])

    per_candidate = jax.vmap(one, in_axes=(None, None, 0))

    def body(acc, xs):
      return acc + per_candidate(*xs, candidates), None

    init = jnp.zeros((candidates.shape[0], len(tasks)), jnp.float32)
    return jax.lax.scan(body, init, (batches, weights))[0]

  devices = list(jax.local_devices() if devices is None else devices)
  mesh = None
  if len(devices) > 1:
    mesh = jax.make_mesh((len(devices),), ("candidates",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))

  @functools.lru_cache(maxsize=None)
  def compiled(group: str):  # one program per unit: its prefix is shared differently
    run = functools.partial(losses, group=group)
    if mesh is not None:
      run = jax.shard_map(
        run, mesh=mesh, in_specs=(P(), P(), P("candidates"), P(), P()), out_specs=P("candidates"), check_vma=False
      )
    return jax.jit(run)

  checked: list[bool] = []

  def evaluate(variables, masks, group, candidates):
    masks = {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}
    jaxprune.check_masks(graph, masks)
    candidates = jnp.asarray(candidates, jnp.float32)
    size = graph.group(group).size
    if candidates.ndim != 2 or candidates.shape[1] != size or candidates.shape[0] < 1:
      raise ValueError(f"candidates for group {group!r} must have shape [K >= 1, {size}], got {candidates.shape}")
    if not checked:
      _check_task_shapes(fn, variables, tasks, loss_fns, inputs, jax.tree_util.tree_map(lambda x: x[0], batches), b)
      checked.append(True)
    k = candidates.shape[0]
    step = k if chunk is None else min(chunk, k)
    step = -(-step // len(devices)) * len(devices)
    outs = []
    for start in range(0, k, step):
      part = candidates[start : start + step]
      short = step - part.shape[0]
      if short:  # one compiled shape for every chunk: repeat the last candidate
        part = jnp.concatenate([part, jnp.repeat(part[-1:], short, 0)])
      out = compiled(group)(variables, masks, part, batches, weights)
      outs.append(np.asarray(out, np.float64)[: step - short])
    return np.concatenate(outs)

  return Oracle(tasks, evaluate, losses, batches, weights)


def _check_task_shapes(fn, variables, tasks, loss_fns, inputs, batch, b: int) -> None:
  outputs = jax.eval_shape(lambda v, bt: fn(v, *inputs(bt)), variables, batch)
  for t, loss in zip(tasks, loss_fns):
    shape = jax.eval_shape(loss, outputs, batch).shape
    if shape != (b,):
      raise ValueError(
        f"task {t!r}: its loss returns shape {shape} for a batch of {b} samples; a task loss "
        "must return one loss per sample of the shared batch (does it read labels or "
        "outputs with another number of rows?)"
      )
