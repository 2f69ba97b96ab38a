"""experiments.summarize on small fake run folders, and the README's result tables
regenerated from the committed per-run summaries."""

import json
import os
import pathlib
import re
import shlex

import numpy as np
import pytest
from ml_collections import config_dict

from experiments import results, summarize
from experiments.configs import common

REPO = pathlib.Path(__file__).resolve().parent.parent


def fake_run(root, name, *, method, seed, budget, acc, dense_acc, macs_kept, speedup=None, dynamic=None):
  """A finished run folder as the pipeline writes it (the numbers made up)."""
  config = common.base()
  config.seed = seed
  config.method = config_dict.ConfigDict({'name': method, 'budget': budget})
  dense = {'macs': 1000.0, 'params': 100.0}
  pruned = {'macs': 1000.0 * macs_kept, 'params': 100.0 * macs_kept}
  r = results.record(
    config,
    test_accuracy=acc,
    dense_accuracy=dense_acc,
    dense=dense,
    pruned=pruned,
    budget=budget,
    unit='macs',
    speedup=None if speedup is None else {'speedup': speedup},
    dynamic=dynamic,
  )
  results.write(str(root / name), r)
  return str(root / name)


@pytest.fixture
def runs(tmp_path):
  out = []
  for seed, (a, b) in enumerate([(0.50, 0.40), (0.54, 0.46)]):
    out.append(fake_run(tmp_path, f'mag_s{seed}', method='magnitude', seed=seed, budget=0.5, acc=a, dense_acc=0.6,
                        macs_kept=0.49 + 0.02 * seed, speedup=1.0 + seed))  # fmt: skip
    out.append(fake_run(tmp_path, f'toy_s{seed}', method='toy', seed=seed, budget=0.25, acc=b, dense_acc=0.6,
                        macs_kept=0.25))  # fmt: skip
  dyn = {'macs_mean': 700.0e6, 'macs_std': 20.0e6}
  out.append(fake_run(tmp_path, 'dyn', method='dyn', seed=0, budget=None, acc=0.3, dense_acc=0.6, macs_kept=0.7,
                      dynamic=dyn))  # fmt: skip
  return out


def test_table_means_and_spreads_by_hand(runs, tmp_path):
  md = summarize.main(
    [str(tmp_path), '--by', 'method,budget', '--columns', 'seeds,acc,macs_kept,speedup,macs_per_image']
  )
  rows = {line.split(' | ')[0].strip('| '): line for line in md.splitlines()[2:]}
  assert md.splitlines()[0] == (
    '| method | budget | seeds | test acc. (%) | MACs kept | measured speedup | MACs / image (± over images) |'
  )
  # magnitude: acc 50 and 54 -> 52.0 ± 2.0 (population std); MACs kept (0.49 + 0.51) / 2
  assert rows['magnitude'] == '| magnitude | 0.5 | 2 | 52.0 ± 2.0 | 0.500 | 1.50x | 0.00M |'
  assert rows['toy'] == '| toy | 0.25 | 2 | 43.0 ± 3.0 | 0.250 | – | 0.00M |'
  # one run: no spread; the dynamic run's MACs ± their std over images
  assert rows['dyn'] == '| dyn | – | 1 | 30.0 | 0.700 | – | 0.00M ± 20.00M |'


def test_groups_mix_methods_and_read_run_dirs_or_files(runs, tmp_path):
  one = summarize.main([runs[0], os.path.join(runs[2], 'results.json'), '--by', 'method', '--columns', 'seeds,acc'])
  assert one.splitlines()[2:] == ['| magnitude | 2 | 52.0 ± 2.0 |']
  every = summarize.main([str(tmp_path), '--by', 'seed', '--columns', 'seeds'])
  assert every.splitlines()[2:] == ['| 1 | 2 |', '| 0 | 3 |']  # numbers from large to small


def test_plot_and_out_files(runs, tmp_path):
  png, md = tmp_path / 'acc.png', tmp_path / 'table.md'
  text = summarize.main([str(tmp_path), '--plot', str(png), '--out', str(md)])
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and md.read_text() == text + '\n'


def test_bad_input_says_what_is_wrong(tmp_path, runs):
  with pytest.raises(FileNotFoundError, match='no results.json'):
    summarize.main([str(tmp_path / 'nothing_here')])
  old = tmp_path / 'old' / 'results.json'
  old.parent.mkdir()
  old.write_text(json.dumps({'test_accuracy': 0.5}))
  with pytest.raises(ValueError, match='schema'):
    summarize.main([str(old.parent)])
  with pytest.raises(ValueError, match='valid: seeds'):
    summarize.main([runs[0], '--columns', 'accuracy'])


# ------------------------------------------------- the README's tables


