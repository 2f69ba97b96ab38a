"""Tests of jaxprune.training: optimizers, steps and hooks, sharding, resume."""

import glob
import json
import os
import re
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
from jaxprune.training import guard, optim

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
  masks = [jax.tree.map(lambda p, f=f: jnp.full_like(p, f), state.params) for f in (1.0, 0.5, 0.25)]
  # Lowering to MLIR happens once per compilation (persistent-cache hits included);
  # counted by JAX's public monitoring events rather than the jit's in-memory cache,
  # whose entries a long test session may evict.
  lowered = []

  def on_event(event, _secs, **kw):
    if event == '/jax/core/compile/jaxpr_to_mlir_module_duration' and 'train_step' in kw.get('fun_name', ''):
      lowered.append(kw['fun_name'])

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    for i, mask in enumerate(masks):
      state, _ = step(state, fake_batch(i), mask, {'temperature': 1.0 + i})
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert len(traces) == 1
  assert len(lowered) == 1, lowered


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


# ------------------------------------------------ fault injection, real data
#
# TinyNet on the shipped CIFAR-10 subset through the real (resumable) input
# pipeline: 10 steps of batch 16, epochs of 4, checkpoints every 3 steps, 2 kept.

REAL_FIT_SRC = textwrap.dedent('''
  import numpy as np
  from jaxprune import data
  from jaxprune import training as T
  from jaxprune.training import optim

  _REAL = {}

  def real_fit(workdir, *, num_steps=10, stop_after_steps=None, extra_loss=None, hparams_fn=None, seed=0, **plan):
    key = id(extra_loss)
    if key not in _REAL:  # one compilation per loss, shared by the runs of a test
      tx = optim.make_optimizer('sgd', 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
      graphdef, _ = T.create_train_state(TinyNet(nnx.Rngs(0)), tx, rng=0)
      apply_fn = T.nnx_apply(graphdef)
      evals = [next(data.eval_batches('cifar10_subset', batch_size=64))]
      ev = T.make_eval_step(apply_fn)
      _REAL[key] = (tx, T.make_train_step(apply_fn, tx, extra_loss=extra_loss),
                    lambda s: T.evaluate(ev, s, evals, batch_size=64))
    tx, step, eval_fn = _REAL[key]
    _, state = T.create_train_state(TinyNet(nnx.Rngs(0)), tx, rng=0)
    it = data.train_iterator('cifar10_subset', batch_size=16, seed=seed, augment=True, shard_index=0, shard_count=1)
    plan = T.Plan(num_steps=num_steps, steps_per_epoch=4, checkpoint_every=3, keep=2, log_every=2,
                  stop_after_steps=stop_after_steps, **plan)
    return T.fit(state, it, T.Hooks(step, eval_fn=eval_fn, hparams_fn=hparams_fn), plan,
                 workdir=workdir, progress=False)

  def summary(result):
    """What a run ends with: its epoch records (no timing) and a CRC of every final array."""
    import zlib
    hist = [{k: v for k, v in r.items() if k not in ('time', 'steps_per_s')} for r in result.history]
    crc = [zlib.crc32(np.asarray(x).tobytes()) for x in jax.tree.leaves(result.state)]
    return {'history': hist, 'crc': crc, 'step': int(result.state.step)}
''')
_ns = {}
exec(TINY_NET_SRC + REAL_FIT_SRC, _ns)
real_fit, summary = _ns['real_fit'], _ns['summary']

KILL_SCRIPT = (
  TINY_NET_SRC
  + REAL_FIT_SRC
  + textwrap.dedent('''
  import os, signal, sys
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import atomicity

  workdir, where, at = sys.argv[1], sys.argv[2], sys.argv[3]

  if where == 'meta':  # while the items of step `at` are written (before the rename)
    save_fn = ocp.handlers.JsonCheckpointHandler._save_fn

    async def killed_save_fn(self, x, directory):
      if directory.parent.name.startswith(at + '.'):  # <step>.orbax-checkpoint-tmp/meta
        os.kill(os.getpid(), signal.SIGKILL)
      return await save_fn(self, x, directory)

    ocp.handlers.JsonCheckpointHandler._save_fn = killed_save_fn
  else:  # every item of step `at` written, the commit marker and the rename to come
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed_finalize(self, *args, **kwargs):
      if self._final_path.name == at:
        os.kill(os.getpid(), signal.SIGKILL)
      return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = killed_finalize
  real_fit(workdir)
  print('NOT KILLED')
''')
)


