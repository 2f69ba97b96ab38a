"""EPI's experiment in one figure: final test accuracy against the prune epoch (the
oracle sweep, mean and spread over seeds), the EPI curve of both criteria from the
recorded dense run on a second axis, and the epoch each criterion's trigger picks
(at the paper's tau and at tau calibrated on the sweep). Also prints the picks.

  python results/epi/plot.py results/epi/runs --out results/epi/accuracy_vs_prune_epoch.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import summarize  # noqa: E402
from jaxprune.methods import epi  # noqa: E402

COLOURS = {'magnitude': 'tab:orange', 'taylor': 'tab:green'}


def _sweep(runs: list[dict], criterion: str = 'magnitude') -> list[dict]:
  """EPI runs that pruned with `criterion`'s sub-network (magnitude: the oracle sweep)."""
  return [r for r in runs if r['method'] == 'epi' and r['details'].get('pruned_by') == criterion]


def picks(runs: list[dict], tolerance: float) -> dict:
  """Per seed with a recorded dense run: each criterion's EPI curve, the epoch its trigger
  picks at the paper's tau, and tau calibrated on that seed's sweep (None where the sweep
  or the curve cannot give one)."""
  out = {}
  for dense in [r for r in runs if r['method'] == 'epi' and r['config']['method']['prune_epoch'] == -2]:
    seed = dense['seed']
    sweep = sorted((r['details']['prune_epoch'], r['test_accuracy']) for r in _sweep(runs) if r['seed'] == seed)
    for crit, curve in dense['details']['curves'].items():
      e = np.asarray(curve['epi'], float)
      e[e < 0] = np.nan  # the recorded placeholder of epochs without r predecessors
      cfg = epi.Config(criterion=crit, r=dense['config']['method']['r'], window=dense['config']['method']['window'])
      fired = np.nonzero(np.asarray(epi.epi_triggers(e, cfg.threshold, cfg.window)))[0]
      row = {'epochs': curve['epoch'], 'epi': e.tolist(), 'tau': cfg.threshold,
             'paper_pick': int(curve['epoch'][fired[0]]) if fired.size else None, 'calibrated': None}  # fmt: skip
      if len(sweep) >= 2:
        valid = ~np.isnan(e)
        try:
          cal = epi.calibrate_tau(e[valid], [s for s, _ in sweep], [a for _, a in sweep], tolerance=tolerance,
                                  config=cfg, first_epoch=int(np.asarray(curve['epoch'])[valid][0]))  # fmt: skip
          row['calibrated'] = cal._asdict()
        except ValueError as err:  # e.g. no plateau after the sweep's best epoch
          row['calibrated'] = {'error': str(err)}
      out[(seed, crit)] = row
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='+')
  p.add_argument('--out', required=True)
  p.add_argument('--tolerance', type=float, default=0.005, help='calibration: within this of the best (fraction)')
  a = p.parse_args(argv)
  runs = summarize.load_runs(a.runs)
  fig, ax = plt.subplots(figsize=(9, 6))
  seeds = sorted({r['seed'] for r in runs})
  for seed, (c, m) in zip(seeds, (('k', 'o'), ('dimgray', 's'), ('silver', '^'))):
    pts = sorted((r['details']['prune_epoch'], 100 * r['test_accuracy']) for r in _sweep(runs) if r['seed'] == seed)
    if pts:
      ax.plot(*zip(*pts), marker=m, c=c, label=f'seed {seed}: prune at epoch e (magnitude), train on to 30')
    for r in runs:
      if r['seed'] != seed:
        continue
      if r['method'] == 'epi' and r['details'].get('prune_epoch') is None:
        ax.axhline(100 * r['test_accuracy'], ls='--', c=c, lw=1, label=f'seed {seed}: dense, 30 epochs')
      elif r['method'] == 'magnitude':
        ax.axhline(100 * r['test_accuracy'], ls=':', c=c, lw=1.5,
                   label=f'seed {seed}: train 20 -> prune -> finetune 10')  # fmt: skip
  ax.set(xlabel='prune epoch', ylabel='final test accuracy (%)')
  twin = ax.twinx()
  found = picks(runs, a.tolerance)
  for (seed, crit), row in sorted(found.items()):
    twin.plot(row['epochs'], row['epi'], c=COLOURS[crit], alpha=0.8 if seed == seeds[0] else 0.4,
              label=f'EPI curve, {crit} (seed {seed})')  # fmt: skip
    hit = [r for r in _sweep(runs, crit) if r['seed'] == seed and r['details'].get('prune_epoch') == row['paper_pick']]
    if hit:  # the run EPI's trigger would have made: pruned at its pick with its criterion
      ax.plot([row['paper_pick']], [100 * hit[0]['test_accuracy']], '*', ms=14, c=COLOURS[crit],
              alpha=1 if seed == seeds[0] else 0.5, label=f'run at the EPI pick, {crit} (seed {seed})')  # fmt: skip
    for key, ls in (('paper_pick', '-'), ('calibrated', '--')):
      pick = row[key] if key == 'paper_pick' else (row[key] or {}).get('fire_epoch')
      if pick is not None:
        twin.axvline(pick, c=COLOURS[crit], ls=ls, lw=1, alpha=0.8 if seed == seeds[0] else 0.4)
    print(f'seed {seed} {crit}: paper tau {row["tau"]} fires at {row["paper_pick"]}; calibrated {row["calibrated"]}')
  twin.set_ylabel('EPI (similarity to the last r sub-networks)')
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = twin.get_legend_handles_labels()
  fig.legend(h1 + h2, l1 + l2, fontsize=7, loc='lower center', ncol=2)
  ax.set_title('EPI: accuracy vs prune epoch; vertical lines: EPI picks (solid: paper tau, dashed: calibrated)',
               fontsize=9)  # fmt: skip
  fig.tight_layout(rect=(0, 0.18, 1, 1))
  fig.savefig(a.out, dpi=110)
  with open(a.out.rsplit('.', 1)[0] + '_picks.json', 'w') as f:
    json.dump({f'seed{s}_{c}': v for (s, c), v in found.items()}, f, indent=1)


if __name__ == '__main__':
  main()
