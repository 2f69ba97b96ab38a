"""A run's workdir: writable, and holding this experiment's run and no other.

``workdir/config.json`` records the config a run was started with. Running
again with the same workdir resumes the run only under the same config, apart
from keys that cannot change its results (:data:`NEUTRAL`: logging and
progress, evaluation and checkpoint cadence, debug stops, the non-finite
policy). Any other difference is refused with the differences listed, unless
``--config.checkpoint.force_resume=True``; a forced change is appended to
``workdir/config_changes.jsonl``. A workdir of a run from before this record
is checked against its ``results.json`` config when it has one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from ml_collections import config_dict

from experiments import results

CONFIG_FILE = 'config.json'
CHANGES_FILE = 'config_changes.jsonl'
RESULTS_FILE = results.FILE
# Keys that cannot change a run's results: a dotted path, or a last component
# (also inside per-phase overrides such as method.finetune). Checkpoint cadence
# and the non-finite policy are free because a resumed run is bit-identical to
# an uninterrupted one and both policies run the same compiled step.
NEUTRAL = (
  'progress',
  'checkpoint.every_steps',
  'checkpoint.keep',
  'checkpoint.force_resume',
  'log_every',
  'eval_every_epochs',
  'stop_after_steps',
  'on_nonfinite',
  'max_skipped_steps',
)


class WorkdirError(ValueError):
  """A workdir that cannot be used (unwritable, or a file)."""


class ConfigChangedError(ValueError):
  """A workdir holding a run of another config."""


def plain(config: config_dict.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as JSON values (tuples as lists), as ``results.json`` stores it."""
  d = config.to_dict() if isinstance(config, config_dict.ConfigDict) else dict(config)
  return json.loads(json.dumps(d, default=str))


def flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):  # an empty one adds nothing: its keys show on the other side
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def is_neutral(path: str) -> bool:
  return path in NEUTRAL or path.rsplit('.', 1)[-1] in NEUTRAL


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{dotted path: (old, new)}`` of the leaves that differ (absent: ``'<absent>'``)."""
  a, b = flatten(old), flatten(new)
  missing = '<absent>'
  return {
    p: (a.get(p, missing), b.get(p, missing)) for p in sorted(set(a) | set(b)) if a.get(p, missing) != b.get(p, missing)
  }


def _recorded(workdir: str) -> tuple[dict[str, Any] | None, str | None]:
  for name, key in ((CONFIG_FILE, None), (RESULTS_FILE, 'config')):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        d = json.load(f)
      d = d.get(key) if key else d
      if isinstance(d, dict):
        return d, path
  return None, None


def check_writable(workdir: str) -> None:
  """Creates ``workdir``; raises :class:`WorkdirError` saying what to do when it cannot be written."""
  probe = os.path.join(workdir, f'.write_test_{jax.process_index()}_{os.getpid()}')  # hosts may share the folder
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
      f'cannot write to the workdir {workdir!r} ({e}). Pass a --workdir in a folder you can write to.'
    ) from e


def prepare(config: config_dict.ConfigDict, workdir: str) -> dict[str, tuple[Any, Any]]:
  """Checks that ``workdir`` can hold this run: writable, and empty or holding a
  run of this config. Returns the differences ``force_resume`` lets through
  (``{}`` without it). Nothing is recorded: see :func:`record`.

  Raises:
    WorkdirError: the workdir cannot be written.
    ConfigChangedError: it holds a run of another config (the message lists the
      differences); ``config.checkpoint.force_resume`` lets it through.
  """
  check_writable(workdir)
  old, where = _recorded(workdir)
  if old is None:
    return {}
  changed = {p: d for p, d in differences(old, plain(config)).items() if not is_neutral(p)}
  if changed and not config.checkpoint.force_resume:
    lines = '\n'.join(f'  {p}: {a!r} -> {b!r}' for p, (a, b) in changed.items())
    raise ConfigChangedError(
      f'the workdir {workdir!r} holds a run of another config ({where}); what differs:\n{lines}\n'
      'Resuming it would mix two experiments. Use a new --workdir for a new experiment, or add '
      '--config.checkpoint.force_resume=True to continue this run with the new values (its finished '
      'phases are kept as they are).'
    )
  return changed


def record(config: config_dict.ConfigDict, workdir: str, forced: Mapping[str, tuple[Any, Any]]) -> None:
  """Writes ``workdir/config.json`` (once the run's input passed its checks) and
  appends forced changes to ``config_changes.jsonl``."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  if forced:
    logging.warning('force_resume: continuing %s with a changed config: %s', workdir, forced)
    with open(os.path.join(workdir, CHANGES_FILE), 'a') as f:
      f.write(json.dumps({'time': time.time(), 'changed': {p: list(d) for p, d in forced.items()}}) + '\n')
  results.write_json(os.path.join(workdir, CONFIG_FILE), plain(config), indent=2)
