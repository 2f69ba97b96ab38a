"""Tests of jaxprune.training: optimizers, steps and hooks, sharding, resume."""

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
from flax import nnx

from jaxprune import training as T
from jaxprune.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny conv net with BatchNorm and a non-trainable, non-BatchStat variable
# (like the zero-pad vectors of option-A ResNets). Source text, so that the
# multi-device subprocess can use the same definition.
TINY_NET_SRC = textwrap.dedent('''
  import jax, jax.numpy as jnp
  from flax import nnx

  class Const(nnx.Variable):
    pass

  class TinyNet(nnx.Module):
    def __init__(self, rngs, width=8, num_classes=10):
      self.conv1 = nnx.Conv(3, width, (3, 3), strides=2, use_bias=False, rngs=rngs)
      self.bn1 = nnx.BatchNorm(width, rngs=rngs)
      self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
      self.conv3 = nnx.Conv(2 * width, 4 * width, (3, 3), strides=2, use_bias=False, rngs=rngs)
      self.bn3 = nnx.BatchNorm(4 * width, rngs=rngs)
      self.offset = Const(jnp.zeros((4 * width,)))
      self.fc = nnx.Linear(4 * width, num_classes, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn1(self.conv1(x)))
      x = nnx.relu(self.bn2(self.conv2(x)))
      x = nnx.relu(self.bn3(self.conv3(x))) + self.offset[...]
      return self.fc(x.mean(axis=(1, 2)))
''')
exec(TINY_NET_SRC)  # defines TinyNet, Const


def tiny(seed=0, width=8):
  return TinyNet(nnx.Rngs(seed), width=width)  # noqa: F821


def fake_batch(seed=0, n=8, hw=16):
  r = np.random.RandomState(seed)
  return {'image': r.randn(n, hw, hw, 3).astype(np.float32), 'label': r.randint(0, 10, n).astype(np.int32)}


class FakeIterator:
  """A resumable iterator of deterministic random batches."""

  def __init__(self, n=8, hw=16):
    self.i, self.n, self.hw = 0, n, hw

  def __next__(self):
    b = fake_batch(1000 + self.i, self.n, self.hw)
    self.i += 1
    return b

  def get_state(self):
    return {'i': self.i}

  def set_state(self, s):
    self.i = s['i']


def allclose_trees(a, b, atol=0.0):
  return all(
    jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)), a, b))
  )


# ------------------------------------------------------------ optim/schedules


@pytest.mark.parametrize('warmup_epochs', [0.0, 2.0])
def test_cosine_schedule_matches_formula(warmup_epochs):
  spe, epochs, lr = 10, 20, 0.1
  s = optim.make_schedule('cosine', lr=lr, total_steps=epochs * spe, steps_per_epoch=spe, warmup_epochs=warmup_epochs)
  w = int(warmup_epochs * spe)
  for t in [0, 1, 5, 19, 20, 57, 100, 150, 199, 200]:
    expected = optim.cosine_reference(t, lr=lr, total_steps=epochs * spe, warmup_steps=w)
    assert float(s(t)) == pytest.approx(expected, abs=1e-7), t
  assert float(s(w)) == pytest.approx(lr)  # peak right after warmup


def test_step_schedule():
  s = optim.make_schedule('step', lr=0.1, total_steps=100, steps_per_epoch=10, decay_epochs=(3, 6), decay_factor=0.1)
  got = [float(s(t)) for t in (0, 29, 30, 59, 60, 99)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  s = optim.make_schedule('step', lr=0.1, total_steps=100, steps_per_epoch=10, decay_epochs=(3,), warmup_epochs=1)
  np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10, 29, 30)], [0.0, 0.05, 0.1, 0.1, 0.01], rtol=1e-6)
  with pytest.raises(ValueError, match='cosine'):
    optim.make_schedule('linear', lr=0.1, total_steps=10, steps_per_epoch=1)


