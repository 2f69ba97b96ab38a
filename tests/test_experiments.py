"""The experiments package: configs, CLI, registry, the shared phases, the import structure,
and a method added from this file alone, run end to end through the CLI."""

import ast
import glob
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_dict, config_flags

import jaxprune
from experiments import phases, pruning, registry, results
from experiments import train as train_lib
from experiments import workdir as workdir_lib
from experiments.recipe import Outcome, Recipe
from jaxprune import training as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, 'experiments')
CONFIGS = sorted(
  p for p in glob.glob(os.path.join(EXPERIMENTS, 'configs', '*.py')) if 'def get_config' in open(p).read()
)
R20 = os.path.join(EXPERIMENTS, 'configs', 'dense_cifar10_subset_resnet20.py')


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def parse_flags(*args):
  argv = ['prog', *args]
  fv = flags.FlagValues()
  # sys_argv: the override flags are declared from the argv being parsed.
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


# ------------------------------------------------------------ configs, registry


def test_config_overrides_and_misspelled_key():
  c = parse_flags(
    f'--config={R20}:quick',
    '--config.train.epochs=3',
    '--config.train.max_steps_per_epoch=5',
    '--config.data.data_dir=/x',
  )
  assert c.train.epochs == 3 and c.train.max_steps_per_epoch == 5 and c.data.data_dir == '/x'
  with pytest.raises(Exception, match='epochz'):
    parse_flags(f'--config={R20}', '--config.train.epochz=3')
  with pytest.raises(Exception, match='quik'):
    parse_flags(f'--config={R20}:quik')


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_config_validates(path):
  c = load_config(path)
  train_lib.validate(c)
  assert isinstance(registry.get(c.method.name), Recipe)
  assert 'python -m experiments.main' in open(path).read()  # launch command documented


@pytest.mark.parametrize(
  'section,key,bad,valid',
  [
    ('model', 'name', 'resnet21', 'resnet20'),
    ('data', 'name', 'cifar11', 'cifar10_subset'),
    ('method', 'name', 'magic', 'dense'),
    ('train', 'optimizer', 'lamb', 'adamw'),
    ('train', 'schedule', 'linear', 'cosine'),
  ],
)
def test_unknown_names_list_valid_choices(tmp_path, section, key, bad, valid):
  c = load_config(R20, 'quick')
  c[section][key] = bad
  with pytest.raises(ValueError, match=valid) as e:
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert bad in str(e.value)
  assert not os.listdir(tmp_path)  # failed before any work


def test_unknown_keys_fail_with_the_valid_ones():
  c = load_config(R20)
  with c.unlocked():
    c.train.epochz = 3
  with pytest.raises(ValueError, match='epochz'):
    train_lib.validate(c)
  c = load_config(os.path.join(EXPERIMENTS, 'configs', 'magnitude_cifar10_subset_resnet20.py'))
  with c.unlocked():
    c.method.budgte = 0.3
  with pytest.raises(ValueError, match=r"budgte.*'budget'"):
    train_lib.validate(c)


def test_one_registry_for_library_and_cli():
  assert registry.available() == ['dense', *jaxprune.methods.available()]
  for name in jaxprune.methods.available():
    assert registry.get(name).defaults().name == name


# ------------------------------------------------------------ structure


