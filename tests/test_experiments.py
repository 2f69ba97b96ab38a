"""Tests of the experiments CLI, configs and validation."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, 'experiments', 'configs', '*.py'))
                 if 'def get_config' in open(p).read())
R20 = os.path.join(REPO, 'experiments', 'configs', 'dense_cifar10_subset_resnet20.py')


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def parse_flags(*args):
  argv = ['prog', *args]
  fv = flags.FlagValues()
  # sys_argv: the override flags are declared from the argv being parsed.
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_overrides_and_misspelled_key():
  c = parse_flags(f'--config={R20}:quick', '--config.train.epochs=3',
                  '--config.train.max_steps_per_epoch=5', '--config.data.data_dir=/x')
  assert c.train.epochs == 3 and c.train.max_steps_per_epoch == 5 and c.data.data_dir == '/x'
  with pytest.raises(Exception, match='epochz'):
    parse_flags(f'--config={R20}', '--config.train.epochz=3')
  with pytest.raises(Exception, match='quik'):
    parse_flags(f'--config={R20}:quik')


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_config_validates(path):
  c = load_config(path)
  train_lib.validate(c)
  assert callable(train_lib._pipeline(c.method.name))
  assert 'python -m experiments.main' in open(path).read()  # launch command documented


@pytest.mark.parametrize('section,key,bad,valid', [
    ('model', 'name', 'resnet21', 'resnet20'),
    ('data', 'name', 'cifar11', 'cifar10_subset'),
    ('method', 'name', 'magic', 'dense'),
    ('train', 'optimizer', 'lamb', 'adamw'),
    ('train', 'schedule', 'linear', 'cosine'),
])
def test_unknown_names_list_valid_choices(tmp_path, section, key, bad, valid):
  c = load_config(R20, 'quick')
  c[section][key] = bad
  with pytest.raises(ValueError, match=valid) as e:
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert bad in str(e.value)
  assert not os.listdir(tmp_path)  # failed before any work


def test_unknown_key_in_config_file_fails():
  c = load_config(R20)
  with c.unlocked():
    c.train.epochz = 3
  with pytest.raises(ValueError, match='epochz'):
    train_lib.validate(c)


def _cli(workdir, *overrides, cache_dir=None):
  # A persistent XLA cache shared by the two runs: the restart skips compiling
  # (model init alone compiles ~40 small programs on CPU).
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir or os.path.join(workdir, '..', 'xla'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  cmd = [sys.executable, '-m', 'experiments.main', f'--config={R20}:quick',
         f'--workdir={workdir}', '--config.train.epochs=1',
         '--config.train.max_steps_per_epoch=4', '--config.checkpoint.every_steps=1',
         '--config.data.batch_size=32', '--config.train.log_every=1', *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_quick_run_stop_resume_and_outputs(tmp_path):
  workdir = str(tmp_path / 'run')
  p = _cli(workdir, '--config.train.stop_after_steps=2')
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads(p.stdout.strip().splitlines()[-1])['stopped_early']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  p = _cli(workdir)
  assert p.returncode == 0, p.stderr[-3000:]

  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  assert train_steps == [1, 2, 3, 4]  # resumed at 2: no duplicates, no gaps
  for r in records:
    assert {'step', 'epoch', 'split', 'loss', 'accuracy', 'time', 'phase'} <= set(r)
  assert any(r['split'] == 'test' for r in records)
  assert 'lr' in records[0]

  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert 0.0 <= results['test_accuracy'] <= 1.0
  assert results['params'] == 269722  # ResNet-20, 10 classes
  assert results['macs'] == 40_551_040  # conv + fc MACs of ResNet-20 (option A)
  assert results['wall_time_s'] > 0
  assert results['config']['model']['name'] == 'resnet20'
  assert results['config']['train']['epochs'] == 1



def test_two_phase_pipeline_with_mask(tmp_path):
  """How a method chains phases: pretrain, then finetune from it under a mask."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jaxprune import training as T

  class Small(nnx.Module):  # tiny stand-in for a zoo model: fast to build and run
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), strides=4, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.fc = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
      return self.fc(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))

  c = load_config(R20, 'quick')
  c.data.batch_size = 32
  c.train.epochs = 1
  c.train.max_steps_per_epoch = 3
  c.progress = False
  workdir = str(tmp_path)
  pre = train_lib.run_phase(c, workdir, phase='pretrain', model=Small(nnx.Rngs(0)))
  keep = jnp.array([1., 1., 0., 1., 0., 1., 1., 1.])
  mask = {'conv': {'kernel': keep, 'bias': keep}}
  fine = train_lib.run_phase(c, workdir, phase='finetune', init=(pre.graphdef, pre.state),
                             mask=mask, train_overrides={'lr': 0.01, 'epochs': 2})
  assert int(fine.state.step) == 6  # fresh step count and schedule for the phase
  k = np.asarray(fine.state.params['conv']['kernel'])
  assert np.all(k[..., [2, 4]] == 0) and np.any(k[..., [0, 1]] != 0)
  assert 0 <= fine.eval['accuracy'] <= 1 and fine.eval['count'] == 1017
  assert sorted(os.listdir(workdir)) == ['finetune', 'metrics.jsonl', 'pretrain']
  phases = {r['phase'] for r in T.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))}
  assert phases == {'pretrain', 'finetune'}
  # Rerunning a finished phase restores it instead of training again.
  again = train_lib.run_phase(c, workdir, phase='pretrain', model=Small(nnx.Rngs(1)))
  np.testing.assert_array_equal(again.state.params['fc']['kernel'],
                                pre.state.params['fc']['kernel'])
