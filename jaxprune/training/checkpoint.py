"""orbax checkpoints of the train state *and* the loop's host state, verified on restore.

Each checkpoint is a step directory with two items: ``state`` (the
:class:`~jaxprune.training.state.TrainState` pytree, restored with the
shardings of a template state) and ``meta`` (JSON: the data iterator's state,
metric accumulators, elapsed time, anything the loop needs to resume exactly).

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<id>`` and
renames it to ``<step>`` only when every item is written
(``AtomicRenameTemporaryPath``, the default on local and POSIX file systems);
a killed save leaves a tmp directory that ``latest_step`` ignores and the next
``Checkpointer`` deletes. A save that fails (a full disk, a lost mount) raises
:class:`CheckpointWriteError` and leaves nothing of that step behind. The last
``keep`` checkpoints are kept.

Integrity: ``meta`` also records every state array's path, shape, dtype and
CRC-32, and a CRC-32 of itself. orbax restores flipped bytes of an array
without complaint; here a restore checks both, so a truncated or corrupted
checkpoint raises :class:`CorruptCheckpointError` naming it (and, with
``fallback=True``, is moved aside to ``<step>.corrupt`` and the previous one
restored), and a checkpoint of another model or optimizer raises a
``ValueError`` naming the first array that differs.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pickle
import shutil
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxprune.training.state import TrainState

_PICKLED = '__pickled__'
_LAYOUT = '__layout__'  # [[path, shape, dtype, crc32], ...] of the state's arrays
_META_CRC = '__meta_crc32__'


class CorruptCheckpointError(Exception):
  """A checkpoint that cannot be read back as it was written (truncated, corrupted)."""

  def __init__(self, path: str, reason: str):
    self.path = path
    super().__init__(f'checkpoint {path} is corrupt or incomplete: {reason}')


class CheckpointWriteError(OSError):
  """A save that failed; nothing of the step it was writing is kept."""


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


def _crc(text: str) -> int:
  return zlib.crc32(text.encode())


def _host_bytes(x: Any) -> np.ndarray | None:
  """The host copy of an array (one replica of a replicated one); None when this
  process holds only part of it."""
  if isinstance(x, jax.Array):
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if not x.is_fully_addressable:
      return None
  return np.asarray(x)


def _layout(tree: Any, *, crc: bool) -> list[list]:
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
    entry = [jax.tree_util.keystr(path), list(np.shape(x)), str(np.dtype(dtype))]
    if crc:
      data = _host_bytes(x)
      entry.append(None if data is None else zlib.crc32(np.ascontiguousarray(data).tobytes()))
    out.append(entry)
  return out


class Checkpointer:
  """Saves and restores ``(TrainState, meta)`` under ``directory``.

  >>> ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=2)  # doctest: +SKIP
  >>> ckpt.save(100, state, {'data': it.get_state()})  # doctest: +SKIP
  >>> state, meta = ckpt.restore(template_state)  # latest  # doctest: +SKIP

  ``read_only=True`` (reading another run) neither creates nor cleans anything.
  """

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = False, read_only: bool = False):
    # Synchronous by default: the train step donates the state's buffers, so a
    # background writer must not keep reading them after save() returns.
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=not read_only,
      read_only=read_only,
    )
    if not read_only and jax.process_index() == 0:
      self._remove_tmp('*')  # what a killed save left
    self._mngr = self._manager()

  def _manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=('state', 'meta'))

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: TrainState, meta: dict[str, Any] | None = None, *, force: bool = True) -> bool:
    """Writes step ``step``; returns False when it already exists.

    Raises:
      CheckpointWriteError: the write failed (e.g. no space left); the partial
        step is deleted and the previous checkpoints are untouched. (With
        ``async_save`` a failure surfaces from ``wait``/``close`` as orbax
        raises it; the next start deletes the partial step.)
    """
    if step in self._mngr.all_steps():
      return False
    meta = {k: _jsonable(v) for k, v in (meta or {}).items()}
    meta[_LAYOUT] = _layout(state, crc=True)
    meta[_META_CRC] = _crc(json.dumps(meta, sort_keys=True))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
      return self._mngr.save(step, args=args, force=force)
    except Exception as e:
      self._write_failed(step, e)

  def _write_failed(self, step: int, error: Exception):
    self._discard(step)
    previous = self.latest_step()
    kept = f'the latest complete checkpoint is step {previous}' if previous is not None else 'there is no earlier one'
    raise CheckpointWriteError(
      f'could not write checkpoint step {step} to {self.directory}: {error}. Nothing of step {step} was kept '
      f'({kept}). Free disk space (or move the run to a file system with room) and run again to resume.'
    ) from error

  def _discard(self, step: int) -> None:
    """Deletes whatever a failed save of ``step`` left and starts a fresh manager
    (the old one may still count the step as in progress)."""
    for finish in (self._mngr.wait_until_finished, self._mngr.close):  # other items may still be writing
      try:
        finish()
      except Exception as e:  # their errors, or the same failure again
        logging.warning('checkpoint manager after a failed save: %s', str(e)[:300])
    if jax.process_index() == 0:
      # Writer threads of the other items can outlive the error and recreate
      # files under the tmp dir: remove it until it stays gone (a restart would too).
      deadline, quiet = time.monotonic() + 10.0, 0
      while quiet < 3 and time.monotonic() < deadline:
        quiet = 0 if self._remove_tmp(str(step)) else quiet + 1
        time.sleep(0.1)
    self._mngr = self._manager()

  def _remove_tmp(self, step: str) -> bool:
    """Deletes the tmp dirs of unfinished saves of ``step``; True if there were any."""
    found = glob.glob(os.path.join(glob.escape(self.directory), f'{step}.orbax-checkpoint-tmp*'))
    for d in found:
      shutil.rmtree(d, ignore_errors=True)
    return bool(found)

  def restore(
    self, template: TrainState, step: int | None = None, *, fallback: bool = False
  ) -> tuple[TrainState, dict[str, Any]]:
    """Restores ``step`` (default latest) into the structure, dtypes and
    shardings of ``template`` (a state or its ``jax.ShapeDtypeStruct``s).

    Args:
      fallback: when the latest checkpoint is corrupt, log a warning naming it,
        move it aside (``<step>.corrupt``) and restore the one before.

    Raises:
      FileNotFoundError: no checkpoint.
      CorruptCheckpointError: the checkpoint (with ``fallback``: every one) is
        truncated or corrupted; the message names it.
      ValueError: the checkpoint holds another structure (model, optimizer).
    """
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {self.directory}')
    bad = []
    for s in steps:
      try:
        return self._restore(template, s)
      except CorruptCheckpointError as e:
        if not fallback or step is not None:
          raise
        bad.append(str(e))
        moved = self._quarantine(s)
        logging.warning('%s; moved it to %s and trying the previous checkpoint.', e, moved)
    raise CorruptCheckpointError(
      self.directory,
      'no readable checkpoint left (' + '; '.join(bad) + f'). Delete {self.directory} to start this phase over.',
    )

  def _restore(self, template: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
    path = self.step_path(step)
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}
    except Exception as e:
      raise CorruptCheckpointError(path, f'its meta item cannot be read ({type(e).__name__}: {e})') from e
    layout = meta.pop(_LAYOUT, None)
    stored_crc = meta.pop(_META_CRC, None)
    if stored_crc is not None and _crc(json.dumps({**meta, _LAYOUT: layout}, sort_keys=True)) != stored_crc:
      raise CorruptCheckpointError(path, 'its meta item does not match its checksum')
    if layout is not None:
      _check_structure(path, layout, _layout(template, crc=False))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:
      if layout is None:  # written before checksums: cannot tell corruption from another structure
        raise
      raise CorruptCheckpointError(path, f'its state cannot be read ({type(e).__name__}: {str(e)[:300]})') from e
    if layout is not None:
      for (name, *_, want), (_, *_, got) in zip(layout, _layout(state, crc=True)):
        if want is not None and got is not None and want != got:
          raise CorruptCheckpointError(path, f'array {name} does not match its checksum')
    return state, {k: _unjson(v) for k, v in meta.items()}

  def _quarantine(self, step: int) -> str | None:
    """Moves a corrupt step out of the manager's sight, keeping it for inspection."""
    src, dst = self.step_path(step), self.step_path(step) + '.corrupt'
    if jax.process_index() == 0:
      n = 0
      while os.path.exists(dst):
        n += 1
        dst = f'{self.step_path(step)}.corrupt.{n}'
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'jaxprune_quarantine_{step}')
    self._mngr.reload()
    return dst if jax.process_index() == 0 else None

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


def _check_structure(path: str, stored: list[list], wanted: list[list]) -> None:
  """A checkpoint of another model or optimizer is not corrupt: say what differs."""
  s = {p: f'{dtype}{shape}' for p, shape, dtype, *_ in stored}
  w = {p: f'{dtype}{shape}' for p, shape, dtype, *_ in wanted}
  if s == w:
    return
  only_s, only_w = sorted(set(s) - set(w)), sorted(set(w) - set(s))
  differ = [f'{p}: {s[p]} in the checkpoint, {w[p]} expected' for p in s if p in w and s[p] != w[p]]
  parts = (
    differ[:3] + [f'only in the checkpoint: {only_s[:3]}'] * bool(only_s) + [f'missing: {only_w[:3]}'] * bool(only_w)
  )
  raise ValueError(
    f'checkpoint {path} holds a different state than expected (another model, method or optimizer?): '
    + '; '.join(parts)
  )