def _steps_and_tmp(ckpt_dir):
  names = os.listdir(ckpt_dir)
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if 'tmp' in n]


def test_sigkill_during_checkpoint_writes_keeps_the_previous_and_resumes_exactly(tmp_path):
  """A process SIGKILLed inside orbax's save (while writing the items, then just before
  the commit rename): the previous checkpoint stays the latest and readable, and the
  run resumed from it ends bit-identical to an uninterrupted one."""
  ref = summary(real_fit(str(tmp_path / 'ref')))
  run, ckpt_dir = str(tmp_path / 'run'), str(tmp_path / 'run' / 'checkpoints')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  # 1st process: killed writing step 4's checkpoint; 2nd: resumes at 3, saves 4, killed
  # committing 6.
  for where, at, expect_latest in (('meta', '4', 3), ('finalize', '6', 4)):
    p = subprocess.run(
      [sys.executable, '-c', KILL_SCRIPT, run, where, at],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert p.returncode == -9, (p.returncode, p.stderr[-3000:])
    steps, tmp = _steps_and_tmp(ckpt_dir)
    assert steps[-1] == expect_latest and tmp, (steps, tmp)  # killed mid-write, not marked complete
    ckpt = T.Checkpointer(ckpt_dir)  # cleans up what the kill left
    _, tmp = _steps_and_tmp(ckpt_dir)
    assert ckpt.latest_step() == expect_latest and not tmp
    tx = optim.make_optimizer('sgd', 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    template = T.create_train_state(tiny(), tx, rng=0)[1]
    restored, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, template))  # readable, checksums match
    assert int(restored.step) == expect_latest and meta['data'] == {'next_index': expect_latest}
    ckpt.close()
  resumed = real_fit(run)
  assert resumed.resumed_from == 4
  assert summary(resumed) == ref