def test_sgd_coupled_weight_decay_and_adamw():
  p = {'w': jnp.array([1.0, -2.0])}
  g = {'w': jnp.array([0.5, 0.5])}
  tx = optim.make_optimizer('sgd', 0.1, momentum=0.9, nesterov=False, weight_decay=0.01)
  u, _ = tx.update(g, tx.init(p), p)
  # first step: -lr * (g + wd * p) (momentum buffer starts at 0)
  np.testing.assert_allclose(u['w'], -0.1 * (g['w'] + 0.01 * p['w']), rtol=1e-6)
  tx = optim.make_optimizer('adamw', 0.1, weight_decay=0.01)
  u, _ = tx.update(g, tx.init(p), p)
  # decoupled: -lr * (adam_step (= sign(g) on step 1) + wd * p)
  np.testing.assert_allclose(u['w'], -0.1 * (1.0 + 0.01 * p['w']), rtol=1e-4)
  tx, sched = optim.from_config(dict(epochs=2, lr=0.2, schedule='cosine'), steps_per_epoch=5)
  assert float(sched(0)) == pytest.approx(0.2) and float(sched(10)) == pytest.approx(0.0)


# ----------------------------------------------------------------- the steps


def _setup(tx=None, width=8, extra=None):
  tx = tx or optax.sgd(0.05, momentum=0.9)
  graphdef, state = T.create_train_state(tiny(width=width), tx, rng=0, extra=extra)
  return graphdef, state, tx


def test_train_step_jit_matches_nojit_and_merge_roundtrip():
  graphdef, state, tx = _setup(optim.make_optimizer('sgd', 0.05, weight_decay=5e-4))
  assert set(state.other) == {'offset'}  # non-Param, non-BatchStat variable kept
  apply_fn = T.nnx_apply(graphdef)
  eager = T.make_train_step(apply_fn, tx, jit=False)
  jitted = T.make_train_step(apply_fn, tx, donate=False)
  batch = fake_batch()
  s1, m1 = eager(state, batch)
  s2, m2 = jitted(state, batch)
  assert allclose_trees(s1, s2, atol=1e-5)
  assert allclose_trees(m1, m2, atol=1e-5)
  assert int(s2.step) == 1
  assert not allclose_trees(state.batch_stats, s2.batch_stats)  # stats updated
  model = T.merge(graphdef, s2)
  model.eval()
  ref = apply_fn(T.variables(s2), jnp.asarray(batch['image']), train=False).logits
  np.testing.assert_allclose(model(jnp.asarray(batch['image'])), ref, atol=1e-5)


