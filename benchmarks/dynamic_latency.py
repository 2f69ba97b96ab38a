"""What FTWT's per-sample MAC cut buys in time: batch-1 inference, dense vs the
network slimmed to one sample's masks.

Per-sample masks here are FTWT's targets at r taken from the ungated network's
own activations (the paper's before-training estimate, B6); each sample is
run through (a) the dense network, (b) the dense network with the gates as
masks (`ftwt.gated`: how FTWT runs in the official code, simulated pruning),
(c) `jaxprune.slim` to its masks, compiled once per mask pattern. The compile
time of (c) is printed too: every new mask pattern is a new shape, which is
why per-sample slimming pays off only when patterns repeat or the network is
served with a shape-polymorphic runtime.

  python -m benchmarks.dynamic_latency                        # resnet20, r=0.8, 3 samples
  python -m benchmarks.dynamic_latency --model resnet56 --r 0.9 --samples 5
"""
from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

import jaxprune
from jaxprune import models
from jaxprune.methods import ftwt
from experiments.timing import interleaved, machine


def run(name: str, r: float, samples: int, reps: int) -> list[dict]:
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  graphdef = nnx.graphdef(model)
  fn, state = jaxprune.functional(model)
  x = jax.random.normal(jax.random.key(0), (samples, 32, 32, 3))
  graph = jaxprune.trace(fn, state, x[:1])
  points = ftwt.gate_points(fn, graph, state, x[:1])
  gated_fn = jax.jit(ftwt.gated(fn, graph, points))
  masks = ftwt.oracle_masks(gated_fn, points, state, x, r)
  preds = ftwt.open_predictors(points)
  dense_fn = jax.jit(fn)
  slim_fn = jax.jit(jaxprune.nnx_bridge.apply_fn(graphdef))
  dense_macs = float(jaxprune.cost(graph).macs)
  rows = []
  for i in range(samples):
    xi = x[i:i + 1]
    mi = {k: v[i] for k, v in masks.items()}
    small = jaxprune.slim(state, graph, mi)
    t0 = time.perf_counter()
    jax.block_until_ready(slim_fn(small, xi))
    compile_s = time.perf_counter() - t0
    t = interleaved({"dense": lambda: dense_fn(state, xi),
                     "gated": lambda: gated_fn(state, preds, xi)[0],
                     "slim": lambda: slim_fn(small, xi)}, reps=reps)
    mac = dense_macs / float(jaxprune.cost(graph, mi).macs)
    row = {"sample": i, "mac_speedup": mac, "slim_speedup": t["dense"] / t["slim"],
           "gated_speedup": t["dense"] / t["gated"], "dense_ms": 1e3 * t["dense"],
           "slim_compile_s": compile_s}
    rows.append(row)
    print(f"{name} r={r} sample {i}: MACs {mac:4.2f}x fewer | batch-1 latency: slimmed "
          f"{row['slim_speedup']:4.2f}x, gated-dense {row['gated_speedup']:4.2f}x (dense "
          f"{row['dense_ms']:.2f} ms) | compile for this mask pattern {compile_s:.1f} s",
          flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="resnet20")
  p.add_argument("--r", type=float, default=0.8)
  p.add_argument("--samples", type=int, default=3)
  p.add_argument("--reps", type=int, default=20)
  a = p.parse_args(argv)
  print(machine())
  run(a.model, ftwt.check_r(a.r), a.samples, a.reps)


if __name__ == "__main__":
  main()