def _corrupt(step_dir, how):
  state_files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  biggest = max(state_files, key=os.path.getsize)  # a kernel's chunk
  if how == 'truncate':
    with open(biggest, 'r+b') as f:
      f.truncate(os.path.getsize(biggest) // 2)
  elif how == 'flip':  # bytes changed in place: orbax alone restores them without complaint
    data = bytearray(open(biggest, 'rb').read())
    for i in range(len(data) // 2, len(data) // 2 + 16):
      data[i] ^= 0x5A
    open(biggest, 'wb').write(bytes(data))
  else:  # the JSON item (data position, metric sums) cut short
    path = os.path.join(step_dir, 'meta', 'metadata')
    open(path, 'w').write(open(path).read()[:40])


@pytest.mark.parametrize('how', ['truncate', 'flip', 'meta'])
def test_corrupt_latest_checkpoint_is_named_and_resume_falls_back(tmp_path, how):
  ref = summary(real_fit(str(tmp_path / 'ref')))
  run, ckpt_dir = str(tmp_path / 'run'), str(tmp_path / 'run' / 'checkpoints')
  assert real_fit(run, stop_after_steps=7).stopped_early
  assert T.Checkpointer(ckpt_dir).all_steps() == [4, 6]
  _corrupt(os.path.join(ckpt_dir, '6'), how)
  ckpt = T.Checkpointer(ckpt_dir)
  template = jax.tree.map(jnp.zeros_like, real_fit(str(tmp_path / 'short'), num_steps=1).state)
  with pytest.raises(T.CorruptCheckpointError, match=re.escape(os.path.join(ckpt_dir, '6'))):
    ckpt.restore(template)
  assert ckpt.all_steps() == [4, 6]  # without fallback nothing is moved
  ckpt.close()
  resumed = real_fit(run)  # falls back to 4, with a warning naming 6
  assert resumed.resumed_from == 4 and summary(resumed) == ref
  assert os.path.isdir(os.path.join(ckpt_dir, '6.corrupt'))  # kept for inspection, out of the way
  assert T.Checkpointer(ckpt_dir).all_steps() == [9, 10]


def test_checkpoint_of_another_structure_is_not_called_corrupt(tmp_path):
  graphdef, state, _ = _setup()
  ckpt = T.Checkpointer(str(tmp_path))
  ckpt.save(1, state)
  _, other, _ = _setup(width=4)
  with pytest.raises(
    ValueError, match=r"different state.*\['bn1'\]\['bias'\]: float32\[8\] in the checkpoint, float32\[4\] expected"
  ):
    ckpt.restore(other, fallback=True)
  assert ckpt.all_steps() == [1]  # a mismatch is not moved aside


@pytest.mark.parametrize('where', ['meta', 'finalize'])
def test_failed_write_raises_and_keeps_no_partial_checkpoint(tmp_path, monkeypatch, where):
  """A disk that fills up while a checkpoint is written (an item, or orbax's commit marker):
  a clear error, nothing of that step left or marked complete, and the run resumes."""
  import errno

  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import atomicity

  ref = summary(real_fit(str(tmp_path / 'ref')))
  run, ckpt_dir = str(tmp_path / 'run'), str(tmp_path / 'run' / 'checkpoints')
  if where == 'meta':  # writing an item of step 4
    cls, name = ocp.handlers.JsonCheckpointHandler, '_save_fn'
    hits = lambda self, x, directory: directory.parent.name.startswith('4.')
  else:  # writing step 4's commit marker
    cls, name = atomicity.AtomicRenameTemporaryPath, 'finalize'
    hits = lambda self: self._final_path.name == '4'
  original = getattr(cls, name)

  async def full_disk(*args):
    if hits(*args):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await original(*args)

  monkeypatch.setattr(cls, name, full_disk)
  with pytest.raises(T.CheckpointWriteError, match=r'step 4.*No space left.*latest complete checkpoint is step 3'):
    real_fit(run)
  monkeypatch.setattr(cls, name, original)
  assert sorted(os.listdir(ckpt_dir)) == ['3']  # no tmp dir, no step 4
  resumed = real_fit(run)
  assert resumed.resumed_from == 3 and summary(resumed) == ref


# ------------------------------------------------------- non-finite guard


def budget_loss(v, batch, fwd, *, rng, hparams):
  """A method-style term that goes to -inf when ``hparams['poison']`` is 1 (its gradient stays finite)."""
  term = 1e-3 * jnp.sum(v.params['fc']['kernel'] ** 2) + jnp.log1p(-hparams['poison'])
  return term, {'budget': term}


def sqrt_loss(v, batch, fwd, *, rng, hparams):
  """A finite term whose gradient is NaN when ``hparams['poison']`` is 1 (sqrt at 0)."""
  term = 1e-3 * jnp.sqrt(jnp.sum(v.params['fc']['kernel'] ** 2) * (1.0 - hparams['poison']))
  return term, {'norm': term}


def poison_at(*steps):
  return lambda step: {'poison': jnp.float32(step in steps)}


def test_nonfinite_loss_stops_naming_step_term_and_last_checkpoint(tmp_path):
  run = str(tmp_path / 'run')
  with pytest.raises(T.NonFiniteError) as e:
    real_fit(run, extra_loss=budget_loss, hparams_fn=poison_at(5))  # the 6th update
  err = e.value
  last = os.path.join(run, 'checkpoints', '4')
  assert err.step == 6 and err.terms == ['budget', 'extra_loss', 'loss'] and err.checkpoint == last
  msg = str(err)
  assert "step 6 of phase 'train': budget=-inf (and extra_loss=-inf, loss=-inf); finite: " in msg
  assert re.search(r'finite: .*\bce=\d', msg) and last in msg
  assert 'on_nonfinite' in msg  # says how to get past it
  # Nothing non-finite was saved: step 6 was due (every 3 steps) and is not there.
  assert T.Checkpointer(os.path.join(run, 'checkpoints')).all_steps() == [3, 4]
  # A NaN that only the gradient sees: named as the update, at the step it happened.
  with pytest.raises(T.NonFiniteError, match=r'step 2 .*every loss term was finite but the update') as e:
    real_fit(str(tmp_path / 'grad'), extra_loss=sqrt_loss, hparams_fn=poison_at(1))
  assert e.value.terms == ['update'] and e.value.checkpoint is None


def test_nonfinite_steps_skipped_up_to_a_bound(tmp_path):
  # A skipped step leaves the state as it was (only the step counter moves on): the
  # run poisoned at its 6th step ends where a run stopped after 5 steps ends.
  five = real_fit(str(tmp_path / 'five'), num_steps=5, extra_loss=budget_loss, hparams_fn=poison_at())
  skip = dict(on_nonfinite='skip', max_skipped_steps=2)
  six = real_fit(str(tmp_path / 'six'), num_steps=6, extra_loss=budget_loss, hparams_fn=poison_at(5), **skip)
  assert int(six.state.step) == 6
  assert allclose_trees(six.state._replace(step=five.state.step), five.state)
  recs = T.read_jsonl(str(tmp_path / 'six' / 'metrics.jsonl'))
  assert [(r['step'], r['terms'][0]) for r in recs if r['split'] == 'skipped'] == [(6, 'budget')]
  assert all(np.isfinite(r['loss']) for r in recs if 'loss' in r)  # skipped steps left out of the means
  # The bound holds across a restart: 2 skips before the stop, the 3rd stops the run.
  run = str(tmp_path / 'run')
  bad = poison_at(1, 5, 6)
  assert real_fit(run, stop_after_steps=5, extra_loss=budget_loss, hparams_fn=bad, **skip).stopped_early
  with pytest.raises(T.NonFiniteError, match=r'step 7 .*after 2 skipped step\(s\)') as e:
    real_fit(run, extra_loss=budget_loss, hparams_fn=bad, **skip)
  assert e.value.checkpoint == os.path.join(run, 'checkpoints', '6')


def test_two_runs_with_the_same_seed_are_bit_identical(tmp_path):
  """Same seed, same machine: every epoch record and every final array equal bit for
  bit (fresh workdirs; the data order and augmentation come from the seed). A
  different data seed is a different run, so the comparison can fail."""
  a, b = real_fit(str(tmp_path / 'a'), num_steps=6), real_fit(str(tmp_path / 'b'), num_steps=6)
  assert summary(a) == summary(b)
  np.testing.assert_array_equal(a.state.params['fc']['kernel'], b.state.params['fc']['kernel'])
  other = real_fit(str(tmp_path / 'c'), num_steps=6, seed=1)
  assert summary(other)['crc'] != summary(a)['crc']


@pytest.mark.parametrize('skip', [False, True])
def test_guard_leaves_the_steps_numbers_alone(skip):
  """The guarded step (both modes) gives the unguarded step's states bit for bit, so a
  run's numbers do not depend on the guard or its mode."""
  from jaxprune import data

  tx = optim.make_optimizer('sgd', 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  graphdef, state = T.create_train_state(tiny(), tx, rng=0)
  plain = T.make_train_step(T.nnx_apply(graphdef), tx)
  guarded = T.guard_step(plain, skip=skip)
  a, b = jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, state)
  it = data.train_iterator('cifar10_subset', batch_size=16, seed=0, shard_index=0, shard_count=1)
  for _ in range(3):
    batch = next(it)
    a, ma = plain(a, batch)
    b, mb = guarded(b, batch)
    assert mb.pop(guard.FINITE_UPDATE) == 1.0 and jax.device_get(ma) == jax.device_get(mb)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_guard_checks_the_methods_extra_state():
  """A NaN that appears only in the method's state (gates, records) marks the update non-finite."""
  tx = optax.sgd(0.1)
  graphdef, state = T.create_train_state(tiny(), tx, rng=0)
  state = state._replace(extra={'gate': jnp.ones(3)})

  def step(s, batch, mask=None, hparams=None):  # a method whose gate update went NaN
    return s._replace(extra={'gate': s.extra['gate'] * jnp.nan}), {'loss': jnp.float32(1.0)}

  _, metrics = T.guard_step(step)(state, None)
  assert metrics[guard.FINITE_UPDATE] == 0.0
  _, metrics = T.guard_step(lambda s, *a: (s, {'loss': jnp.float32(1.0)}))(state, None)
  assert metrics[guard.FINITE_UPDATE] == 1.0