def test_mask_keeps_pruned_weights_zero():
  # SGD with momentum and weight decay: without the re-masking, decay and
  # momentum would move pruned weights.
  tx = optim.make_optimizer('sgd', 0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
  graphdef, state, _ = _setup(tx)
  keep = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
  # Partial mask: only conv1's output channels (broadcast over the kernel) and
  # bn1's scale/bias; all other params are unmasked.
  mask = {'conv1': {'kernel': keep}, 'bn1': {'scale': keep, 'bias': keep}}
  step = T.make_train_step(T.nnx_apply(graphdef), tx)
  first = np.asarray(state.params['conv1']['kernel'])  # the state is donated
  for i in range(4):
    state, _ = step(state, fake_batch(i), mask)
  k = np.asarray(state.params['conv1']['kernel'])
  assert np.all(k[..., [1, 4]] == 0.0)
  assert np.all(np.asarray(state.params['bn1']['scale'])[[1, 4]] == 0.0)
  assert not np.allclose(k[..., [0, 2]], np.asarray(first)[..., [0, 2]])


def test_extra_loss_adds_expected_gradient():
  c, lr = 0.3, 0.1
  tx = optax.sgd(lr)  # plain SGD: update = -lr * grad

  def l2(v, batch, fwd, *, rng, hparams):
    sq = sum(jnp.sum(x**2) for x in jax.tree.leaves(v.params))
    return c * sq, {'l2': sq}

  graphdef, state, _ = _setup(tx)
  apply_fn = T.nnx_apply(graphdef)
  plain = T.make_train_step(apply_fn, tx, donate=False)
  with_l2 = T.make_train_step(apply_fn, tx, extra_loss=l2, donate=False)
  batch = fake_batch()
  s_plain, m_plain = plain(state, batch)
  s_l2, m_l2 = with_l2(state, batch)
  # d/dp (c * |p|^2) = 2 c p  ->  extra update -lr * 2c * p
  expected = jax.tree.map(lambda a, p: a - lr * 2 * c * p, s_plain.params, state.params)
  assert allclose_trees(s_l2.params, expected, atol=1e-6)
  assert float(m_l2['loss']) == pytest.approx(float(m_plain['ce']) + float(m_l2['extra_loss']), rel=1e-6)
  assert float(m_l2['l2']) > 0


def test_mask_and_hparams_values_do_not_recompile():
  graphdef, state, tx = _setup()
  traces = []
  base = T.nnx_apply(graphdef)

  def apply_fn(v, images, *, train, rng, hparams):
    traces.append(1)  # runs once per trace (compilation), not per call
    fwd = base(v, images, train=train)
    return T.Forward(fwd.logits * hparams['temperature'], fwd.batch_stats)

  step = T.make_train_step(apply_fn, tx)
  mask = jax.tree.map(jnp.ones_like, state.params)
  for i in range(3):
    factor = 0.5 if i else 1.0
    mask = jax.tree.map(lambda m, f=factor: m * f, mask)
    state, _ = step(state, fake_batch(i), mask, {'temperature': 1.0 + i})
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_custom_apply_with_aux_and_partitioned_optimizer():
  # A method-style setup: per-channel gates in `extra` with their own
  # optimizer, the model frozen, a custom forward that returns the gates as aux.
  gates = {'gates': {'g': jnp.ones((10,))}}
  tx = optim.partition({'params': None, 'gates': optax.sgd(0.5)})
  graphdef, state, _ = _setup(tx, extra=gates)
  base = T.nnx_apply(graphdef)

  def apply_fn(v, images, *, train, rng, hparams):
    fwd = base(v, images, train=train)
    g = v.extra['gates']['g']
    return T.Forward(fwd.logits * g, fwd.batch_stats, aux={'g': g})

  def sparsity(v, batch, fwd, *, rng, hparams):
    return 0.1 * jnp.abs(fwd.aux['g']).sum()

  step = T.make_train_step(apply_fn, tx, extra_loss=sparsity, donate=False)
  new, metrics = step(state, fake_batch())
  assert allclose_trees(new.params, state.params)  # frozen
  assert not allclose_trees(new.extra, state.extra)  # gates trained
  assert 'extra_loss' in metrics
  with pytest.raises(ValueError, match='No optimizer'):
    optim.partition({'params': optax.sgd(0.1)}).init(T.trainables(state))


# ---------------------------------------------------------------- sharding

MULTI_DEVICE_SCRIPT = TINY_NET_SRC + textwrap.dedent('''
  import json, numpy as np, optax
  from jaxprune import training as T

  assert jax.device_count() == 4, jax.devices()
  r = np.random.RandomState(0)
  batches = [{'image': r.randn(16, 16, 16, 3).astype(np.float32),
              'label': r.randint(0, 10, 16).astype(np.int32)} for _ in range(3)]
  out = {}
  for n in (1, 4):
    mesh = T.make_mesh(jax.devices()[:n])
    tx = optax.sgd(0.1, momentum=0.9)
    graphdef, state = T.create_train_state(TinyNet(nnx.Rngs(0)), tx, rng=0)
    state = T.replicate(state, mesh)
    step = T.make_train_step(T.nnx_apply(graphdef), tx, mesh=mesh)
    losses = []
    for b in batches:
      state, m = step(state, T.shard_batch(b, mesh))
      losses.append(float(m['loss']))
    ev = T.evaluate(T.make_eval_step(T.nnx_apply(graphdef), mesh=mesh), state,
                    [dict(b, image=b['image'][:13], label=b['label'][:13]) for b in batches],
                    batch_size=16, mesh=mesh)
    out[n] = dict(losses=losses, kernel=np.asarray(state.params['fc']['kernel']).tolist(),
                  eval=ev, shards=len(state.params['fc']['kernel'].sharding.device_set))
  print('RESULT', json.dumps(out))
''')


def test_one_vs_four_devices_same_loss():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  p = subprocess.run(
    [sys.executable, '-c', MULTI_DEVICE_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 0, p.stderr[-3000:]
  line = [l for l in p.stdout.splitlines() if l.startswith('RESULT')][0]
  out = json.loads(line[len('RESULT ') :])
  one, four = out['1'], out['4']
  assert four['shards'] == 4  # params replicated on all 4 devices
  np.testing.assert_allclose(one['losses'], four['losses'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(one['kernel'], four['kernel'], atol=1e-5)
  assert one['eval']['count'] == four['eval']['count'] == 39  # padding not counted
  assert one['eval']['accuracy'] == pytest.approx(four['eval']['accuracy'])


MULTI_PROCESS_SCRIPT = TINY_NET_SRC + textwrap.dedent('''
  import json, sys, numpy as np, optax
  pid, port = int(sys.argv[1]), sys.argv[2]
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                             process_id=pid)
  from jaxprune import training as T
  assert jax.process_count() == 2 and jax.device_count() == 2
  mesh = T.make_mesh()
  tx = optax.sgd(0.1, momentum=0.9)
  graphdef, state = T.create_train_state(TinyNet(nnx.Rngs(0)), tx, rng=0)
  state = T.replicate(state, mesh)
  step = T.make_train_step(T.nnx_apply(graphdef), tx, mesh=mesh)
  r = np.random.RandomState(0)
  losses = []
  for _ in range(3):
    b = {'image': r.randn(16, 16, 16, 3).astype(np.float32),
         'label': r.randint(0, 10, 16).astype(np.int32)}
    # Each host feeds only its half of the global batch.
    local = {k: v[T.sharding.process_slice(16)] for k, v in b.items()}
    state, m = step(state, T.shard_batch(local, mesh))
    losses.append(float(m['loss']))
  print('RESULT', json.dumps(losses))
''')


def test_two_processes_match_one_device():
  """Multi-host data parallelism for real: 2 processes (jax.distributed, gloo)."""
  import socket

  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', MULTI_PROCESS_SCRIPT, str(i), str(port)],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads([l for l in out.splitlines() if l.startswith('RESULT')][0][7:]) for out, _ in outs]
  # The same run on this process's single device.
  tx = optax.sgd(0.1, momentum=0.9)
  graphdef, state = T.create_train_state(tiny(), tx, rng=0)
  step = T.make_train_step(T.nnx_apply(graphdef), tx)
  r = np.random.RandomState(0)
  ref = []
  for _ in range(3):
    b = {'image': r.randn(16, 16, 16, 3).astype(np.float32), 'label': r.randint(0, 10, 16).astype(np.int32)}
    state, m = step(state, b)
    ref.append(float(m['loss']))
  np.testing.assert_allclose(results[0], ref, rtol=1e-5)
  assert results[0] == results[1]


# ------------------------------------------------------- checkpoint & resume

_FIT_PARTS = {}


def _fit(workdir, stop_after_steps=None, train_iter=None, on_epoch_end=None):
  # The jitted steps are built once and shared by every run (same structure),
  # so the five runs below compile once.
  if not _FIT_PARTS:
    tx = optim.make_optimizer('sgd', 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    graphdef, _ = T.create_train_state(tiny(), tx, rng=0)
    apply_fn = T.nnx_apply(graphdef)
    _FIT_PARTS.update(tx=tx, step=T.make_train_step(apply_fn, tx), eval_step=T.make_eval_step(apply_fn))
  p = _FIT_PARTS
  _, state = T.create_train_state(tiny(), p['tx'], rng=0)
  eval_data = [fake_batch(99, n=12)]
  hooks = T.Hooks(
    p['step'], eval_fn=lambda s: T.evaluate(p['eval_step'], s, eval_data, batch_size=16), on_epoch_end=on_epoch_end
  )
  plan = T.Plan(
    num_steps=10, steps_per_epoch=4, checkpoint_every=3, keep=2, log_every=2, stop_after_steps=stop_after_steps
  )
  return T.fit(state, train_iter or FakeIterator(), hooks, plan, workdir=workdir, progress=False)


class KilledIterator(FakeIterator):
  """Raises (as a kill would) when asked for batch `at` (0-based)."""

  def __init__(self, at):
    super().__init__()
    self.at = at

  def __next__(self):
    if self.i == self.at:
      raise KeyboardInterrupt('simulated kill')
    return super().__next__()


TIMING = ('time', 'steps_per_s')


def _records(path):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in T.read_jsonl(path)]


def test_kill_and_resume_matches_uninterrupted(tmp_path):
  ref = _fit(str(tmp_path / 'ref'))
  assert not ref.stopped_early and int(ref.state.step) == 10

  # 1) a debug stop after 7 steps (no checkpoint at 7), then a restart
  run = str(tmp_path / 'run')
  stopped = _fit(run, stop_after_steps=7)
  assert stopped.stopped_early and int(stopped.state.step) == 7
  resumed = _fit(run)
  assert resumed.resumed_from == 6  # last checkpoint (every 3 steps)
  assert allclose_trees(resumed.state, ref.state)  # bit-identical
  strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING} for r in h]
  assert strip(resumed.history) == strip(ref.history)
  assert _records(os.path.join(run, 'metrics.jsonl')) == _records(str(tmp_path / 'ref' / 'metrics.jsonl'))

  # 2) a kill inside the loop (the 6th batch is never delivered)
  run2 = str(tmp_path / 'run2')
  with pytest.raises(KeyboardInterrupt):
    _fit(run2, train_iter=KilledIterator(at=5))
  resumed = _fit(run2)
  assert resumed.resumed_from == 4  # the epoch-end checkpoint
  assert allclose_trees(resumed.state, ref.state)
  assert strip(resumed.history) == strip(ref.history)

  # 3) a finished phase restarts as a no-op; only the last `keep` are kept
  again = _fit(run)
  assert again.resumed_from == 10 and allclose_trees(again.state, ref.state)
  assert T.Checkpointer(os.path.join(run, 'checkpoints')).all_steps() == [9, 10]


def test_epoch_end_hook_sees_each_epoch_and_its_state_is_kept(tmp_path):
  seen = []

  def hook(step, state):
    seen.append((step, int(state.step)))
    return state._replace(rng=state.rng + 1) if step == 4 else None  # e.g. a method's new mask

  plain, hooked = _fit(str(tmp_path / 'plain')), _fit(str(tmp_path / 'hooked'), on_epoch_end=hook)
  assert seen == [(4, 4), (8, 8), (10, 10)]  # epochs of 4 steps; the last one ends early
  np.testing.assert_array_equal(hooked.state.rng, plain.state.rng + 1)  # the hook's state went on
  assert [r['split'] for r in hooked.history].count('test') == 3


def test_checkpoint_ignores_unfinished_tmp_dir(tmp_path):
  graphdef, state, _ = _setup()
  ckpt = T.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, state, {'data': {'next_index': 1}, 'blob': b'\x00raw'})
  ckpt.wait()
  # A save killed midway leaves orbax's tmp dir; it must never be restored.
  os.makedirs(tmp_path / '2.orbax-checkpoint-tmp-1234' / 'state')
  assert T.Checkpointer(str(tmp_path)).latest_step() == 1
  restored, meta = T.Checkpointer(str(tmp_path)).restore(state)
  assert allclose_trees(restored, state)
  assert meta['data'] == {'next_index': 1} and meta['blob'] == b'\x00raw'


# ------------------------------------------------------------------ learning


def test_learns_on_shipped_cifar_subset(tmp_path):
  # TinyNet (16-32-64 channels, ~2 MMACs/image), 4 epochs of the shipped
  # 5,085 images without augmentation: ~46% test accuracy (model seeds 0-2: 45.6-47.1%)
  # in ~6 s; chance is 10%.
  from jaxprune import data

  bs, epochs = 64, 4
  spe = data.steps_per_epoch('cifar10_subset', bs, shard_count=1)
  tx, sched = T.optim_from_config(
    dict(epochs=epochs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, warmup_epochs=0.3), spe
  )
  graphdef, state = T.create_train_state(TinyNet(nnx.Rngs(0), width=16), tx, rng=0)  # noqa: F821
  apply_fn = T.nnx_apply(graphdef)
  eval_step = T.make_eval_step(apply_fn)
  eval_fn = lambda s: T.evaluate(eval_step, s, data.eval_batches('cifar10_subset', batch_size=512), batch_size=512)
  it = data.train_iterator('cifar10_subset', batch_size=bs, seed=0, shard_index=0, shard_count=1, augment=False)
  hooks = T.Hooks(T.make_train_step(apply_fn, tx, schedule=sched), eval_fn=eval_fn)
  res = T.fit(
    state,
    it,
    hooks,
    T.Plan(num_steps=epochs * spe, steps_per_epoch=spe, log_every=20),
    workdir=str(tmp_path),
    progress=False,
  )
  test = [r for r in res.history if r['split'] == 'test']
  assert len(test) == epochs and test[-1]['count'] == 1017
  assert test[-1]['accuracy'] > 0.35, test
  recs = T.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert {'step', 'epoch', 'split', 'loss', 'accuracy', 'lr', 'time'} <= set(recs[0])
