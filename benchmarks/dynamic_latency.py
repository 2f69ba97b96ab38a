"""What a per-sample MAC cut (FTWT, ManiDP) buys in time, on the gate units the
methods use (residual branches, traced with ``branches=True``; ``--units stream``
for FTWT's first version).

Per-sample masks: FTWT's targets at r from the ungated network's activations
(the paper's before-training estimate, B6), or ManiDP's saliency gates at their
init, thresholded at the per-layer quantile of the batch-mean saliency for the
kept rate r. The networks are random-init: latency depends on the shapes only.

Batch 1, per sample: (a) the dense network, (b) the dense network with the gates
as masks (how both official codes run: simulated pruning), (c) ``jaxprune.slim``
to the sample's masks, compiled once per kept-count vector (its compile time is
printed: each new one is a new shape).

Batched (``--batch B``), a deployable alternative: the batch grouped by mask
pattern, one slimmed network per pattern run on its images, against (a) and (b)
at batch B. Trained gates repeat patterns (FTWT r = 0.8: 11-13 over 1,017 test
images; ManiDP: about one per image), which ``--patterns P`` mimics by drawing
each image's masks from P of the samples.

  python -m benchmarks.dynamic_latency                        # FTWT, resnet20, r=0.8
  python -m benchmarks.dynamic_latency --method manidp --r 0.5
  python -m benchmarks.dynamic_latency --batch 64 --patterns 1,11,64
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune
from experiments.timing import interleaved, machine
from jaxprune import models
from jaxprune.methods import ftwt, manidp


def masks_and_gated(method: str, fn, state, x, r: float, units: str):
  """(graph, per-sample masks {group: (n, size)}, gated-dense forward x -> logits)."""
  graph = jaxprune.trace(fn, state, x[:1], branches=units == "branch")
  if method == "ftwt":
    points = ftwt.gate_points(fn, graph, state, x[:1], units=units)
    g = jax.jit(ftwt.gated(fn, graph, points))
    preds = ftwt.open_predictors(points)
    return graph, ftwt.oracle_masks(g, points, state, x, ftwt.check_r(r)), lambda xb: g(state, preds, xb)[0]
  if units != "branch":
    raise ValueError("ManiDP gates residual branches: use --units branch")
  layers = manidp.gate_layers(fn, graph, state, x[:1])
  params = manidp.init_gates(0, layers)
  g = jax.jit(manidp.gated(fn, graph, layers))
  _, res = g(state, params, {l.name: jnp.float32(0) for l in layers}, x)
  thre = manidp.thresholds({k: s.mean(0) for k, s in res.aux.items()}, manidp.check_rate(r))
  n = x.shape[0]  # ungated groups (stem, streams, shortcuts) keep every channel
  masks = {k: jnp.broadcast_to(v, (n,) + v.shape) for k, v in graph.ones().items()}
  for k, s in res.aux.items():  # at least the strongest channel: the branch stays connected
    masks[k] = ((s >= thre[k]) | (s == s.max(-1, keepdims=True))).astype(jnp.float32)
  return graph, masks, lambda xb: g(state, params, thre, xb)[0]


def run(name: str, method: str, r: float, samples: int, reps: int, units: str) -> dict:
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  fn, state = jaxprune.functional(model)
  slim_fn = jax.jit(jaxprune.nnx_bridge.apply_fn(nnx.graphdef(model)))
  dense_fn = jax.jit(fn)
  x = jax.random.normal(jax.random.key(0), (samples, 32, 32, 3))
  graph, masks, gated_fn = masks_and_gated(method, fn, state, x, r, units)
  dense_macs = float(jaxprune.cost(graph).macs)
  for i in range(min(samples, 3)):
    xi, mi = x[i : i + 1], {k: v[i] for k, v in masks.items()}
    small = jaxprune.slim(state, graph, mi)
    t0 = time.perf_counter()
    jax.block_until_ready(slim_fn(small, xi))
    compile_s = time.perf_counter() - t0
    t = interleaved(
      {
        "dense": lambda xi=xi: dense_fn(state, xi),
        "gated": lambda xi=xi: gated_fn(xi),
        "slim": lambda xi=xi, small=small: slim_fn(small, xi),
      },
      reps=reps,
    )
    mac = dense_macs / float(jaxprune.cost(graph, mi).macs)
    print(
      f"{name} {method} {units} r={r} sample {i}: MACs {mac:4.2f}x fewer | batch-1 latency: "
      f"slimmed {t['dense'] / t['slim']:4.2f}x, gated-dense {t['dense'] / t['gated']:4.2f}x "
      f"(dense {1e3 * t['dense']:.2f} ms) | compile for this pattern {compile_s:.1f} s",
      flush=True,
    )
  return dict(
    state=state,
    x=x,
    graph=graph,
    masks=masks,
    gated_fn=gated_fn,
    dense_fn=dense_fn,
    slim_fn=slim_fn,
    dense_macs=dense_macs,
  )


def batched(ctx: dict, batch: int, patterns: int, reps: int) -> None:
  """Batch `batch` grouped by mask pattern vs dense and gated-dense at that batch."""
  rng = np.random.default_rng(0)
  n = ctx["x"].shape[0]
  pick = rng.choice(min(patterns, n), size=batch) if patterns < n else rng.integers(0, n, batch)
  xb = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  mb = {k: v[pick] for k, v in ctx["masks"].items()}
  flat = np.concatenate([np.asarray(v) > 0 for v in mb.values()], axis=1)
  uniq, inv = np.unique(flat, axis=0, return_inverse=True)
  inv = inv.reshape(-1)
  groups = []
  for u in range(len(uniq)):
    idx = np.nonzero(inv == u)[0]
    mu = {k: v[idx[0]] for k, v in mb.items()}
    groups.append((jaxprune.slim(ctx["state"], ctx["graph"], mu), xb[idx]))
  t0 = time.perf_counter()
  for small, xg in groups:  # compiles once per (kept counts, group size)
    jax.block_until_ready(ctx["slim_fn"](small, xg))
  compile_s = time.perf_counter() - t0

  def grouped():
    return [ctx["slim_fn"](small, xg) for small, xg in groups]

  t = interleaved({"dense": lambda: ctx["dense_fn"](ctx["state"], xb), "gated": lambda: ctx["gated_fn"](xb),
                   "grouped": grouped}, reps=reps)  # fmt: skip
  macs = float(jax.vmap(lambda m: jaxprune.cost(ctx["graph"], m).macs)(mb).mean())
  print(
    f"batch {batch}, {len(uniq)} distinct patterns (drawn from {min(patterns, n)}): MACs "
    f"{ctx['dense_macs'] / macs:4.2f}x fewer | grouped by pattern {t['dense'] / t['grouped']:4.2f}x, "
    f"gated-dense {t['dense'] / t['gated']:4.2f}x (dense {1e3 * t['dense']:.1f} ms) | first call "
    f"of the grouped networks {compile_s:.1f} s",
    flush=True,
  )


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="resnet20")
  p.add_argument("--method", default="ftwt", choices=("ftwt", "manidp"))
  p.add_argument("--units", default="branch", choices=("branch", "stream"))
  p.add_argument("--r", type=float, default=0.8, help="FTWT's r, or ManiDP's kept rate")
  p.add_argument("--samples", type=int, default=64, help="images whose masks are computed")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--batch", type=int, default=0, help="also time a batch grouped by mask pattern")
  p.add_argument("--patterns", default="11", help="comma-separated: distinct patterns to draw the batch from")
  a = p.parse_args(argv)
  print(machine())
  ctx = run(a.model, a.method, a.r, a.samples, a.reps, a.units)
  if a.batch:
    for pat in map(int, a.patterns.split(",")):
      batched(ctx, a.batch, pat, max(3, a.reps // 4))


if __name__ == "__main__":
  main()
