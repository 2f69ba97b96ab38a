"""Per-run results.json (the one schema, ``experiments.results``) from the older per-method summaries.

The ChipNet-vs-magnitude and FTWT runs behind the README were summarized, before
there was one results schema, into ``results/chipnet/legacy_summary.json`` and
``results/ftwt/legacy_summary.json`` (one record per run, as their summarize
scripts wrote them). This script turns every record into a run folder of the
current schema, numbers unchanged, so ``python -m experiments.summarize`` reads
them like any run:

  python results/convert_legacy.py      # writes results/{chipnet,ftwt}/runs/<run>/results.json

What those records did not keep stays None (e.g. volume and paper counts, the
full config); ``details.converted_from`` names the source. All runs: ResNet-20 on
the CIFAR-10 subset, the dense network of ``results/chipnet/run_experiment.sh``
(6 epochs, seed 0, 51.03% test accuracy), which the FTWT runs started from too.
"""

from __future__ import annotations

import json
import os
import shutil

from experiments import results

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = {'flops': 'macs', 'volume': 'volume'}  # ChipNet's budget types -> cost units


def _record(method: str, seed: int, config_method: dict, source: str, **numbers) -> dict:
  return {
    'schema': results.SCHEMA,
    'method': method,
    'seed': seed,
    'dataset': 'cifar10_subset',
    'model': 'resnet20',
    'pruned_accuracy_before_finetune': None,
    'budget': None,
    'unit': None,
    'achieved': None,
    'speedup': None,
    'dynamic': None,
    **numbers,
    'details': {**numbers.pop('details', {}), 'converted_from': source},
    'config': {
      'seed': seed,
      'model': {'name': 'resnet20'},
      'data': {'name': 'cifar10_subset'},
      'method': config_method,
    },
  }


def chipnet(run: dict, dense_accuracy: float) -> dict:
  """A row of results/chipnet/legacy_summary.json: a ChipNet run or its magnitude arm
  (same dense network, same budget, same finetune)."""
  unit = UNITS[run['budget_type']]
  pruned = {'macs': run['macs'], 'params': run['params']}
  dense = {'macs': run['macs'] / run['macs_ratio'], 'params': run['params'] / run['params_ratio']}
  details = {'budget_type': run['budget_type'], 'run': run['run']}
  if run['method'] == 'chipnet':
    details['soft_accuracy_last'] = run['soft_accuracy_last']
    cfg = {'name': 'chipnet', 'budget': run['budget'], 'budget_type': run['budget_type']}
  else:
    cfg = {'name': 'magnitude', 'budget': run['budget'], 'unit': unit, 'criterion': 'l1'}
  return _record(
    run['method'],
    run['seed'],
    cfg,
    'results/chipnet/legacy_summary.json',
    test_accuracy=run['accuracy'],
    dense_accuracy=dense_accuracy,
    pruned_accuracy_before_finetune=run['before_finetune'],
    budget=run['budget'],
    unit=unit,
    achieved=run['achieved'],
    dense=dense,
    pruned=pruned,
    ratios={'macs': run['macs_ratio'], 'params': run['params_ratio']},
    macs=run['macs'],
    params=run['params'],
    speedup={'speedup': run['speedup'], 'batch': 128},
    details=details,
  )


def ftwt(run: dict, dense_accuracy: float) -> dict:
  """A row of results/ftwt/legacy_summary.json (per-image statistics over the test set)."""
  ratio = 1 - run['reduction']
  dynamic = {
    'accuracy': run['accuracy'],
    'macs_mean': run['macs_mean'],
    'macs_std': run['macs_std'],
    'macs_p05': run['macs_p05'],
    'macs_p95': run['macs_p95'],
    'dense_macs': run['dense_macs'],
    'macs_ratio': ratio,
    'macs_ratio_with_predictors': 1 - run['reduction_with_predictors'],
    'reduction_legacy': run['reduction_legacy'],
    'gates_open_mean': run['gates_open'],
  }
  cfg = {'name': 'ftwt', 'r': run['r'], 'mode': run['mode'], 'pool': run['pool'], 'epochs': run['epochs']}
  return _record(
    'ftwt',
    run['seed'],
    cfg,
    'results/ftwt/legacy_summary.json',
    test_accuracy=run['accuracy'],
    dense_accuracy=dense_accuracy,
    dense={'macs': run['dense_macs']},
    pruned={'macs': run['macs_mean']},
    ratios={'macs': ratio},
    macs=run['macs_mean'],
    params=None,
    dynamic=dynamic,
    details={'r': run['r'], 'mode': run['mode'], 'pool': run['pool'], 'run': run['run']},
  )


def main() -> None:
  with open(os.path.join(HERE, 'chipnet', 'legacy_summary.json')) as f:
    chip = json.load(f)['runs']
  with open(os.path.join(HERE, 'ftwt', 'legacy_summary.json')) as f:
    dyn = json.load(f)['runs']
  dense_accuracy = chip[0]['dense_accuracy']  # one dense network for all of them
  assert all(r['dense_accuracy'] == dense_accuracy for r in chip)
  out = {'chipnet': [(f'{r["run"]}_{r["method"]}', chipnet(r, dense_accuracy)) for r in chip]}
  out['ftwt'] = [(r['run'], ftwt(r, dense_accuracy)) for r in dyn]
  for exp, runs in out.items():
    root = os.path.join(HERE, exp, 'runs')
    shutil.rmtree(root, ignore_errors=True)
    for name, r in runs:
      results.write(os.path.join(root, name), r)
    print(f'{len(runs)} runs -> {os.path.relpath(root)}')


if __name__ == '__main__':
  main()