def _imports(path):
  """experiments.* modules a file imports, also inside functions."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return {m for m in out if m.startswith('experiments.') and _module_path(m)}


def _module_path(module):
  path = os.path.join(REPO, *module.split('.'))
  return path + '.py' if os.path.exists(path + '.py') else None


def _graph():
  files = glob.glob(os.path.join(EXPERIMENTS, '**', '*.py'), recursive=True)
  name = lambda f: os.path.relpath(f, REPO)[:-3].replace(os.sep, '.')
  return {name(f): _imports(f) for f in files if not f.endswith('__init__.py')}


def test_no_import_cycle_in_experiments():
  graph, state = _graph(), {}

  def visit(m, stack):
    if state.get(m) == 'done':
      return
    assert state.get(m) != 'open', f'import cycle: {" -> ".join(stack + [m])}'
    state[m] = 'open'
    for dep in graph.get(m, ()):
      visit(dep, stack + [m])
    state[m] = 'done'

  for m in graph:
    visit(m, [])


def test_configs_import_no_pipeline_code():
  for module, deps in _graph().items():
    if module.startswith('experiments.configs.'):
      assert all(d.startswith('experiments.configs.') for d in deps), (module, deps)


@pytest.mark.parametrize('name', jaxprune.methods.available())
def test_method_recipes_are_small(name):
  lines = open(os.path.join(EXPERIMENTS, f'{name}.py')).read().count('\n')
  assert lines < 150, f'experiments/{name}.py has {lines} lines: move what is not {name}-specific to the shared pieces'


# ------------------------------------------------------------ phases


class Small(nnx.Module):  # a tiny stand-in for a zoo model: fast to build and run
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), strides=4, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


def _small_config():
  c = load_config(R20, 'quick')
  c.data.batch_size = 32
  c.data.eval_batch_size = 1024  # one eval batch, one compilation
  c.train.epochs = 2
  c.train.max_steps_per_epoch = 3
  c.progress = False
  return c


def test_phases_chain_restart_schedules_and_resume(tmp_path):
  exp = phases.experiment(_small_config(), str(tmp_path))
  pre = phases.train(exp, 'pretrain', Small(nnx.Rngs(0)))
  fine = phases.train(exp, 'finetune', (pre.graphdef, pre.state), overrides={'lr': 0.01, 'epochs': 1})
  assert int(pre.state.step) == 6 and int(fine.state.step) == 3  # a fresh step count and schedule
  assert 0 <= fine.eval['accuracy'] <= 1 and fine.eval['count'] == 1017
  assert sorted(os.listdir(tmp_path)) == ['finetune', 'metrics.jsonl', 'pretrain']
  assert {r['phase'] for r in T.read_jsonl(str(tmp_path / 'metrics.jsonl'))} == {'pretrain', 'finetune'}
  # Rerunning a finished phase restores it instead of training again.
  again = phases.train(exp, 'pretrain', Small(nnx.Rngs(1)))
  np.testing.assert_array_equal(again.state.params['fc']['kernel'], pre.state.params['fc']['kernel'])


def test_continued_schedule_equals_one_uninterrupted_phase(tmp_path):
  """Stop a phase after an epoch, continue it in a new phase (optimizer state, step, rng
  and data position kept, as after slicing a network mid-training): the same weights."""
  exp = phases.experiment(_small_config(), str(tmp_path))
  whole = phases.train(exp, 'whole', Small(nnx.Rngs(0)))
  first = phases.train(exp, 'first', Small(nnx.Rngs(0)), stop_at=3)
  assert int(first.state.step) == 3
  rest = phases.train(exp, 'rest', (first.graphdef, first.state), continue_schedule=True)
  assert int(rest.state.step) == 6
  for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(rest.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------ the CLI


def _cli(workdir, config, *overrides, env=None):
  cmd = [sys.executable, '-m', 'experiments.main', f'--config={config}', f'--workdir={workdir}', *overrides]
  env = dict(os.environ, **(env or {}))
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_quick_run_stop_resume_and_outputs(tmp_path):
  workdir = str(tmp_path / 'run')
  args = ['--config.train.epochs=1', '--config.train.max_steps_per_epoch=4', '--config.checkpoint.every_steps=1']
  args += ['--config.data.batch_size=32', '--config.train.log_every=1', '--config.progress=False']
  p = _cli(workdir, f'{R20}:quick', *args, '--config.train.stop_after_steps=2')
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads(p.stdout.strip().splitlines()[-1])['stopped_early']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  p = _cli(workdir, f'{R20}:quick', *args)
  assert p.returncode == 0, p.stderr[-3000:]

  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3, 4]  # resumed at 2: no gaps
  for r in records:
    assert {'step', 'epoch', 'split', 'loss', 'accuracy', 'time', 'phase'} <= set(r)
  assert any(r['split'] == 'test' for r in records) and 'lr' in records[0]

  r = results.load(workdir)
  assert r['method'] == 'dense' and r['dataset'] == 'cifar10_subset' and r['model'] == 'resnet20'
  assert 0.0 <= r['test_accuracy'] <= 1.0 and r['test_accuracy'] == r['dense_accuracy']
  assert r['params'] == 269722  # ResNet-20, 10 classes
  assert r['macs'] == 40_551_040  # conv + fc MACs of ResNet-20 (option A)
  assert r['dense']['flops_paper'] == 2 * r['macs'] and r['ratios']['macs'] == 1.0
  assert r['wall_time_s'] > 0 and set(r['phase_times_s']) == {'dense_start'}
  assert r['config']['train']['epochs'] == 1


# A method registered from this file alone: random channel selection to a MAC budget.
TOY = 'random_channels_test'


def toy_defaults():
  return config_dict.ConfigDict(
    {
      'name': TOY,
      'budget': 0.5,
      'key': 0,
      'finetune': {'epochs': 1, 'lr': 0.01},
      'pretrained': config_dict.placeholder(str),
    }
  )


def toy_run(exp, dense):
  m = exp.config.method
  scores = jaxprune.criteria.random(jax.random.key(m.key), dense.graph)
  masks = jaxprune.select.global_topk(scores, dense.graph, budget=m.budget, unit='macs')
  return Outcome(masks=masks, budget=m.budget, unit='macs', details={'scores': 'uniform random'})


recipe = Recipe(defaults=toy_defaults, run=toy_run)

TOY_CONFIG = '''
"""A toy method from tests/test_experiments.py.

  python -m experiments.main --config THIS_FILE --workdir DIR
