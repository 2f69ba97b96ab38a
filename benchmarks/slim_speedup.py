"""Measured speedup of physically slimmed networks vs their MAC reduction.

For ResNet-56 (CIFAR) and ResNet-50 (ImageNet), prune 30/50/70% of the MACs
with global L1 selection, slim, and time jitted inference (and, with
--train, a train step) of the dense and the slimmed network side by side.
Prints measured speedup / MAC speedup: 1.0 means the MAC cut is fully paid
out in time.

  python -m benchmarks.slim_speedup                  # both models, inference
  python -m benchmarks.slim_speedup --train --round_to 8
  python -m benchmarks.slim_speedup --branches        # residual-branch units vs streams

With --branches the same global L1 selection runs twice per budget: on the
channel groups alone (a residual stream is one group: a stream channel goes
from every block at once) and on channel + branch groups (a block drops its
own branch channels, consumers gather the channels that reach them), and the
three networks (dense, stream-slimmed, branch-slimmed) are timed side by side.
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


def _train_step(fn):
  def loss(state, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(fn(state, x), y).mean()

  return jax.jit(jax.grad(loss))


def run_branches(
  name: str, hw: int, batch: int, num_classes: int, removed: list[float], round_to: int, reps: int
) -> list[dict]:
  """Stream-level vs branch-level global L1, timed in one run."""
  model = models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0))
  model.eval()
  fn, state = jaxprune.functional(model)
  x = jax.random.normal(jax.random.key(0), (batch, hw, hw, 3))
  graphs = {"stream": jaxprune.trace(fn, state, x[:1]), "branch": jaxprune.trace(fn, state, x[:1], branches=True)}
  scores = {k: jaxprune.criteria.l1(state, g) for k, g in graphs.items()}
  dense_macs = float(jaxprune.cost(graphs["stream"]).macs)
  fwd = jax.jit(fn)
  rows = []
  for r in removed:
    fns, mac = {"dense": lambda: fwd(state, x)}, {}
    for k, g in graphs.items():
      masks = jaxprune.select.global_topk(scores[k], g, budget=1 - r, unit="macs", round_to=round_to)
      small = jaxprune.slim(state, g, masks)
      mac[k] = dense_macs / float(jaxprune.cost(g, masks).macs)
      fns[k] = (lambda s: lambda: fwd(s, x))(small)
    t = interleaved(fns, reps=reps)
    for k in graphs:
      sp = t["dense"] / t[k]
      rows.append(
        {
          "model": name,
          "units": k,
          "removed": r,
          "mac_speedup": mac[k],
          "infer_speedup": sp,
          "ratio": sp / mac[k],
          "dense_ms": 1e3 * t["dense"],
        }
      )
      print(
        f"{name:9s} -{int(100 * r):2d}% MACs, {k:6s} units: MAC speedup {mac[k]:4.2f}x | "
        f"inference {sp:4.2f}x ({sp / mac[k]:4.2f} of MAC) dense {1e3 * t['dense']:.0f} ms",
        flush=True,
      )
  return rows


def run(
  name: str, hw: int, batch: int, num_classes: int, removed: list[float], round_to: int, train: bool, reps: int
) -> list[dict]:
  model = models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0))
  model.eval()
  fn, state = jaxprune.functional(model)
  x = jax.random.normal(jax.random.key(0), (batch, hw, hw, 3))
  y = jnp.zeros((batch,), jnp.int32)
  graph = jaxprune.trace(fn, state, x[:1])
  scores = jaxprune.criteria.l1(state, graph)
  dense_macs = float(jaxprune.cost(graph).macs)
  fwd = jax.jit(fn)
  step = _train_step(fn) if train else None
  rows = []
  for r in removed:
    masks = jaxprune.select.global_topk(scores, graph, budget=1 - r, unit="macs", round_to=round_to)
    small = jaxprune.slim(state, graph, masks)
    mac_speedup = dense_macs / float(jaxprune.cost(graph, masks).macs)
    fns = {"dense": lambda: fwd(state, x), "slim": lambda: fwd(small, x)}
    if train:
      fns.update({"dense_train": lambda: step(state, x, y), "slim_train": lambda: step(small, x, y)})
    t = interleaved(fns, reps=reps)
    row = {
      "model": name,
      "removed": r,
      "mac_speedup": mac_speedup,
      "infer_speedup": t["dense"] / t["slim"],
      "dense_ms": 1e3 * t["dense"],
    }
    if train:
      row["train_speedup"] = t["dense_train"] / t["slim_train"]
    rows.append(row)
    msg = (
      f"{name:9s} -{int(100 * r):2d}% MACs: MAC speedup {mac_speedup:4.2f}x | inference "
      f"{row['infer_speedup']:4.2f}x ({row['infer_speedup'] / mac_speedup:4.2f} of MAC) "
      f"dense {row['dense_ms']:.0f} ms"
    )
    if train:
      msg += f" | train step {row['train_speedup']:4.2f}x ({row['train_speedup'] / mac_speedup:4.2f} of MAC)"
    print(msg, flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="resnet56,resnet50")
  p.add_argument("--removed", default="0.3,0.5,0.7")
  p.add_argument("--round_to", type=int, default=1)
  p.add_argument("--train", action="store_true")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--branches", action="store_true", help="compare residual-branch units with stream units (inference)")
  args = p.parse_args()
  print("machine:", machine())
  removed = [float(r) for r in args.removed.split(",")]
  for name in args.models.split(","):
    imagenet = name.startswith("resnet") and int(name[6:]) in (18, 34, 50)
    shape = (224, 4, 1000) if imagenet else (32, 64, 10)
    if args.branches:
      run_branches(name, *shape, removed, args.round_to, args.reps)
    else:
      run(name, *shape, removed, args.round_to, args.train, args.reps)


if __name__ == "__main__":
  main()
