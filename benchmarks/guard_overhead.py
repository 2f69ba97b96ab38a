"""The non-finite guard's cost: the jitted train step with and without ``guard_step``.

  python -m benchmarks.guard_overhead                     # ResNet-20, batch 128
  python -m benchmarks.guard_overhead --model resnet56 --batch 64

``fit`` runs every step through :func:`jaxprune.training.guard_step`: after the
step, a finiteness reduction over the updated state ('stop', the default) and,
with ``skip``, a copy of the state before the step and a select after it.
Median seconds per step of the three, timed interleaved on one fixed batch of
the shipped CIFAR-10 subset; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import timing
from jaxprune import data, models
from jaxprune import training as T


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--model', default='resnet20')
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--reps', type=int, default=15)
  args = ap.parse_args(argv)
  tx = T.optim.make_optimizer('sgd', 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  graphdef, state = T.create_train_state(models.create(args.model, num_classes=10, rngs=nnx.Rngs(0)), tx, rng=0)
  batch = next(data.train_iterator('cifar10_subset', batch_size=args.batch, seed=0, shard_index=0, shard_count=1))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  plain = T.make_train_step(T.nnx_apply(graphdef), tx)
  fns = {'plain': plain, 'stop': T.guard_step(plain), 'skip': T.guard_step(plain, skip=True)}
  states = {k: jax.tree.map(jnp.copy, state) for k in fns}

  def stepper(name, fn):
    def run():
      states[name], m = fn(states[name], batch)
      return m['loss']

    return run

  t = timing.interleaved({k: stepper(k, f) for k, f in fns.items()}, reps=args.reps)
  out = {'model': args.model, 'batch': args.batch, **{f'{k}_ms': round(1e3 * v, 2) for k, v in t.items()}}
  out.update({f'{k}_ratio': round(t[k] / t['plain'], 3) for k in ('stop', 'skip')}, machine=timing.machine())
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