"""
import jaxprune.methods
from experiments.configs import common

jaxprune.methods.register({toy!r}, 'test_experiments')  # its recipe: test_experiments.recipe


def get_config():
  import test_experiments

  c = common.base()
  c.model.kwargs.widths = (4, 8, 16)  # ResNet-20's structure, less arithmetic
  c.data.batch_size, c.data.eval_batch_size, c.data.augment = 32, 1024, False
  c.train.epochs, c.train.max_steps_per_epoch = 1, 2
  c.method = test_experiments.toy_defaults()
  c.progress = False
  return c
'''


@pytest.mark.slow
def test_a_method_added_from_a_test_file_runs_end_to_end_through_the_cli(tmp_path):
  config = tmp_path / 'toy_config.py'
  config.write_text(textwrap.dedent(TOY_CONFIG.format(toy=TOY)))
  workdir = tmp_path / 'run'
  env = {'PYTHONPATH': os.pathsep.join([os.path.dirname(__file__), os.environ.get('PYTHONPATH', '')])}
  p = _cli(str(workdir), str(config), '--config.method.budget=0.4', env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  r = results.load(str(workdir))
  assert r['method'] == TOY and r['details'] == {'scores': 'uniform random'}
  assert r['budget'] == 0.4 and r['unit'] == 'macs' and r['achieved'] == r['ratios']['macs']
  assert 0.3 < r['ratios']['macs'] <= 0.4 + 1e-6  # within a channel's worth of the budget
  assert r['pruned']['params'] < r['dense']['params'] and sum(r['kept_per_group'].values()) == r['pruned']['channels']
  assert r['speedup']['speedup'] > 0 and r['speedup']['machine']
  assert set(r['phase_times_s']) == {'dense_start', 'method', 'slim', 'finetune'}
  phases_run = {rec['phase'] for rec in T.read_jsonl(str(workdir / 'metrics.jsonl'))}
  assert phases_run == {'pretrain', 'finetune'}
  from experiments import summarize

  assert f'| {TOY} | macs | 0.4 | 1 |' in summarize.main([str(workdir)])


def test_slim_and_count_against_a_hand_count(tmp_path):
  """pruning.slim on a one-conv network: MACs and params after slimming by hand."""
  exp = phases.experiment(_small_config(), str(tmp_path))
  graphdef, state = T.create_train_state(Small(nnx.Rngs(0)), T.optim.make_optimizer('sgd', 0.1), 0)
  dense = pruning.counted(exp, graphdef, state, {'accuracy': 0.5})
  masks = dense.graph.ones()
  (name,) = [g.name for g in dense.graph.groups]
  masks[name] = jnp.asarray([1.0, 0, 1, 0, 1, 0, 1, 0])
  small = pruning.slim(exp, dense, Outcome(masks=masks))
  # conv 3x3x3 -> 8 channels on an 8x8 map (32 / stride 4), fc 8 -> 10; half the channels kept
  assert dense.cost['macs'] == 8 * 8 * 27 * 8 + 8 * 10
  assert small.cost['macs'] == 8 * 8 * 27 * 4 + 4 * 10
  assert small.cost['params'] == (27 + 1 + 2) * 4 + 4 * 10 + 10  # conv w+b, BN scale+bias, fc
  assert small.speedup['speedup'] > 0 and small.state.params['fc']['kernel'].shape == (4, 10)


# ------------------------------------------------------------ reliability
#
# The README's main job (magnitude pruning of ResNet-20 on the shipped CIFAR-10
# subset), shrunk: widths 4-8-16, 3 steps per phase, iterative in 2 stages, so the
# pipeline has every kind of boundary: pretrain -> method (prune0_finetune) -> slim
# -> finetune -> results.

MAG = os.path.join(EXPERIMENTS, 'configs', 'magnitude_cifar10_subset_resnet20.py')
TIMING = ('time', 'steps_per_s')
MEASURED = ('speedup', 'phase_times_s', 'wall_time_s')  # timings: differ from run to run


def tiny_magnitude():
  c = load_config(MAG, 'quick')
  c.model.kwargs.widths = (4, 8, 16)
  c.data.batch_size, c.data.eval_batch_size, c.data.augment = 32, 1024, True
  c.train.epochs, c.train.max_steps_per_epoch, c.train.log_every = 1, 3, 1
  c.method.budget, c.method.steps, c.method.iter_finetune_epochs = 0.4, 2, 1
  c.method.finetune = {'epochs': 1, 'lr': 0.01}
  c.checkpoint.every_steps = 2
  c.progress = False
  return c


def outputs(workdir):
  """A run's results (less its timings) and its metrics records (less theirs)."""
  r = {k: v for k, v in results.load(workdir).items() if k not in MEASURED}
  recs = [
    {k: v for k, v in rec.items() if k not in TIMING} for rec in T.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  ]
  return r, recs


