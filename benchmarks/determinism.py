"""Which CPU settings change a training run's numbers: thread count, instruction set.

  nice -n 10 python -m benchmarks.determinism            # ~5 minutes on 2 cores
  python -m benchmarks.determinism --steps 60 --variants default,one_core

Runs the same short training (ResNet-20, the shipped CIFAR-10 subset with
augmentation, batch 64, SGD Nesterov, ``--steps`` steps, then test accuracy) in
a fresh process per variant, with the persistent compilation cache off so that
each variant compiles under its own settings, and compares every variant with
the default:

  default        this machine as it is (all its cores)
  default_again  the same again: a fresh process must give the same bits
  one_core       ``taskset -c 0``: XLA:CPU sizes its thread pool by the CPU affinity
  other_core     ``taskset -c 1``: one core, another one
  two_cores      ``taskset -c 0,1``: two cores (all of them on a 2-core machine)
  eigen_single   ``--xla_cpu_multi_thread_eigen=false``: no intra-op threading
  avx2           ``--xla_cpu_max_isa=AVX2``: code generated as for a CPU without AVX-512
  sse4           ``--xla_cpu_max_isa=SSE4_2``

Per variant: the first step whose loss differs from the default's, the largest
parameter difference at the end, and the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
  'default': ([], ''),
  'default_again': ([], ''),
  'one_core': (['taskset', '-c', '0'], ''),
  'other_core': (['taskset', '-c', '1'], ''),
  'two_cores': (['taskset', '-c', '0,1'], ''),
  'eigen_single': ([], '--xla_cpu_multi_thread_eigen=false'),
  'avx2': ([], '--xla_cpu_max_isa=AVX2'),
  'sse4': ([], '--xla_cpu_max_isa=SSE4_2'),
}


def worker(steps: int, out: str) -> None:
  import jax
  import numpy as np
  from flax import nnx

  from jaxprune import data, models
  from jaxprune import training as T

  bs = 64
  spe = data.steps_per_epoch('cifar10_subset', bs, shard_count=1)
  tx, sched = T.optim_from_config(dict(epochs=steps / spe, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4), spe)
  graphdef, state = T.create_train_state(models.create('resnet20', num_classes=10, rngs=nnx.Rngs(0)), tx, rng=0)
  apply_fn = T.nnx_apply(graphdef)
  step = T.make_train_step(apply_fn, tx, schedule=sched)
  it = data.train_iterator('cifar10_subset', batch_size=bs, seed=0, shard_index=0, shard_count=1)
  losses = []
  for _ in range(steps):
    state, m = step(state, next(it))
    losses.append(float(m['loss']))
  ev = T.evaluate(
    T.make_eval_step(apply_fn), state, data.eval_batches('cifar10_subset', batch_size=256), batch_size=256
  )
  params = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(out, **params)
  crc = zlib.crc32(b''.join(params[k].tobytes() for k in sorted(params)))
  info = {'losses': losses, 'accuracy': ev['accuracy'], 'crc': crc, 'threads': os.sched_getaffinity(0).__len__()}
  print('RESULT', json.dumps(info))


def run(name: str, steps: int, folder: str) -> dict:
  prefix, flags = VARIANTS[name]
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAXPRUNE_CACHE_DIR='off')
  env['XLA_FLAGS'] = ' '.join(f for f in (os.environ.get('XLA_FLAGS', ''), flags) if f)
  out = os.path.join(folder, f'{name}.npz')
  cmd = [*prefix, sys.executable, '-m', 'benchmarks.determinism', '--worker', out, '--steps', str(steps)]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if p.returncode != 0:
    raise RuntimeError(f'{name} failed:\n{p.stderr[-3000:]}')
  line = [ln for ln in p.stdout.splitlines() if ln.startswith('RESULT ')][-1]
  return {**json.loads(line[len('RESULT ') :]), 'params': out}


def main(argv: list[str] | None = None) -> int:
  import tempfile

  import numpy as np

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--steps', type=int, default=40)
  ap.add_argument('--variants', default=','.join(VARIANTS))
  ap.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    worker(args.steps, args.worker)
    return 0
  names = args.variants.split(',')
  if names[0] != 'default':
    names = ['default', *[n for n in names if n != 'default']]
  with tempfile.TemporaryDirectory() as folder:
    res = {n: run(n, args.steps, folder) for n in names}
    base = res['default']
    ref = np.load(base['params'])
    print('| variant | same bits | first differing step (loss) | max abs param diff | test accuracy |')
    print('|---|---|---|---|---|')
    for n, r in res.items():
      got = np.load(r['params'])
      diff = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref.files)
      first = next((i + 1 for i, (a, b) in enumerate(zip(base['losses'], r['losses'])) if a != b), None)
      print(
        f'| {n} | {"yes" if r["crc"] == base["crc"] else "no"} | {first or "-"} | {diff:.3g} | {r["accuracy"]:.4f} |'
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
