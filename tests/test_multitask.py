"""Multitask training and evaluation: the summed task losses and per-task accuracy of the
train and eval steps against a numpy count, and the clear error for mislaid labels."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import training as T


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _setup(seed=0, b=6):
  rng = np.random.default_rng(seed)
  params = {'left': jnp.asarray(rng.normal(size=(4, 10)), jnp.float32),
            'right': jnp.asarray(rng.normal(size=(4, 19)), jnp.float32)}  # fmt: skip
  x = rng.normal(size=(b, 4)).astype(np.float32)
  labels = np.stack([rng.integers(0, 10, b), rng.integers(0, 19, b)], 1).astype(np.int32)

  def apply_fn(v, images, *, train, rng=None, hparams=None):
    # a dict built in reverse order: the steps must match columns by sorted task name
    return T.Forward({'right': images @ v.params['right'], 'left': images @ v.params['left']}, v.batch_stats)

  state = T.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, other={}, extra={},
    opt_state=optax.sgd(0.0).init({'params': params, 'extra': {}}), rng=jnp.zeros((2,), jnp.uint32),
  )  # fmt: skip
  return state, apply_fn, x, labels, params


def _hand(params, x, labels):
  ce, hits = 0.0, {}
  for name, col in (('left', 0), ('right', 1)):
    logp = _log_softmax(x.astype(np.float64) @ np.asarray(params[name], np.float64))
    ce = ce - logp[np.arange(len(x)), labels[:, col]]
    hits[name] = (logp.argmax(-1) == labels[:, col]).astype(np.float64)
  return ce, hits


@pytest.mark.parametrize('jit', [True, False])
def test_train_step_sums_the_task_losses(jit):
  state, apply_fn, x, labels, params = _setup()
  ce, hits = _hand(params, x, labels)
  step = T.make_train_step(apply_fn, optax.sgd(0.0), jit=jit, donate=False)
  _, metrics = step(state, {'image': jnp.asarray(x), 'label': jnp.asarray(labels)})
  np.testing.assert_allclose(float(metrics['ce']), ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['accuracy']), (hits['left'] + hits['right']).mean() / 2, rtol=1e-6)


def test_eval_counts_each_task_and_skips_padding():
  state, apply_fn, x, labels, params = _setup(seed=1, b=9)
  ce, hits = _hand(params, x, labels)
  batches = [{'image': x[:5], 'label': labels[:5]}, {'image': x[5:], 'label': labels[5:]}]
  out = T.evaluate(T.make_eval_step(apply_fn), state, batches, batch_size=8)  # the second batch is padded
  assert out['count'] == 9
  np.testing.assert_allclose(out['loss'], ce.mean(), rtol=1e-5)
  for name in ('left', 'right'):
    np.testing.assert_allclose(out[f'accuracy/{name}'], hits[name].mean(), rtol=1e-6)
  np.testing.assert_allclose(out['accuracy'], (hits['left'] + hits['right']).mean() / 2, rtol=1e-6)


def test_labels_that_do_not_match_the_tasks_are_refused():
  state, apply_fn, x, labels, _ = _setup()
  step = T.make_train_step(apply_fn, optax.sgd(0.0), jit=False)
  with pytest.raises(ValueError, match=r'labels of shape \[batch, 2\]'):
    step(state, {'image': jnp.asarray(x), 'label': jnp.asarray(labels[:, 0])})