class Killed(BaseException):
  """Stands in for a SIGKILL at a phase boundary (nothing after it runs)."""


@pytest.mark.slow
def test_kill_at_every_phase_boundary_resumes_without_recomputing(tmp_path, monkeypatch):
  """Killed after each pipeline step in turn, rerun each time: every rerun trains only
  the phases not finished yet, slim's evaluation and timing run once, and the results
  and every metrics record equal those of an uninterrupted run -- the same seed, the
  same numbers bit for bit (also a determinism check: every phase is computed once,
  in a different process state than the uninterrupted run's)."""
  finished_run, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'run')
  train_lib.train_and_evaluate(tiny_magnitude(), finished_run)
  timed, fit, speed = phases.timed, T.fit, pruning.measure_speedup
  trained, measured = [], []

  def counting_fit(state, *args, phase, **kwargs):
    r = fit(state, *args, phase=phase, **kwargs)
    trained.append((phase, r.resumed_from, int(r.state.step)))
    return r

  monkeypatch.setattr(T, 'fit', counting_fit)
  monkeypatch.setattr(pruning, 'measure_speedup', lambda *a, **k: measured.append(1) or speed(*a, **k))
  runs = {}
  for boundary in ('dense_start', 'method', 'slim', 'finetune', None):

    def killing_timed(exp, name, *args, boundary=boundary, **kwargs):
      out = timed(exp, name, *args, **kwargs)
      if name == boundary:
        raise Killed(name)
      return out

    monkeypatch.setattr(phases, 'timed', killing_timed)
    trained.clear()
    measured.clear()
    try:
      train_lib.train_and_evaluate(tiny_magnitude(), workdir)
    except Killed:
      pass
    runs[boundary] = ([(p, resumed is None) for p, resumed, _ in trained], len(measured))
  fresh, restored = True, False
  assert runs == {
    'dense_start': ([('pretrain', fresh)], 0),
    'method': ([('pretrain', restored), ('prune0_finetune', fresh)], 0),
    'slim': ([('pretrain', restored), ('prune0_finetune', restored)], 1),
    'finetune': ([('pretrain', restored), ('prune0_finetune', restored), ('finetune', fresh)], 0),
    None: ([('pretrain', restored), ('prune0_finetune', restored), ('finetune', restored)], 0),
  }
  # A restored phase trained nothing: it restored its last step.
  assert all(resumed == step for _, resumed, step in trained)
  assert outputs(workdir) == outputs(finished_run)
  # Run again once finished: its results, nothing trained or measured.
  trained.clear()
  assert train_lib.train_and_evaluate(tiny_magnitude(), workdir) == results.load(workdir) and not trained


