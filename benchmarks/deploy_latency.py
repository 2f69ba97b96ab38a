"""Deploy latency: dense vs slimmed vs slimmed + folded (+ rounded), beside Torch-Pruning.

For ResNet-56 (CIFAR, 32x32) and ResNet-50 (224x224) prune 30/50/70% of the
MACs by global L1 channel magnitude and time inference at batch 1 and 64:

  dense      the dense network, jitted
  slim       jaxprune.slim, the same model code, jitted
  fold       slim, BatchNorms folded (jaxprune.deploy.fold_module), exported with
             jaxprune.deploy.export_module and run by jaxprune.deploy.load (no
             model code): what a user ships
  round      as fold, selected by jaxprune.deploy.select_rounded (kept channels per
             group a multiple of the widest of deploy.select_multiples("cpu") =
             (16, 8) that meets the budget; of --round_to R alone if given)
  pad        (--pad) as fold, the slimmed network padded with zero channels to
             multiples of R (jaxprune.deploy.pad_channels: same outputs, more MACs;
             R = jaxprune.deploy.round_to("cpu") = 8 unless --round_to)
  floor      every group at R channels (or whole if narrower), folded and exported:
             the narrowest rounded network, the backend's fixed cost
  affine     not a network: the ratio a network with round's MACs would get if
             its time were affine in MACs between floor and dense (see
             affine_ratio); where it is under a goal, no choice of widths at
             that MAC count reaches the goal on this backend unless the time
             bends below that line
  torch      (with the [torch] extra) the same architecture in PyTorch, dense
  tp         Torch-Pruning (global L1 group magnitude, its own dependency graph)
             to the same MAC fraction (its own MAC count), same torch code

"measured / MAC" is measured speedup over dense divided by the MAC speedup
(1.0: the MAC cut is paid out in time). JAX candidates are timed against the
JAX dense network, torch ones against the torch dense network, all in one run:
in each round every candidate of a framework runs once in a shuffled order
(the best round counts), the frameworks in turn.

  python -m benchmarks.deploy_latency                         # ~15 min on 2 loaded cores
  python -m benchmarks.deploy_latency --models resnet56 --batches 1,64 --reps 5
  python -m benchmarks.deploy_latency --sweep                 # round_to sweep (CPU default)
  python -m benchmarks.deploy_latency --conv                  # one conv's speed by width

ResNet-56 in PyTorch is the option-A (zero-padded shortcut) network of
jaxprune.models: Torch-Pruning's dependency graph does not follow the channel
shift of a zero-padded shortcut (it couples stage s channel j with stage s+1
channel j, which the padding puts at j + pad), so its residual-stream
producers (stem, every block's second conv) are passed as ignored_layers and
Torch-Pruning prunes the blocks' inner channels only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

import jaxprune
from jaxprune import deploy, models

IMAGENET = ("resnet18", "resnet34", "resnet50")


def machine() -> str:
  dev = jax.devices()[0]
  return (
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
    f"{jax.device_count()}x {dev.device_kind} ({dev.platform}), jax {jax.__version__}"
  )


def time_groups(groups: dict[str, dict[str, Callable[[], object]]], reps: int, seed: int = 0) -> dict[str, float]:
  """Best seconds per call of every candidate over `reps` rounds.

  Each round runs every group (a framework) in turn: one untimed call of its
  first candidate (the other framework's threads settle), then each candidate
  once in a shuffled order. Interleaving spreads the machine's load changes
  over all candidates; shuffling spreads what one call leaves to the next.
  The best round counts (as in benchmarks/train_step.py): other processes on
  a shared machine only ever add time.
  """
  rng = np.random.default_rng(seed)
  for fns in groups.values():
    for f in fns.values():
      jax.block_until_ready(f())
  times = {k: [] for fns in groups.values() for k in fns}
  for _ in range(reps):
    for fns in groups.values():
      jax.block_until_ready(next(iter(fns.values()))())
      for k in rng.permutation(list(fns)):
        t = time.perf_counter()
        jax.block_until_ready(fns[k]())
        times[k].append(time.perf_counter() - t)
  return {k: float(np.min(v)) for k, v in times.items()}


# ------------------------------------------------------------------------ jax --


def shape_of(name: str) -> tuple[int, int]:
  """(image side, classes) of a model's benchmark input."""
  return (224, 1000) if name in IMAGENET else (32, 10)


class JaxModel:
  """A bundled model, its trace and L1 scores; builds the candidates per budget."""

  def __init__(self, name: str, branches: bool, workdir: str):
    self.name = name
    self.hw, classes = shape_of(name)
    self.model = models.create(name, num_classes=classes, rngs=nnx.Rngs(0))
    self.model.eval()
    self.fn, self.variables = jaxprune.functional(self.model)
    x1 = np.zeros((1, self.hw, self.hw, 3), np.float32)
    self.graph = jaxprune.trace(self.fn, self.variables, x1, branches=branches)
    self.scores = jaxprune.criteria.l1(self.variables, self.graph)
    self.dense_macs = float(jaxprune.cost(self.graph).macs)
    self.fwd = jax.jit(self.fn)
    self.workdir = workdir

  def masks(self, removed: float, round_to: int = 1):
    """Global L1 masks to (1 - removed) of the MACs, or None if round_to cannot meet it."""
    try:
      return jaxprune.select.global_topk(self.scores, self.graph, 1 - removed, unit="macs", round_to=round_to)
    except jaxprune.select.BudgetUnmet:
      return None

  def mac_speedup(self, masks) -> float:
    return self.dense_macs / float(jaxprune.cost(self.graph, masks).macs)

  def deployed(self, variables, tag: str) -> deploy.Deployed:
    """Fold, export (CPU only) and load `variables` (a slimmed tree of this model)."""
    small = jaxprune.module(self.model, variables)
    path = os.path.join(self.workdir, f"{self.name}_{tag}")
    deploy.export_module(
      small, path, input_shape=(self.hw, self.hw, 3), platforms=("cpu",), card={"model": self.name}, overwrite=True
    )
    return deploy.load(path)


def affine_ratio(t_dense: float, t_floor: float, floor_frac: float, frac: float) -> float:
  """Measured / MAC speedup of a network with `frac` of the dense MACs if time is
  affine in MACs through the dense network (1, t_dense) and the floor network
  (floor_frac, t_floor).

  A backend whose time is proportional to MACs (t_floor = floor_frac * t_dense)
  gives 1 at every frac; a fixed cost per layer (t_floor > floor_frac * t_dense)
  caps what pruning can pay out.

    >>> affine_ratio(10.0, 2.0, 0.2, 0.5)   # proportional: MACs paid in full
    1.0
    >>> round(affine_ratio(10.0, 4.0, 0.0, 0.5), 4)  # 4 of 10 ms fixed: 10 / 7 x at 2 x
    0.7143
  """
  t = t_floor + (t_dense - t_floor) * (frac - floor_frac) / (1.0 - floor_frac)
  return t_dense / t * frac


def check_same(net: deploy.Deployed, fwd, variables, x, what: str) -> None:
  """The artifact computes the slimmed network (a benchmark of a wrong network is void)."""
  a, b = np.asarray(net(x)), np.asarray(fwd(variables, x))
  scale = max(1.0, float(np.abs(b).max()))
  if np.abs(a - b).max() > 1e-3 * scale:
    raise AssertionError(f"{what}: deployed output differs from the slimmed network by {np.abs(a - b).max():.3g}")


# ---------------------------------------------------------------------- torch --


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    import torch_pruning  # noqa: F401
  except ImportError:
    return False
  return True


class TorchModel:
  """The same architecture in PyTorch (benchmarks/train_step.py) and Torch-Pruning."""

  def __init__(self, name: str, threads: int, layout: str):
    import torch

    from benchmarks.train_step import torch_models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.name, self.layout = name, layout
    self.hw, _ = shape_of(name)
    self.model = torch_models()[name]().eval()
    self.example = torch.randn(1, 3, self.hw, self.hw)
    self.dense_macs = self.count(self.model)

  def count(self, model) -> float:
    import torch_pruning as tp

    return float(tp.utils.count_ops_and_params(model, self.example)[0])

  def ignored(self, model) -> list:
    if self.name in IMAGENET:
      return [model.fc]
    # option A: the stream's producers stay whole (see the module docstring)
    return [model.fc, model.conv1] + [b.conv2 for b in model.layers]

  def prune(self, ratio: float):
    import torch_pruning as tp

    m = copy.deepcopy(self.model)
    tp.pruner.MetaPruner(
      m,
      self.example,
      importance=tp.importance.MagnitudeImportance(p=1),
      global_pruning=True,
      pruning_ratio=ratio,
      ignored_layers=self.ignored(m),
    ).step()
    return m

  def prune_to(self, removed: float, tol: float = 0.005, steps: int = 10):
    """Torch-Pruning to (1 - removed) of the MACs (its count): regula falsi on its
    channel ratio; the last network at or under the target."""
    target = 1 - removed
    lo, flo, hi, fhi = 0.0, 1.0, 0.95, None
    best = None
    m = self.prune(hi)
    fhi = self.count(m) / self.dense_macs
    if fhi > target:
      raise ValueError(f"Torch-Pruning cannot reach {target:.2f} of the MACs ({fhi:.3f} at 0.95)")
    best = (m, fhi)
    for _ in range(steps):
      r = lo + (hi - lo) * (flo - target) / max(flo - fhi, 1e-9)
      r = min(max(r, lo + 0.05 * (hi - lo)), hi - 0.05 * (hi - lo))
      m = self.prune(r)
      f = self.count(m) / self.dense_macs
      if f <= target:
        hi, fhi, best = r, f, (m, f)
        if target - f <= tol:
          break
      else:
        lo, flo = r, f
    return best

  def runner(self, model, batch: int):
    import torch

    x = torch.randn(batch, 3, self.hw, self.hw)
    if self.layout == "channels_last":
      model = model.to(memory_format=torch.channels_last)
      x = x.contiguous(memory_format=torch.channels_last)

    def run():
      with torch.inference_mode():
        return model(x)

    return run


# ---------------------------------------------------------------------- main --


def run_model(name: str, args, workdir: str) -> list[dict]:
  removed = [float(r) for r in args.removed.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  R = args.round_to or deploy.round_to("cpu")
  t0 = time.time()
  jm = JaxModel(name, args.branches, workdir)
  rng = np.random.default_rng(0)
  xs = {b: rng.normal(size=(b, jm.hw, jm.hw, 3)).astype(np.float32) for b in batches}
  cands: dict[str, tuple[float, Callable]] = {}  # key -> (MAC speedup, runner(batch))
  cands["dense"] = (1.0, lambda b: lambda: jm.fwd(jm.variables, xs[b]))
  for r in removed:
    p = int(round(100 * r))
    masks = jm.masks(r)
    small = jaxprune.slim(jm.variables, jm.graph, masks)
    mac = jm.mac_speedup(masks)
    cands[f"slim{p}"] = (mac, (lambda s: lambda b: lambda: jm.fwd(s, xs[b]))(small))
    net = jm.deployed(small, f"fold{p}")
    check_same(net, jm.fwd, small, xs[batches[0]], f"{name} fold {p}%")
    cands[f"fold{p}"] = (mac, (lambda n: lambda b: lambda: n(xs[b]))(net))
    try:
      mr, mult = deploy.select_rounded(jm.scores, jm.graph, 1 - r, args.round_to or "cpu", unit="macs")
      print(f"# {name} -{p}%: round selected with multiples of {mult}", flush=True)
    except jaxprune.select.BudgetUnmet:
      mr = None
    if mr is not None:
      sr = jaxprune.slim(jm.variables, jm.graph, mr)
      net = jm.deployed(sr, f"round{p}")
      cands[f"round{p}"] = (jm.mac_speedup(mr), (lambda n: lambda b: lambda: n(xs[b]))(net))
    if args.pad:
      padded, mu = deploy.pad_channels(jm.graph, masks, small, R)
      net = jm.deployed(padded, f"pad{p}")
      check_same(net, jm.fwd, small, xs[batches[0]], f"{name} pad {p}%")
      cands[f"pad{p}"] = (jm.mac_speedup(mu), (lambda n: lambda b: lambda: n(xs[b]))(net))
  floor = jaxprune.select.local(jm.scores, jm.graph, keep=1e-9, round_to=R)
  net = jm.deployed(jaxprune.slim(jm.variables, jm.graph, floor), "floor")
  cands["floor"] = (jm.mac_speedup(floor), (lambda n: lambda b: lambda: n(xs[b]))(net))
  tm = None
  if args.torch and torch_available():
    tm = TorchModel(name, args.threads, args.torch_layout)
    cands["torch"] = (1.0, lambda b: tm.runner(tm.model, b))
    for r in removed:
      m, f = tm.prune_to(r)
      cands[f"tp{int(round(100 * r))}"] = (1.0 / f, (lambda mm: lambda b: tm.runner(mm, b))(m))
  print(f"# {name}: prepared {len(cands)} networks in {time.time() - t0:.0f} s", flush=True)
  rows = []
  for b in batches:
    groups = {"jax": {k: run(b) for k, (_, run) in cands.items() if not k.startswith(("torch", "tp"))}}
    if tm is not None:
      groups["torch"] = {k: run(b) for k, (_, run) in cands.items() if k.startswith(("torch", "tp"))}
    reps = args.reps * (5 if b == 1 else 1)
    t = time_groups(groups, reps)
    for k, sec in t.items():
      base = "torch" if k.startswith(("torch", "tp")) else "dense"
      mac = cands[k][0]
      sp = t[base] / sec
      rows.append(
        {
          "model": name,
          "batch": b,
          "candidate": k,
          "ms": 1e3 * sec,
          "mac_speedup": mac,
          "speedup": sp,
          "ratio": sp / mac,
        }
      )
    add_affine(rows, name, b)
    print(table(rows, name, b), flush=True)
  return rows


def add_affine(rows: list[dict], name: str, batch: int) -> None:
  """Append the affine model's ratio at each rounded budget (see affine_ratio)."""
  by = {r["candidate"]: r for r in rows if r["model"] == name and r["batch"] == batch}
  dense, floor = by["dense"], by["floor"]
  for k, r in list(by.items()):
    if k.startswith("round"):
      ratio = affine_ratio(dense["ms"], floor["ms"], 1 / floor["mac_speedup"], 1 / r["mac_speedup"])
      rows.append(
        dict(r, candidate="affine" + k[len("round") :], ms=None, ratio=ratio, speedup=ratio * r["mac_speedup"])
      )


def table(rows: list[dict], name: str, batch: int) -> str:
  """One markdown table per (model, batch): budgets as rows, candidates as columns."""
  rs = [r for r in rows if r["model"] == name and r["batch"] == batch]
  by = {r["candidate"]: r for r in rs}
  kinds = [k for k in ("slim", "fold", "round", "affine", "pad", "tp") if any(c.startswith(k) for c in by)]
  budgets = sorted({int(c[len(k) :]) for c in by for k in kinds if c.startswith(k) and c[len(k) :].isdigit()})
  head = f"| {name}, batch {batch} | " + " | ".join(f"{k}: MAC x / measured x (ratio)" for k in kinds) + " |"
  lines = [head, "|---" * (len(kinds) + 1) + "|"]
  for p in budgets:
    cells = []
    for k in kinds:
      r = by.get(f"{k}{p}")
      cells.append("–" if r is None else f"{r['mac_speedup']:.2f} / {r['speedup']:.2f} ({r['ratio']:.2f})")
    lines.append(f"| -{p}% MACs | " + " | ".join(cells) + " |")
  dense = f"dense {by['dense']['ms']:.1f} ms"
  if "floor" in by:
    f = by["floor"]
    dense += f", floor {f['ms']:.1f} ms at {1 / f['mac_speedup']:.3f} of the MACs"
  if "torch" in by:
    dense += f", torch dense {by['torch']['ms']:.1f} ms"
  return "\n".join(lines) + f"\n\n({dense})\n"


def sweep(args, workdir: str) -> None:
  """Measured / MAC speedup of slimmed networks at 50% fewer MACs for several
  round_to (selection) and pad multiples: the data behind deploy.ROUND_TO["cpu"]."""
  multiples = [int(m) for m in args.sweep_multiples.split(",")]
  for name in args.models.split(","):
    jm = JaxModel(name, args.branches, workdir)
    r = float(args.sweep_removed)
    masks = jm.masks(r)
    small = jaxprune.slim(jm.variables, jm.graph, masks)
    for b in [int(b) for b in args.batches.split(",")]:
      x = np.random.default_rng(0).normal(size=(b, jm.hw, jm.hw, 3)).astype(np.float32)
      fns, mac = {"dense": lambda: jm.fwd(jm.variables, x)}, {}
      for m in multiples:
        mr = jm.masks(r, m) if m > 1 else masks
        if mr is not None:
          s = jaxprune.slim(jm.variables, jm.graph, mr)
          fns[f"round_to={m}"] = (lambda v: lambda: jm.fwd(v, x))(s)
          mac[f"round_to={m}"] = jm.mac_speedup(mr)
        if m > 1:
          padded, mu = deploy.pad_channels(jm.graph, masks, small, m)
          fns[f"pad={m}"] = (lambda v: lambda: jm.fwd(v, x))(padded)
          mac[f"pad={m}"] = jm.mac_speedup(mu)
      t = time_groups({"jax": fns}, args.reps * (5 if b == 1 else 1))
      print(f"\n| {name}, -{r:.0%} MACs, batch {b} | MAC speedup | measured | measured / MAC |")
      print("|---|---|---|---|")
      for k in mac:
        sp = t["dense"] / t[k]
        print(f"| {k} | {mac[k]:.2f} | {sp:.2f} | {sp / mac[k]:.2f} |")
      print(f"\n(dense {1e3 * t['dense']:.1f} ms)", flush=True)


def conv_widths(args) -> None:
  """GMAC/s of one jitted 3x3 conv (+ bias, ReLU) by channel width (in = out) at
  the benchmark models' first-stage sizes: how much a narrow layer costs per MAC."""
  import jax.numpy as jnp

  widths = [int(c) for c in args.conv_widths.split(",")]
  conv = jax.jit(  # one jit: it compiles once per shape
    lambda x, w: jax.nn.relu(
      jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + 1.0
    )
  )
  for hw in sorted({shape_of(n)[0] for n in args.models.split(",")}):
    for b in [int(b) for b in args.batches.split(",")]:
      side = hw // 4 if hw == 224 else hw  # ResNet-50's first stage is 56x56
      fns, macs = {}, {}
      for c in widths:
        rng = np.random.default_rng(c)
        x = jnp.asarray(rng.normal(size=(b, side, side, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, c, c)), jnp.float32)
        fns[f"c={c}"] = (lambda x, w: lambda: conv(x, w))(x, w)
        macs[f"c={c}"] = b * side * side * 9 * c * c
      t = time_groups({"jax": fns}, args.reps * (5 if b == 1 else 1))
      print(f"\n| 3x3 conv, {side}x{side}, batch {b} | ms | GMAC/s |")
      print("|---|---|---|")
      for k in fns:
        print(f"| {k} | {1e3 * t[k]:.3f} | {macs[k] / t[k] / 1e9:.1f} |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="resnet56,resnet50")
  p.add_argument("--removed", default="0.3,0.5,0.7", help="fractions of the MACs removed")
  p.add_argument("--batches", default="1,64")
  p.add_argument("--reps", type=int, default=3, help="timed rounds (x5 at batch 1)")
  p.add_argument(
    "--round_to",
    type=int,
    default=0,
    help="channel multiple of 'round', 'pad' and 'floor' (0: deploy.select_multiples / round_to('cpu'))",
  )
  p.add_argument("--pad", action="store_true", help="also time the zero-padded network")
  p.add_argument("--branches", action="store_true", help="prune residual-branch units (trace(..., branches=True))")
  p.add_argument("--no-torch", dest="torch", action="store_false", help="skip PyTorch / Torch-Pruning")
  p.add_argument("--torch_layout", default="nchw", choices=("nchw", "channels_last"))
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--sweep", action="store_true", help="round_to / pad sweep at one budget")
  p.add_argument("--sweep_multiples", default="1,2,4,8,16")
  p.add_argument("--sweep_removed", default="0.5")
  p.add_argument("--conv", action="store_true", help="one 3x3 conv's GMAC/s by channel width")
  p.add_argument("--conv_widths", default="8,16,24,32,48,64,128")
  p.add_argument("--json", default="", help="write the rows to this file")
  args = p.parse_args(argv)
  print("machine:", machine(), "| load average", " ".join(f"{l:.1f}" for l in os.getloadavg()))
  if args.torch and not torch_available():
    print("torch / torch_pruning not importable: JAX only (pip install -e '.[torch]')", file=sys.stderr)
  elif args.torch:
    import torch
    import torch_pruning

    print(
      f"torch {torch.__version__}, torch_pruning {torch_pruning.__version__}, "
      f"{args.threads} threads, {args.torch_layout}"
    )
  workdir = tempfile.mkdtemp(prefix="deploy_latency_")
  try:
    if args.conv:
      conv_widths(args)
      return
    if args.sweep:
      sweep(args, workdir)
      return
    rows = []
    for name in args.models.split(","):
      rows += run_model(name, args, workdir)
      shutil.rmtree(workdir, ignore_errors=True)
      os.makedirs(workdir, exist_ok=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
    print("load average at the end", " ".join(f"{l:.1f}" for l in os.getloadavg()))


if __name__ == "__main__":
  main()
