"""One results schema for every method: ``workdir/results.json``.

Keys (``None`` where a key does not apply, e.g. no speedup for a dynamic
network, no budget for FTWT):

  schema             SCHEMA (this layout's version)
  method, seed, dataset, model
  test_accuracy      final test accuracy (after finetuning, for static methods)
  dense_accuracy     test accuracy of the dense network the method started from
  pruned_accuracy_before_finetune   the slimmed network's, before finetuning
  budget, unit       the target: fraction of the dense cost kept, in a cost unit
  achieved           ratios[unit]: the fraction actually kept
  dense, pruned      cost per image, exact (macs, flops, params, channels,
                     volume) and the papers' count (flops_paper = 2 x conv/dense
                     MACs); for a dynamic method ``pruned`` is the mean over the
                     test images, params the stored network's
  ratios             pruned / dense per unit (MACs, params, volume kept, ...)
  macs, params       pruned["macs"], pruned["params"]
  speedup            measured inference speedup of the slimmed network:
                     dense_ms, slim_ms, speedup, batch, device, machine
  kept_per_group, group_sizes   channels kept per channel group (static)
  dynamic            per-sample statistics of a dynamic method (mean/std of
                     per-image MACs, ...)
  source             where transferred masks came from (mask transfer)
  details            the method's own numbers
  phase_times_s      wall seconds per pipeline step in the last process
                     (dense_start, method, slim, finetune, ...)
  wall_time_s, devices, platform
  cpu_cores          CPU cores the process could use (its affinity): XLA:CPU's
                     numbers depend on it, see README "Reliability"
  config             the full config

``python -m experiments.summarize RUN_DIRS...`` reads any mix of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax

SCHEMA = 1
FILE = 'results.json'
REQUIRED = ('schema', 'method', 'seed', 'dataset', 'model', 'test_accuracy', 'config')


def record(
  config,
  *,
  test_accuracy: float | None,
  dense_accuracy: float | None,
  dense: Mapping[str, float],
  pruned: Mapping[str, float],
  budget: float | None = None,
  unit: str | None = None,
  **sections: Any,
) -> dict[str, Any]:
  """A results record: the common keys from the numbers, then ``sections``
  (pruned_accuracy_before_finetune, speedup, kept_per_group, group_sizes,
  dynamic, source, details, phase_times_s, ...)."""
  ratios = {k: pruned[k] / dense[k] for k in dense if k in pruned and dense[k]}
  # a method's own budget unit (e.g. ChipNet's volume_paper) is in its details
  achieved = ratios.get(unit) if unit in ratios else (sections.get('details') or {}).get(unit)
  return {
    'schema': SCHEMA,
    'method': config.method.name,
    'seed': int(config.seed),
    'dataset': config.data.name,
    'model': config.model.name,
    'test_accuracy': test_accuracy,
    'dense_accuracy': dense_accuracy,
    'pruned_accuracy_before_finetune': None,
    'budget': budget,
    'unit': unit,
    'achieved': achieved if unit else None,
    'dense': dict(dense),
    'pruned': dict(pruned),
    'ratios': ratios,
    'macs': pruned.get('macs'),
    'params': pruned.get('params'),
    'speedup': None,
    'details': {},
    **sections,
    'config': config.to_dict(),
  }


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (a temporary file renamed over it):
  a kill leaves the old file or the new one, never half of one."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, **dump_kwargs)
  os.replace(path + '.tmp', path)


def write(workdir: str, results: Mapping[str, Any]) -> dict[str, Any]:
  """Writes ``workdir/results.json`` (process 0), atomically; returns it."""
  out = dict(results)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, FILE), out, indent=2, default=str)
  return out


def load(path: str) -> dict[str, Any]:
  """A run's results (a run folder or its results.json), checked against the schema."""
  f = os.path.join(path, FILE) if os.path.isdir(path) else path
  if not os.path.exists(f):
    raise FileNotFoundError(f'no {FILE} in {path}: not a finished run (rerun it with the same --workdir to finish it)')
  with open(f) as fh:
    r = json.load(fh)
  missing = [k for k in REQUIRED if k not in r]
  if missing:
    raise ValueError(f'{f} lacks {missing}: written by an older version? (schema {SCHEMA} needs {list(REQUIRED)})')
  if r['schema'] != SCHEMA:
    raise ValueError(f'{f} has results schema {r["schema"]}; this version reads {SCHEMA}')
  return r


def get(r: Mapping[str, Any], path: str) -> Any:
  """A value by dotted path: ``get(r, 'ratios.macs')``, ``get(r, 'config.method.r')``;
  None when absent."""
  for key in path.split('.'):
    if not isinstance(r, Mapping) or key not in r:
      return None
    r = r[key]
  return r