def test_resume_with_a_changed_config_is_refused_with_the_differences(tmp_path):
  run = str(tmp_path / 'run')
  workdir_lib.record(tiny_magnitude(), run, {})  # what a run records when it starts
  c = tiny_magnitude()
  c.train.lr, c.method.budget = 0.05, 0.3
  with pytest.raises(workdir_lib.ConfigChangedError) as e:
    train_lib.train_and_evaluate(c, run)
  msg = str(e.value)
  assert 'method.budget: 0.4 -> 0.3' in msg and 'train.lr: 0.1 -> 0.05' in msg
  assert 'new --workdir' in msg and 'force_resume=True' in msg
  assert msg.count(' -> ') == 2  # only what differs
  assert not os.path.exists(os.path.join(run, 'pretrain'))  # refused before any work
  # Keys that cannot change results may change (also inside per-phase overrides).
  c = tiny_magnitude()
  c.train.log_every, c.checkpoint.every_steps, c.checkpoint.keep, c.progress = 5, 100, 3, True
  c.train.on_nonfinite, c.train.max_skipped_steps, c.train.stop_after_steps = 'skip', 3, 7
  c.train.eval_every_epochs, c.method.finetune.log_every = 2, 2
  assert workdir_lib.prepare(c, run) == {}


def test_workdir_of_another_experiment_is_refused_also_from_its_results(tmp_path):
  """A workdir holding a finished dense run (its results.json only, as runs from
  before config.json have) refuses a magnitude run."""
  dense = load_config(R20, 'quick')
  run = str(tmp_path / 'dense_run')
  os.makedirs(run)
  results.write(
    run, results.record(dense, test_accuracy=0.5, dense_accuracy=0.5, dense={'macs': 1.0}, pruned={'macs': 1.0})
  )
  with pytest.raises(workdir_lib.ConfigChangedError) as e:
    train_lib.train_and_evaluate(tiny_magnitude(), run)
  assert "results.json); what differs" in str(e.value) and "method.name: 'dense' -> 'magnitude'" in str(e.value)
  assert sorted(os.listdir(run)) == [results.FILE]


def test_forced_resume_records_the_change(tmp_path):
  run = str(tmp_path / 'run')
  workdir_lib.record(tiny_magnitude(), run, {})
  c = tiny_magnitude()
  c.seed, c.checkpoint.force_resume = 1, True
  forced = workdir_lib.prepare(c, run)
  assert forced == {'seed': (0, 1)}
  workdir_lib.record(c, run, forced)
  (change,) = T.read_jsonl(os.path.join(run, workdir_lib.CHANGES_FILE))
  assert change['changed'] == {'seed': [0, 1]}
  assert json.load(open(os.path.join(run, workdir_lib.CONFIG_FILE)))['seed'] == 1
  c.checkpoint.force_resume = False  # the recorded config is now the forced one
  assert workdir_lib.prepare(c, run) == {}


