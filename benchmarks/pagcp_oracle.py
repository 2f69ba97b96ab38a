"""PAGCP's oracle: all candidate ratios of a unit at once (vmap) vs one at a time.

For every unit of the multitask model, the 19 candidate masks of PAGCP's
scan (ratios 0.05 ... 0.95, lowest L1 filters first) are evaluated on the
same MultiMNIST validation images:

  batched      one call, the candidates stacked on a leading axis (vmap)
  one-by-one   19 calls of the same compiled program, one candidate each
  slimmed      the official way: prune a copy at the candidate (jaxprune.slim),
               compile it (new shapes) and run it; on the first --slim-units units
               (-1: all), its losses checked equal to batched

The per-task losses of batched and one-by-one must agree (checked); times are
interleaved medians, compilation excluded except for `slimmed`, where it is
what a new shape costs. Goal: batched >= 5x faster than one-by-one.

  python -m benchmarks.pagcp_oracle
  python -m benchmarks.pagcp_oracle --images 512 --batch 8 --single-batch 64 --reps 3
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune
import jaxprune.data as jd
from experiments.timing import interleaved, machine
from jaxprune import models, nnx_bridge
from jaxprune.methods import pagcp

TASKS = ("left", "right")


def _network(seed: int):
  """The zoo's multitask model with random BatchNorm statistics (an untrained
  network whose loss still moves when channels go)."""
  model = models.create("multitask_resnet", num_classes=10, rngs=nnx.Rngs(seed))
  graphdef, variables = nnx_bridge.split(model)
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map(
    lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype), variables["batch_stats"]
  )
  return graphdef, {**variables, "batch_stats": stats}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=256, help="validation images (multimnist test)")
  p.add_argument("--batch", type=int, default=4, help="images per scan step, batched oracle")
  p.add_argument("--single-batch", type=int, default=64, help="images per step, one-by-one")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--slim-units", type=int, default=2, help="units timed the slimmed way (-1: all)")
  args = p.parse_args()
  print("machine:", machine())

  graphdef, v = _network(0)
  fn = nnx_bridge.apply_fn(graphdef)
  x, y = jd.load_arrays("multimnist", "test")
  info = jd.get_info("multimnist")
  data = {
    "image": ((x[: args.images] / 255.0 - info.mean[0]) / info.std[0]).astype(np.float32),
    "label": y[: args.images],
  }
  graph = jaxprune.trace(fn, v, data["image"][:1])
  losses = pagcp.cross_entropy_losses(TASKS)
  batched = pagcp.make_oracle(fn, graph, losses, data, batch_size=args.batch)
  single = pagcp.make_oracle(fn, graph, losses, data, batch_size=args.single_batch)
  masks = {g.name: np.ones(g.size, np.float32) for g in graph.groups}
  scores = pagcp.filter_scores(v, graph, masks)
  units = [g.name for g in graph.groups if g.name.startswith("encoder.")]
  print(
    f"{len(units)} units, {len(pagcp.RATIOS)} candidates each, {args.images} images "
    f"(batched {args.batch} / one-by-one {args.single_batch} per step), "
    f"{jax.local_device_count()} device(s)"
  )

  candidates = {  # each unit's 19 masks, lowest-scored filters first, as PAGCP's scan makes them
    u: np.stack(
      [pagcp.remove_lowest(masks, u, scores, pagcp.prune_count(r, graph.group(u).size))[u] for r in pagcp.RATIOS]
    )
    for u in units
  }
  batched_losses = {}
  total = {"batched": 0.0, "one_by_one": 0.0}
  for u in units:
    cands = candidates[u]
    out_b = batched_losses[u] = batched.evaluate(v, masks, u, cands)
    out_s = np.concatenate([single.evaluate(v, masks, u, c[None]) for c in cands])
    err = float(np.max(np.abs(out_b - out_s) / np.abs(out_s)))
    assert err < 1e-4, f"{u}: batched and one-by-one losses differ by {err:.2e}"
    t = interleaved(
      {
        "batched": lambda: batched.evaluate(v, masks, u, cands),
        "one_by_one": lambda: [single.evaluate(v, masks, u, c[None]) for c in cands],
      },
      reps=args.reps,
    )
    for k in total:
      total[k] += t[k]
    print(
      f"  {u:36s} batched {t['batched']:6.2f} s  one-by-one {t['one_by_one']:6.2f} s  "
      f"ratio {t['one_by_one'] / t['batched']:5.2f}x  (max rel. loss diff {err:.1e})"
    )
  print(
    f"all units: batched {total['batched']:.2f} s, one-by-one {total['one_by_one']:.2f} s, "
    f"one-by-one / batched = {total['one_by_one'] / total['batched']:.2f}x (goal >= 5x)"
  )

  slim_units = units if args.slim_units < 0 else units[: args.slim_units]
  run = jax.jit(nnx_bridge.apply_fn(graphdef))
  slim_total = batched_total = 0.0
  for u in slim_units:
    cands = candidates[u]
    start = time.perf_counter()
    out_slim = []
    for c in cands:  # a new shape per candidate: slim, compile, run over the images, sum the losses
      small = jaxprune.slim(v, graph, {**masks, u: c})
      sums = np.zeros(len(TASKS))
      for i in range(0, args.images, args.single_batch):
        out = run(small, data["image"][i : i + args.single_batch])
        batch = {"label": data["label"][i : i + args.single_batch]}
        sums += [float(jnp.sum(losses[t](out, batch))) for t in TASKS]
      out_slim.append(sums)
    slimmed = time.perf_counter() - start
    out_b = batched_losses[u]
    err = float(np.max(np.abs(out_b - np.stack(out_slim)) / np.abs(out_b)))
    assert err < 1e-4, f"{u}: batched and slimmed losses differ by {err:.2e}"
    t = interleaved({"batched": lambda: batched.evaluate(v, masks, u, cands)}, reps=args.reps)
    slim_total += slimmed
    batched_total += t["batched"]
    print(
      f"slimmed one-by-one (official way, compile per shape) on {u}: {slimmed:.2f} s vs "
      f"batched {t['batched']:.2f} s: {slimmed / t['batched']:.2f}x  (max rel. loss diff {err:.1e})"
    )
  if slim_units:
    print(
      f"{len(slim_units)} unit(s), the official way: slimmed {slim_total:.2f} s, batched {batched_total:.2f} s, "
      f"slimmed / batched = {slim_total / batched_total:.2f}x"
    )


if __name__ == "__main__":
  main()
