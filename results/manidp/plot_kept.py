"""Per test image: the share of gated channels kept against the image's loss, and the
per-image MAC histogram, for ManiDP runs (their ``per_sample.npz``).

  python results/manidp/plot_kept.py results/manidp/runs/manidp_r0.5_e10_s0 \
      results/manidp/runs/manidp_r0.65_e10_s0 --out results/manidp/kept_vs_loss.png
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='+')
  p.add_argument('--out', required=True)
  a = p.parse_args(argv)
  fig, (ax_kept, ax_macs) = plt.subplots(1, 2, figsize=(11, 4))
  for run in a.runs:
    per = np.load(os.path.join(run, 'per_sample.npz'))
    with open(os.path.join(run, 'results.json')) as f:
      r = json.load(f)
    label = f'target {r["config"]["method"]["target_rate"]}: {100 * r["test_accuracy"]:.1f}%'
    loss, kept = per['loss'], 100 * per['kept']
    ax_kept.scatter(loss, kept, s=4, alpha=0.4, label=label)
    # mean kept share per loss quintile: flat if the gates ignore how hard an image is
    edges = np.quantile(loss, np.linspace(0, 1, 6))
    idx = np.clip(np.searchsorted(edges, loss, side='right') - 1, 0, 4)
    mids = [np.median(loss[idx == i]) for i in range(5)]
    ax_kept.plot(mids, [kept[idx == i].mean() for i in range(5)], 'k-', lw=1)
    ax_macs.hist(per['macs'] / 1e6, bins=40, alpha=0.6, label=label)
  ax_kept.set(
    xscale='symlog',
    xlabel='test image loss (CE)',
    ylabel='gated channels kept (%)',
    title='kept share vs loss (line: mean per loss quintile)',
  )
  ax_macs.set(xlabel='MACs per image (M)', ylabel='test images', title='per-image MACs')
  ax_kept.legend(markerscale=3)
  ax_macs.legend()
  fig.tight_layout()
  fig.savefig(a.out, dpi=110)


if __name__ == '__main__':
  main()
