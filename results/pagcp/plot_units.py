"""Per-unit accepted ratios of a PAGCP run, coloured by each unit's most sensitive task.

python results/pagcp/plot_units.py RUN_DIR --out results/pagcp/units.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from experiments import results  # noqa: E402

COLOURS = {'left': 'tab:blue', 'right': 'tab:orange', 'sum': 'tab:green', None: 'tab:gray'}


def plot(run: str, out: str) -> None:
  r = results.load(run)
  rounds = r['details']['rounds']
  fig, axes = plt.subplots(1, len(rounds), figsize=(5 * len(rounds), 4), squeeze=False)
  for k, (ax, rnd) in enumerate(zip(axes[0], rounds)):
    units = rnd['units']
    names = [u['unit'].replace('encoder.', '') for u in units]
    colours = [COLOURS.get(u['sensitive'], 'tab:red') for u in units]
    ax.bar(range(len(units)), [u['ratio'] for u in units], color=colours, alpha=0.35, label='greedy ratio')
    ax.bar(range(len(units)), [u['kept_ratio'] for u in units], color=colours, label='kept (top-k)')
    ax.set_xticks(range(len(units)), names, rotation=70, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f'round {k}: cost left {rnd["cost"]:.2f}')
    ax.set_ylabel('pruned ratio (scan order)')
  handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
  axes[0][0].legend(handles, [f'most sensitive: {t or "none broke"}' for t in COLOURS], fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == '__main__':
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('run')
  p.add_argument('--out', required=True)
  a = p.parse_args()
  plot(a.run, a.out)
