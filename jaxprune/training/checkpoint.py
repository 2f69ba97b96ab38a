"""orbax checkpoints of the train state *and* the loop's host state.

Each checkpoint is a step directory with two items: ``state`` (the
:class:`~jaxprune.training.state.TrainState` pytree, restored with the
shardings of a template state) and ``meta`` (JSON: the data iterator's state,
metric accumulators, elapsed time, anything the loop needs to resume exactly).

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<id>`` and
renames it to ``<step>`` only when every item is written
(``AtomicRenameTemporaryPath``, the default on local and POSIX file systems);
a killed save leaves a tmp directory that ``latest_step`` ignores and the next
manager cleans up. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxprune.training.state import TrainState

_PICKLED = '__pickled__'


def _jsonable(x: Any) -> Any:
  """JSON as is when possible; otherwise a base64 pickle (iterator states of
  some pipelines hold bytes or numpy scalars)."""
  try:
    json.dumps(x)
    return x
  except TypeError:
    return {_PICKLED: base64.b64encode(pickle.dumps(x)).decode('ascii')}


def _unjson(x: Any) -> Any:
  if isinstance(x, dict) and set(x) == {_PICKLED}:
    return pickle.loads(base64.b64decode(x[_PICKLED]))
  return x


class Checkpointer:
  """Saves and restores ``(TrainState, meta)`` under ``directory``.

  >>> ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=2)  # doctest: +SKIP
  >>> ckpt.save(100, state, {'data': it.get_state()})  # doctest: +SKIP
  >>> state, meta = ckpt.restore(template_state)  # latest  # doctest: +SKIP
  """

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = False):
    # Synchronous by default: the train step donates the state's buffers, so a
    # background writer must not keep reading them after save() returns.
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: TrainState, meta: dict[str, Any] | None = None, *, force: bool = True) -> bool:
    """Writes step ``step``; returns False when it already exists."""
    if step in self._mngr.all_steps():
      return False
    meta = {k: _jsonable(v) for k, v in (meta or {}).items()}
    return self._mngr.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force
    )

  def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restores ``step`` (default latest) into the structure, dtypes and
    shardings of ``template`` (a state or its ``jax.ShapeDtypeStruct``s)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    r = self._mngr.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    meta = {k: _unjson(v) for k, v in (r.meta or {}).items()}
    return r.state, meta

  def reached_preemption(self, step: int) -> bool:
    """True when the job got a preemption notice (multi-host TPU/GPU); save then."""
    return self._mngr.reached_preemption(step)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
