"""The EPI, ManiDP and PAGCP recipes end to end on the shipped data (tiny settings):
each run's results hold what its method promises, checked against independent counts."""

import importlib.util
import os

import numpy as np
import pytest

from experiments import results
from experiments import train as train_lib
from jaxprune import training as T

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'configs')


def config(name, arg='quick', **train):
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(CONFIGS, name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.progress = False
  c.train.update(train)
  return c


@pytest.mark.slow
def test_pagcp_keeps_heads_whole_and_reports_every_task(tmp_path):
  c = config('pagcp_multimnist_resnet.py')
  r = train_lib.train_and_evaluate(c, str(tmp_path / 'pagcp'))
  assert set(r['task_accuracy']) == {'left', 'right'} and set(r['dense_task_accuracy']) == {'left', 'right'}
  # test accuracy is the mean over the tasks
  assert np.isclose(r['test_accuracy'], np.mean(list(r['task_accuracy'].values())))
  sizes, kept = r['group_sizes'], r['kept_per_group']
  assert all(kept[g] == sizes[g] for g in sizes if not g.startswith('encoder.'))  # heads whole
  assert all(1 <= kept[g] <= sizes[g] for g in sizes)
  (rnd,) = r['details']['rounds']
  for u in rnd['units']:
    assert u['unit'].startswith('encoder.') and u['sensitive'] in (None, 'left', 'right')
    assert u['kept_ratio'] in (0.0, u['ratio'])  # the top-k filter keeps a unit's ratio or drops it
  assert r['pruned']['macs'] < r['dense']['macs']

  # the task-blind baseline at PAGCP's MACs: within one channel's worth of it
  c = config('pagcp_multimnist_resnet.py')
  c.method.guide, c.method.target, c.method.pretrained = 'l1', 0.5, str(tmp_path / 'pagcp')
  b = train_lib.train_and_evaluate(c, str(tmp_path / 'l1'))
  assert 0.4 < b['ratios']['macs'] <= 0.5 + 1e-6
  assert all(b['kept_per_group'][g] == s for g, s in b['group_sizes'].items() if not g.startswith('encoder.'))


def test_pagcp_refuses_a_single_task_model_and_an_unknown_guide(tmp_path):
  c = config('pagcp_multimnist_resnet.py')
  c.method.guide = 'middle'
  with pytest.raises(ValueError, match="method.guide must be 'all', 'l1' or a task"):
    train_lib.train_and_evaluate(c, str(tmp_path / 'a'))
  c = config('pagcp_multimnist_resnet.py')
  del c.model.kwargs['num_classes']
  with pytest.raises(ValueError, match='PAGCP needs a multitask model'):
    train_lib.train_and_evaluate(c, str(tmp_path / 'b'))


@pytest.mark.slow
def test_epi_prunes_when_it_fires_and_continues_the_schedule(tmp_path):
  # Nothing removed (prune_ratio 0): every dominant sub-network is the whole network, so
  # EPI is 1 from the 2nd record (r = 1) and the trigger (window 1) fires at the 3rd.
  c = config('epi_cifar10_subset_resnet20.py', max_steps_per_epoch=3, epochs=4)
  c.method.update(prune_epoch=-1, prune_ratio=0.0, r=1, window=1, tau_magnitude=0.99)
  r = train_lib.train_and_evaluate(c, str(tmp_path / 'epi'))
  d = r['details']
  # pruned after 3 epochs, and the tracker names that epoch too (records start after epoch 1)
  assert d['prune_epoch'] == 3 and d['fired']['magnitude'] == 3 and d['pruned_by'] == 'magnitude'
  assert d['curves']['magnitude']['epoch'] == [1, 2, 3] and d['curves']['magnitude']['epi'] == [-1, 1, 1]
  steps = [rec['step'] for rec in T.read_jsonl(str(tmp_path / 'epi' / 'metrics.jsonl'))
           if rec.get('phase') == 'pruned' and rec.get('split') == 'test']  # fmt: skip
  assert steps == [3 * 4]  # one schedule: the pruned phase is its last epoch
  assert r['speedup']['speedup'] > 0  # the slimmed network is timed like a static method's


@pytest.mark.slow
def test_manidp_counts_per_image_cost_below_the_dense_network(tmp_path):
  c = config('manidp_cifar10_subset_resnet20.py', max_steps_per_epoch=3)
  r = train_lib.train_and_evaluate(c, str(tmp_path / 'manidp'))
  dyn = r['dynamic']
  assert dyn['count'] == 1017 and 0 <= dyn['accuracy'] <= 1
  assert dyn['macs_min'] <= dyn['macs_mean'] <= dyn['macs_max'] <= r['dense']['macs'] + 1e-3
  per = np.load(tmp_path / 'manidp' / 'per_sample.npz')
  assert np.isclose(per['macs'].mean(), r['macs']) and per['macs'].shape == (1017,)
  assert results.load(str(tmp_path / 'manidp'))['method'] == 'manidp'

  # From the same dense network, killed after the first epoch's threshold refresh and
  # resumed: the same thresholds and result as the uninterrupted run above.
  def again(workdir, **train):
    c = config('manidp_cifar10_subset_resnet20.py', max_steps_per_epoch=3, **train)
    c.method.pretrained = str(tmp_path / 'manidp')
    return train_lib.train_and_evaluate(c, str(workdir))

  whole = r
  assert again(tmp_path / 'cut', stop_after_steps=4).get('stopped_early')
  resumed = again(tmp_path / 'cut')
  assert resumed['test_accuracy'] == whole['test_accuracy']
  assert resumed['dynamic']['macs_mean'] == whole['dynamic']['macs_mean']
  assert resumed['dynamic']['kept_mean'] == whole['dynamic']['kept_mean']


@pytest.mark.slow
def test_epi_killed_after_the_prune_resumes_to_the_same_result(tmp_path):
  def run(workdir, **train):
    c = config('epi_cifar10_subset_resnet20.py', max_steps_per_epoch=3, epochs=3, **train)
    c.method.prune_epoch = 1
    return train_lib.train_and_evaluate(c, str(workdir))

  whole = run(tmp_path / 'whole')
  d = whole['details']
  assert d['prune_epoch'] == 1 and d['curves']['magnitude']['epoch'] == [1]  # the record after epoch 1
  assert 0.4 < whole['ratios']['macs'] <= 0.5 + 1e-6  # prune_ratio 0.5 of the MACs
  # dense: steps 0-3, then 'pruned' runs 3-9; four steps into it the run stops (as a kill would)
  cut = run(tmp_path / 'cut', stop_after_steps=4)
  assert cut.get('stopped_early')
  resumed = run(tmp_path / 'cut')
  assert resumed['test_accuracy'] == whole['test_accuracy']
  assert resumed['details']['kept_per_group'] == whole['details']['kept_per_group']
  last = lambda w: [r for r in T.read_jsonl(str(w / 'metrics.jsonl')) if r.get('split') == 'test'][-1]['loss']
  assert last(tmp_path / 'cut') == last(tmp_path / 'whole')