def test_unwritable_workdir_fails_before_any_work(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(workdir_lib.WorkdirError, match=r"cannot write to the workdir.*Pass a --workdir"):
    train_lib.train_and_evaluate(tiny_magnitude(), str(blocker / 'run'))
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    with pytest.raises(workdir_lib.WorkdirError, match='Permission denied'):
      train_lib.train_and_evaluate(tiny_magnitude(), str(locked / 'run'))


def test_unreachable_magnitude_budget_fails_before_training(tmp_path):
  c = tiny_magnitude()
  c.method.budget, c.method.min_channels = 0.01, 4
  with pytest.raises(ValueError, match='cannot be met.*min_channels'):
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path) == []  # nothing trained, no config recorded: fix it and run again
  c.method.budget = 1.5
  with pytest.raises(ValueError, match=r'\(0, 1\]'):
    train_lib.train_and_evaluate(c, str(tmp_path))
  c.method.budget, c.train.on_nonfinite = 0.5, 'ignore'
  with pytest.raises(ValueError, match="on_nonfinite 'ignore'; valid: stop, skip"):
    train_lib.train_and_evaluate(c, str(tmp_path))


def test_cli_prints_what_to_do_and_exits_1(tmp_path):
  """The CLI turns a user error into its message and exit status 1, no traceback."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  p = _cli(str(blocker / 'run'), f'{R20}:quick')
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1].startswith('WorkdirError: cannot write to the workdir')
  assert 'Traceback' not in p.stderr


# ------------------------------------------------------------- data slices, BatchNorm


def test_training_slices_leave_the_holdout_out():
  c = load_config(R20)
  c.data.holdout = 500
  x, y = jaxprune.data.load_arrays(c.data.name, 'train')
  info = jaxprune.data.get_info(c.data.name)
  held = jaxprune.data.normalize(
    x[jaxprune.data.holdout_indices(len(y), 500, int(c.data.holdout_seed))], info.mean, info.std
  )
  held = {np.asarray(im).tobytes() for im in held}
  taken = np.concatenate([b['image'] for b in phases.eval_slice(c, 'train', len(y), seed=3)])
  assert len(taken) == len(y) - 500  # every training record once, no held-out one
  assert not held & {im.tobytes() for im in taken}
  batches = phases.train_batches(c, 3, seed=3)
  assert [b['image'].shape[0] for b in batches] == [c.data.batch_size] * 3
  assert phases.train_batches(c, 0) == []


class _ConvBN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = jaxprune.models.layers.batch_norm(4, rngs=rngs)
    self.fc = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.bn(self.conv(x)).mean(axis=(1, 2)))


def test_bn_recalibration_moves_running_stats_to_the_batch_statistics():
  graphdef, state = T.create_train_state(_ConvBN(nnx.Rngs(0)), optax.identity(), 0)
  x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, (8, 6, 6, 3)), jnp.float32)
  p = state.params['conv']
  # The conv output by hand (SAME padding, NHWC), its per-channel batch statistics.
  h = jax.lax.conv_general_dilated(x, p['kernel'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h = h + p['bias']
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  old = state.batch_stats['bn']
  recalibrate = phases.bn_recalibration(T.nnx_apply(graphdef))
  one = recalibrate(state, [{'image': x}])
  # torch-equivalent momentum: new = 0.9 old + 0.1 batch.
  np.testing.assert_allclose(one.batch_stats['bn']['mean'], 0.9 * old['mean'] + 0.1 * mean, rtol=1e-5, atol=1e-5)
  many = recalibrate(state, [{'image': x}] * 80)  # 0.9**80 = 2e-4 left
  np.testing.assert_allclose(many.batch_stats['bn']['mean'], mean, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(many.batch_stats['bn']['var'], var, rtol=5e-3)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), many.params, state.params))
  assert recalibrate(state, []) is state
