"""Markdown table (mean ± spread over seeds) and plot of any mix of finished runs.

  python -m experiments.summarize RUN_DIRS... [--by KEYS] [--columns COLS] [--plot PATH]

A RUN_DIR is a run's workdir (its ``results.json``, see ``experiments.results``),
a results.json file, or a folder of such run folders. Runs are grouped by
``--by`` (dotted keys of results.json, e.g. ``method,unit,budget`` or
``method,config.method.mode,config.method.r``, or ``run``: the run folder's name
without its ``_s<seed>`` ending, which tells apart runs that differ only in how they
were launched, e.g. the static baselines matched to two dynamic runs); each row shows how many runs
(seeds) it holds and, per column, their mean ± standard deviation (population:
for two seeds, half their difference). ``--columns`` picks columns of
:data:`COLUMNS`; columns no run has are left out. Examples:

  python -m experiments.summarize results/magnitude/runs --by method,unit,budget --plot acc.png
  python -m experiments.summarize runs/ftwt_sweep runs/ftwt_static \\
      --by method,config.method.mode,config.method.r,budget --columns seeds,acc,macs_per_image,reduction
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments import results


class Column(NamedTuple):
  header: str
  key: str  # dotted path into results.json
  fmt: Callable[[float], str]
  spread: bool = False  # show ± std over runs
  scale: Callable[[float], float] = float  # the shown value of a stored one
  aside: str | None = None  # a second key whose mean follows after '±' (e.g. the std over images)


def _pct(x: float) -> str:
  return f'{x:.1f}'


COLUMNS: dict[str, Column] = {
  'acc': Column('test acc. (%)', 'test_accuracy', _pct, spread=True, scale=lambda v: 100 * v),
  'dense_acc': Column('dense acc. (%)', 'dense_accuracy', _pct, spread=True, scale=lambda v: 100 * v),
  'before_ft': Column(
    'before finetune (%)', 'pruned_accuracy_before_finetune', _pct, spread=True, scale=lambda v: 100 * v
  ),
  'achieved': Column('achieved', 'achieved', lambda x: f'{x:.3f}'),
  'macs_kept': Column('MACs kept', 'ratios.macs', lambda x: f'{x:.3f}'),
  'params_kept': Column('params kept', 'ratios.params', lambda x: f'{x:.3f}'),
  'volume_kept': Column('volume kept', 'ratios.volume', lambda x: f'{x:.3f}'),
  # ChipNet's two volume counts of the final hard masks: the core's exact one, the official one
  'volume_exact': Column('volume kept (exact)', 'details.volume', lambda x: f'{x:.3f}'),
  'volume_paper': Column('volume kept (official count)', 'details.volume_paper', lambda x: f'{x:.3f}'),
  'flops_paper_kept': Column('FLOPs kept (paper)', 'ratios.flops_paper', lambda x: f'{x:.3f}'),
  'macs': Column('MACs (M)', 'macs', lambda x: f'{x:.1f}', scale=lambda v: v / 1e6),
  'params': Column('params (K)', 'params', lambda x: f'{x:.0f}', scale=lambda v: v / 1e3),
  'speedup': Column('measured speedup', 'speedup.speedup', lambda x: f'{x:.2f}x'),
  'macs_per_image': Column(
    'MACs / image (± over images)',
    'macs',  # for a dynamic method the mean over the test images
    lambda x: f'{x:.2f}M',
    scale=lambda v: v / 1e6,
    aside='dynamic.macs_std',
  ),
  'reduction': Column('MAC reduction (%)', 'ratios.macs', lambda x: f'{x:.1f}', scale=lambda v: 100 * (1 - v)),
  'reduction_legacy': Column(
    "MAC reduction, method's own count (%)", 'dynamic.reduction_legacy', _pct, scale=lambda v: 100 * v
  ),
  **{
    f'acc_{t}': Column(f'{t} acc. (%)', f'task_accuracy.{t}', _pct, spread=True, scale=lambda v: 100 * v)
    for t in ('left', 'right', 'sum')  # the MultiMNIST tasks
  },
  'patterns': Column('distinct gate patterns', 'dynamic.patterns', lambda x: f'{x:.0f}'),
  'top_pattern': Column(
    'images with the commonest pattern (%)', 'dynamic.top_pattern_share', _pct, scale=lambda v: 100 * v
  ),
  'reduction_official': Column(
    "MAC reduction, official count (%)", 'dynamic.reduction_official', _pct, scale=lambda v: 100 * v
  ),
  # ManiDP's point: hard samples (top loss quartile) keep more gated channels than easy ones
  'kept_easy': Column('gates kept, easiest 25% (%)', 'dynamic.kept_easy', _pct, scale=lambda v: 100 * v),
  'kept_hard': Column('gates kept, hardest 25% (%)', 'dynamic.kept_hard', _pct, scale=lambda v: 100 * v),
  'kept_loss_corr': Column('corr(kept, loss)', 'dynamic.kept_loss_corr', lambda x: f'{x:+.2f}'),
  # EPI: when the network was pruned, and the training compute that bought
  'prune_epoch': Column('pruned at epoch', 'details.prune_epoch', lambda x: f'{x:.0f}'),
  'train_macs': Column('training MACs (T)', 'details.compute.pat', lambda x: f'{x:.1f}', scale=lambda v: v / 1e12),
  'saving': Column(
    'less compute than train -> prune -> finetune',
    'details.compute.saving_vs_train_prune_finetune',
    lambda x: f'{x:.2f}x',
  ),
  'wall': Column('wall time (min)', 'wall_time_s', lambda x: f'{x:.1f}', scale=lambda v: v / 60),
}
AXIS_LABELS = {
  'ratios.macs': 'MACs kept (fraction of dense; dynamic: mean over images)',
  'ratios.params': 'params kept (fraction of dense)',
  'ratios.volume': 'volume kept (fraction of dense)',
}
DEFAULT_COLUMNS = ('seeds', 'acc', 'dense_acc', 'before_ft', 'achieved', 'macs_kept', 'params_kept', 'speedup')


def find_runs(paths: Sequence[str]) -> list[str]:
  """results.json files under ``paths`` (a run folder, a results.json, or a folder of runs)."""
  found = []
  for p in paths:
    if os.path.isfile(p):
      found.append(p)
    elif os.path.isfile(os.path.join(p, results.FILE)):
      found.append(os.path.join(p, results.FILE))
    else:
      inner = sorted(glob.glob(os.path.join(p, '*', results.FILE)))
      if not inner:
        raise FileNotFoundError(f'{p}: no {results.FILE} in it or in its sub-folders (a finished run?)')
      found += inner
  return found


def run_name(path: str, seed: Any) -> str:
  """The run folder's name without the ``_s<seed>`` that tells a run's seeds apart:
  ``runs/ftwt_r0.9_s1/results.json`` -> ``ftwt_r0.9``. A name whose seed is not at its
  end (``flops_0.5_s0_chipnet``) stays as it is, one row per seed; a results.json
  given directly is named by the folder that holds it."""
  name = os.path.basename(os.path.dirname(os.path.abspath(path)))
  suffix = f'_s{seed}'
  return name[: -len(suffix)] if seed is not None and name.endswith(suffix) else name


def load_runs(paths: Sequence[str]) -> list[dict]:
  """The runs under ``paths`` (see :func:`find_runs`), each with the key ``run`` added
  (:func:`run_name`) so that tables can group by it."""
  out = []
  for f in find_runs(paths):
    r = results.load(f)
    out.append({'run': run_name(f, r.get('seed')), **r})  # a stored 'run' key wins
  return out


def _value(r: dict, col: Column, key: str | None = None) -> float | None:
  v = results.get(r, key or col.key)
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return None
  return col.scale(float(v))  # an aside (e.g. a std) is in the column's unit too


def _cell(runs: list[dict], col: Column) -> str:
  vals = [v for v in (_value(r, col) for r in runs) if v is not None]
  if not vals:
    return '–'
  text = col.fmt(float(np.mean(vals)))
  if col.aside:
    aside = [v for v in (_value(r, col, col.aside) for r in runs) if v is not None]
    text += f' ± {col.fmt(float(np.mean(aside)))}' if aside else ''
  elif col.spread and len(vals) > 1:
    text += f' ± {col.fmt(float(np.std(vals)))}'
  return text


def _label(v: Any) -> str:
  if v is None:
    return '–'
  return f'{v:g}' if isinstance(v, float) else str(v)


def series_label(keys: Sequence[str], values: Sequence[Any]) -> str:
  """A legend entry: the method as it is, other keys as ``name=value`` (the dotted key's
  last part), keys a run does not have left out.

  >>> series_label(('method', 'config.method.lambda_sim'), ('manidp', 0.0))
  'manidp lambda_sim=0'
  >>> series_label(('method', 'config.method.lambda_sim'), ('magnitude', None))
  'magnitude'
  """
  parts = [
    _label(v) if k == 'method' else f'{k.split(".")[-1]}={_label(v)}' for k, v in zip(keys, values) if v is not None
  ]
  return ' '.join(parts) or '–'


def group(runs: list[dict], by: Sequence[str]) -> list[tuple[tuple, list[dict]]]:
  """Runs grouped by the values of the ``by`` keys; rows ordered by those values, numbers
  from large to small (budgets: the least pruned first), then text."""
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault(tuple(results.get(r, k) for k in by), []).append(r)

  def order(item):
    return tuple((0, -v, '') if isinstance(v, (int, float)) else (1, 0, str(v)) for v in item[0])

  return sorted(groups.items(), key=order)


def _headers(by: Sequence[str]) -> list[str]:
  """Each key's last component, or as many last components as make it unique
  (``config.method.epochs``, ``config.method.finetune.epochs``: epochs, finetune.epochs)."""
  parts = [k.split('.') for k in by]
  out = []
  for p in parts:
    n = 1
    while n < len(p) and sum(q[-n:] == p[-n:] for q in parts) > 1:
      n += 1
    out.append('.'.join(p[-n:]))
  return out


def table(runs: list[dict], by: Sequence[str], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
  """The markdown table: one row per group of ``by`` values."""
  unknown = [c for c in columns if c != 'seeds' and c not in COLUMNS]
  if unknown:
    raise ValueError(f'unknown column(s) {unknown}; valid: seeds, {", ".join(COLUMNS)}')
  cols = [c for c in columns if c == 'seeds' or any(_value(r, COLUMNS[c]) is not None for r in runs)]
  head = _headers(by) + [('seeds' if c == 'seeds' else COLUMNS[c].header) for c in cols]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for values, rs in group(runs, by):
    cells = [_label(v) for v in values] + [str(len(rs)) if c == 'seeds' else _cell(rs, COLUMNS[c]) for c in cols]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(runs: list[dict], by: Sequence[str], path: str, *, x: Sequence[str] = ('ratios.macs',),
         series: Sequence[str] = ('method',)) -> None:  # fmt: skip
  """Test accuracy (mean ± std over a group's runs) against each of the ``x`` keys (one
  panel each), one line per value of the ``series`` keys; the dense accuracy dashed."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(x), figsize=(5.5 * len(x), 4), squeeze=False, sharey=True)
  for ax, xkey in zip(axes[0], x):
    lines: dict[tuple, list] = {}
    for _, rs in group(runs, by):
      xs, acc = [results.get(r, xkey) for r in rs], [100 * r['test_accuracy'] for r in rs]
      if None not in xs:
        key = tuple(results.get(rs[0], k) for k in series)
        lines.setdefault(key, []).append((float(np.mean(xs)), float(np.mean(acc)), float(np.std(acc))))
    for key, pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
      xs, ys, err = zip(*sorted(pts))
      ax.errorbar(xs, ys, yerr=err, marker='o', capsize=3, label=series_label(series, key))
    dense = [100 * r['dense_accuracy'] for r in runs if r.get('dense_accuracy') is not None]
    if dense:
      ax.axhline(float(np.mean(dense)), ls='--', c='gray', label='dense')
    xs_all = [px for pts in lines.values() for px, _, _ in pts]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 4:  # budgets that halve: log axis
      ax.set_xscale('log', base=2)
    ax.set_xlabel(AXIS_LABELS.get(xkey, xkey))
  axes[0][0].set_ylabel('test accuracy (%)')
  fig.tight_layout()
  # One legend, outside the last panel (after the layout, which would shrink the axes to
  # fit it): with many series it would hide points inside; the saved figure grows instead.
  axes[0][-1].legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.02, 1), borderaxespad=0)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('runs', nargs='+', metavar='RUN_DIR')
  p.add_argument(
    '--by',
    default='method,unit,budget',
    help='comma-separated dotted keys that define a row (run: the folder name less _s<seed>)',
  )
  p.add_argument('--columns', default=','.join(DEFAULT_COLUMNS), help=f'from: seeds, {", ".join(COLUMNS)}')
  p.add_argument('--plot', help='also write accuracy vs --x to this image')
  p.add_argument('--x', default='ratios.macs', help='the plot x axis (dotted keys; several: one panel each)')
  p.add_argument('--series', default='method', help='keys that tell the plot lines apart')
  p.add_argument('--out', help='also write the table to this file')
  a = p.parse_args(argv)
  runs = load_runs(a.runs)
  by, cols = a.by.split(','), a.columns.split(',')
  md = table(runs, by, cols)
  if a.out:
    with open(a.out, 'w') as f:
      f.write(md + '\n')
  if a.plot:
    plot(runs, by, a.plot, x=a.x.split(','), series=a.series.split(','))
  print(md)
  return md


if __name__ == '__main__':
  main(sys.argv[1:])
