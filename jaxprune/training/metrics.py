"""Metric bookkeeping on the host: running means, a JSONL log, a progress bar.

Per-step metrics come back from the device as scalars; the loop collects them
without blocking and folds them into :class:`Means` (sums in Python floats,
added one step at a time in step order, so a resumed run that restores the
sums gets bit-identical averages).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm


class Means:
  """Running sums of named scalars; ``.means()`` gives their averages.

  >>> m = Means(); m.add({'loss': 1.0}); m.add({'loss': 3.0}); m.means()
  {'loss': 2.0}
  """

  def __init__(self, sums: Mapping[str, float] | None = None, count: int = 0):
    self.sums: dict[str, float] = dict(sums or {})
    self.count = int(count)

  def add(self, values: Mapping[str, Any]) -> None:
    for k, v in values.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1

  def means(self) -> dict[str, float]:
    return {k: v / self.count for k, v in self.sums.items()} if self.count else {}

  def to_json(self) -> dict[str, Any]:
    return {'sums': self.sums, 'count': self.count}

  @classmethod
  def from_json(cls, d: Mapping[str, Any] | None) -> 'Means':
    d = d or {}
    return cls(d.get('sums'), d.get('count', 0))


def _clean(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray, jax.Array)):
    v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf
  return v


class MetricsWriter:
  """Appends one JSON object per line to ``path`` (only on process 0).

  >>> w = MetricsWriter('/tmp/m.jsonl'); w.write({'step': 1, 'loss': 0.5})  # doctest: +SKIP
  """

  def __init__(self, path: str | None, *, enabled: bool | None = None):
    self.path = path
    self.enabled = (jax.process_index() == 0 if enabled is None else enabled) and bool(path)
    if self.enabled:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + '\n')
      f.flush()

  def truncate_after(self, step: int, phase: str | None = None) -> None:
    """Drops the records of ``phase`` logged after ``step`` (a resumed run
    logs them again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = [
      r for r in read_jsonl(self.path) if not (r.get('step', 0) > step and (phase is None or r.get('phase') == phase))
    ]
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for r in keep:
        f.write(json.dumps(r) + '\n')
    os.replace(tmp, self.path)  # atomic: a kill here leaves the old or the new file


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (a torn last line is skipped)."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


def progress_bar(total: int, desc: str, *, enabled: bool = True, initial: int = 0) -> tqdm.tqdm:
  """A tqdm bar on stderr, disabled when not a TTY or not process 0."""
  on = enabled and sys.stderr.isatty() and jax.process_index() == 0
  return tqdm.tqdm(total=total, desc=desc, initial=initial, disable=not on, leave=True, dynamic_ncols=True)


def fmt(values: Mapping[str, float], keys: Iterable[str] = ('loss', 'accuracy')) -> dict[str, str]:
  return {k: f'{values[k]:.4g}' for k in keys if k in values}
