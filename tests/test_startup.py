"""Start-up: models.create's batched initialisation gives eager creation's values bit for
bit; the persistent compilation cache's folder and off switch."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxprune import compilation_cache, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(tree)]  # fmt: skip


@pytest.mark.parametrize(
  'name,kwargs',
  [
    ('resnet20', {}),
    pytest.param('vgg11', {}, marks=pytest.mark.slow),
    pytest.param('mobilenet_v1_cifar', {'width': 0.25}, marks=pytest.mark.slow),
    pytest.param('resnet18', {'in_channels': 1}, marks=pytest.mark.slow),
  ],
)
def test_create_equals_eager_creation_bit_for_bit(name, kwargs):
  """The reference: the model class called directly, every initialiser run eagerly."""
  fast_rngs, eager_rngs = nnx.Rngs(3, dropout=5), nnx.Rngs(3, dropout=5)
  fast = models.create(name, num_classes=7, rngs=fast_rngs, **kwargs)
  eager = models._REGISTRY[name](num_classes=7, rngs=eager_rngs, **kwargs)
  assert jax.tree.structure(nnx.state(fast)) == jax.tree.structure(nnx.state(eager))
  for a, b in zip(_leaves(nnx.state(fast)), _leaves(nnx.state(eager)), strict=True):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  # the Rngs advanced as by eager creation: later draws agree too
  for a, b in zip(_leaves(nnx.state(fast_rngs)), _leaves(nnx.state(eager_rngs)), strict=True):
    assert np.array_equal(a, b)
  x = np.ones((2, 32, 32, kwargs.get('in_channels', 3)), np.float32)
  fast.eval()
  eager.eval()
  np.testing.assert_array_equal(fast(x), eager(x))


def test_create_inside_a_trace_stays_abstract():
  abstract = nnx.eval_shape(lambda: models.create('resnet20', num_classes=10, rngs=nnx.Rngs(0)))
  assert models.count_params(abstract) == 269722


def _cache_dir(**env):
  """The folder ``compilation_cache.enable()`` picks in a fresh process with ``env``."""
  base = {k: v for k, v in os.environ.items() if k not in (compilation_cache.ENV, 'JAX_COMPILATION_CACHE_DIR')}
  code = 'from jaxprune import compilation_cache; print(compilation_cache.enable())'
  p = subprocess.run([sys.executable, '-c', code], env={**base, **env}, capture_output=True, text=True, cwd=REPO)
  assert p.returncode == 0, p.stderr[-2000:]
  return p.stdout.strip().splitlines()[-1]


def test_compilation_cache_folder_and_off_switch(tmp_path):
  assert _cache_dir() == os.path.expanduser(os.path.join('~', '.cache', 'jaxprune', 'xla'))
  assert _cache_dir(JAXPRUNE_CACHE_DIR=str(tmp_path / 'xla')) == str(tmp_path / 'xla')
  assert _cache_dir(JAXPRUNE_CACHE_DIR='off') == 'None'
  # JAX's own setting wins: jaxprune never moves a cache the user chose
  assert _cache_dir(JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'mine')) == str(tmp_path / 'mine')
