"""Wall time of trace, cost and slim on ResNet-50 (goal: trace + cost + slim <= 0.5 s).

python -m benchmarks.trace_time
python -m benchmarks.trace_time --branches   # with residual-branch groups too
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune
from experiments.timing import machine
from jaxprune import models


def main(reps: int = 5, branches: bool = False):
  print("machine:", machine(), "| branch groups:", branches)
  model = models.create("resnet50", num_classes=1000, rngs=nnx.Rngs(0))
  model.eval()
  fn, state = jaxprune.functional(model)
  x = jnp.zeros((1, 224, 224, 3))
  jaxprune.trace(fn, state, x, branches=branches)  # warm caches (imports, jax tracing machinery)
  times = {"trace": [], "cost": [], "cost (jit, first call)": [], "cost (jit, cached)": [], "slim": []}
  for _ in range(reps):
    t = time.perf_counter()
    graph = jaxprune.trace(fn, state, x, branches=branches)
    times["trace"].append(time.perf_counter() - t)
    masks = jaxprune.select.local(jaxprune.criteria.l1(state, graph), graph, keep=0.5)
    c = jax.jit(lambda m: jaxprune.cost(graph, m))
    t = time.perf_counter()
    jax.block_until_ready(c(masks))
    times["cost (jit, first call)"].append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(jaxprune.cost(graph, masks))
    times["cost"].append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(c(masks))
    times["cost (jit, cached)"].append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(jaxprune.slim(state, graph, masks))
    times["slim"].append(time.perf_counter() - t)
  med = {k: float(np.median(v)) for k, v in times.items()}
  for k, v in med.items():
    print(f"{k:24s} {v:7.3f} s")
  total = med["trace"] + med["cost"] + med["slim"]
  print(
    f"trace + cost + slim      {total:7.3f} s   (goal <= 0.5 s; Torch-Pruning DepGraph build: 0.09 s, measured elsewhere on this machine kind)"
  )


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--branches", action="store_true")
  p.add_argument("--reps", type=int, default=5)
  a = p.parse_args()
  main(a.reps, a.branches)
