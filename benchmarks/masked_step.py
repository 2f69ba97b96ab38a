"""Train-step time with channel masks applied (jaxprune.masked) vs the plain network.

Goal: masked / plain <= 1.05 (multiplying activations by masks should be
nearly free). Also checks that new mask values do not recompile.

  python -m benchmarks.masked_step
  python -m benchmarks.masked_step --models resnet20,vgg11 --batch 64
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxprune
from experiments.timing import interleaved, machine
from jaxprune import models


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="resnet20,vgg11")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--reps", type=int, default=7)
  args = p.parse_args()
  print("machine:", machine())
  for name in args.models.split(","):
    model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
    model.eval()
    fn, state = jaxprune.functional(model)
    x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
    y = jnp.zeros((args.batch,), jnp.int32)
    graph = jaxprune.trace(fn, state, x[:1])
    g = jaxprune.masked(fn, graph)

    def plain_loss(s):
      return optax.softmax_cross_entropy_with_integer_labels(fn(s, x), y).mean()

    def masked_loss(s, m):
      return optax.softmax_cross_entropy_with_integer_labels(g(s, m, x), y).mean()

    plain = jax.jit(jax.grad(plain_loss))
    masked = jax.jit(jax.grad(masked_loss))  # same gradients as plain: w.r.t. the variables
    m1 = graph.ones()
    m2 = {k: v * 0.5 for k, v in m1.items()}
    t = interleaved({"plain": lambda: plain(state), "masked": lambda: masked(state, m1)}, reps=args.reps)
    masked(state, m2)
    print(
      f"{name:9s} batch {args.batch}: plain {1e3 * t['plain']:.0f} ms, masked {1e3 * t['masked']:.0f} ms, "
      f"ratio {t['masked'] / t['plain']:.3f} (goal <= 1.05); compilations after a new mask: "
      f"{masked._cache_size()}"
    )


if __name__ == "__main__":
  main()