def readme_tables():
  """(command, table) pairs of the README: a summarize command in a bash block and the
  table right after it."""
  text = (REPO / 'README.md').read_text()
  pattern = r'```bash\n(python -m experiments\.summarize [^\n]+)\n```\n\n((?:\|[^\n]*\n)+)'
  return re.findall(pattern, text)


def test_readme_has_the_three_results_tables():
  commands = [c for c, _ in readme_tables()]
  assert any('results/magnitude/runs' in c for c in commands)
  assert any('results/chipnet/runs' in c for c in commands)
  assert any('results/ftwt/runs' in c for c in commands)


@pytest.mark.parametrize('command,table', readme_tables(), ids=lambda x: x.split()[3] if x.startswith('python') else '')
def test_readme_tables_are_the_summarizer_output_of_the_committed_runs(command, table, monkeypatch):
  monkeypatch.chdir(REPO)
  args = shlex.split(command)[3:]
  for flag in ('--plot', '--out'):  # the committed plots and tables stay as they are
    if flag in args:
      i = args.index(flag)
      del args[i : i + 2]
  assert summarize.main(args).strip() == table.strip()


def test_committed_per_run_summaries_follow_the_schema():
  for path in REPO.glob('results/*/*runs*/*/results.json'):  # runs/, official_runs/, runs_sum/, ...
    r = results.load(str(path))
    assert 0 <= r['test_accuracy'] <= 1, path
    assert np.isclose(r['macs'], r['pruned']['macs']), path


def test_group_keys_with_the_same_last_name_get_unique_headers(runs, tmp_path):
  md = summarize.main([str(tmp_path), '--by', 'config.method.budget,budget,method', '--columns', 'seeds'])
  assert md.splitlines()[0] == '| method.budget | budget | method | seeds |'


def test_rows_by_run_name_pool_the_seeds_of_one_launch(tmp_path):
  # Two launches of one method that differ only in their folder names (as the static
  # baselines matched to two dynamic runs do): 'run' keeps them apart, the seeds pooled.
  for seed in (0, 1):
    fake_run(tmp_path, f'l1_at_a_s{seed}', method='magnitude', seed=seed, budget=0.6 + 0.01 * seed, acc=0.5 + 0.1 * seed,
             dense_acc=0.6, macs_kept=0.6)  # fmt: skip
    fake_run(tmp_path, f'l1_at_b_s{seed}', method='magnitude', seed=seed, budget=0.4, acc=0.3, dense_acc=0.6,
             macs_kept=0.4)  # fmt: skip
  fake_run(tmp_path, 'odd_name', method='magnitude', seed=3, budget=0.4, acc=0.2, dense_acc=0.6, macs_kept=0.4)
  md = summarize.main([str(tmp_path), '--by', 'run', '--columns', 'seeds,acc'])
  rows = {line.split(' | ')[0].strip('| '): line.split(' | ')[1:] for line in md.splitlines()[2:]}
  assert md.splitlines()[0] == '| run | seeds | test acc. (%) |'
  assert rows['l1_at_a'] == ['2', '55.0 ± 5.0 |']  # by hand: mean of 50 and 60, half their gap
  assert rows['l1_at_b'] == ['2', '30.0 ± 0.0 |']
  assert rows['odd_name'] == ['1', '20.0 |']  # no _s<seed> ending: the name as it is
  assert summarize.run_name('x/ftwt_r0.9_s12/results.json', 12) == 'ftwt_r0.9'
  assert summarize.run_name('x/ftwt_s1x/results.json', 1) == 'ftwt_s1x'


def test_gate_pattern_columns(tmp_path):
  dyn = {'macs_mean': 600.0, 'macs_std': 5.0, 'patterns': 17, 'top_pattern_share': 0.55}
  fake_run(tmp_path, 'g_s0', method='ftwt', seed=0, budget=None, acc=0.5, dense_acc=0.6, macs_kept=0.6, dynamic=dyn)
  md = summarize.main([str(tmp_path), '--by', 'run', '--columns', 'seeds,patterns,top_pattern'])
  assert md.splitlines()[0] == '| run | seeds | distinct gate patterns | images with the commonest pattern (%) |'
  assert md.splitlines()[2] == '| g | 1 | 17 | 55.0 |'


def test_series_label_names_keys_and_drops_missing_ones():
  keys = ('method', 'config.method.lambda_sim', 'config.method.thre_cls')
  assert summarize.series_label(keys, ('manidp', 0.0, 1e9)) == 'manidp lambda_sim=0 thre_cls=1e+09'
  assert summarize.series_label(keys, ('ftwt', None, None)) == 'ftwt'
  assert summarize.series_label(('config.method.r',), (None,)) == '–'
