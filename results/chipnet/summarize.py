"""Table and plot of ChipNet vs magnitude from the runs of run_experiment.sh.

  python results/chipnet/summarize.py runs/chipnet_cmp   # writes results/chipnet/{summary.json,table.md,accuracy_vs_budget.png}
  python results/chipnet/summarize.py --transfer runs/chipnet_transfer   # run_transfer.sh -> transfer.md
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def load(root: str) -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
    r = json.load(open(path))
    m = r["config"]["method"]
    base = {"budget_type": m["budget_type"], "budget": m["budget"], "seed": r["config"]["seed"],
            "dense_accuracy": r["dense_accuracy"], "run": os.path.basename(os.path.dirname(path))}
    rows.append({**base, "method": "chipnet", "accuracy": r["test_accuracy"],
                 "before_finetune": r["pruned_accuracy_before_finetune"],
                 "achieved": r["achieved"], "macs": r["macs"], "params": r["params"],
                 "macs_ratio": r["ratios"]["macs"], "params_ratio": r["ratios"]["params"],
                 "speedup": r["speedup"]["speedup"],
                 "soft_accuracy_last": _last_soft(os.path.dirname(path))})
    if "magnitude" in r:
      g = r["magnitude"]
      rows.append({**base, "method": "magnitude", "accuracy": g["test_accuracy"],
                   "before_finetune": g["pruned_accuracy_before_finetune"],
                   "achieved": g["achieved"], "macs": g["macs"], "params": g["params"],
                   "macs_ratio": g["ratios"]["macs"], "params_ratio": g["ratios"]["params"],
                   "speedup": g["speedup"]["speedup"], "soft_accuracy_last": None})
  return rows


def _last_soft(workdir: str):
  p = os.path.join(workdir, "soft_prune", "selection.jsonl")
  if not os.path.exists(p):
    return None
  recs = [json.loads(l) for l in open(p)]
  return recs[-1].get("soft_accuracy") if recs else None


def aggregate(rows):
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["budget_type"], r["budget"], r["method"])].append(r)
  out = []
  for (bt, b, meth), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
    acc = np.array([r["accuracy"] for r in rs])
    mean = lambda k: float(np.mean([r[k] for r in rs]))
    out.append({"budget_type": bt, "budget": b, "method": meth, "seeds": len(rs),
                "accuracy_mean": float(acc.mean()),
                "accuracy_spread": float(acc.max() - acc.min()) / 2 if len(rs) > 1 else None,
                "before_finetune": mean("before_finetune"), "achieved": mean("achieved"),
                "macs": mean("macs"), "params": mean("params"), "macs_ratio": mean("macs_ratio"),
                "params_ratio": mean("params_ratio"), "speedup": mean("speedup"),
                "dense_accuracy": mean("dense_accuracy")})
  return out


def table(agg) -> str:
  lines = ["| budget | method | seeds | test acc. (± half-range) | before finetune | achieved | MACs (ratio) | params (ratio) | speedup |",
           "|---|---|---|---|---|---|---|---|---|"]
  for a in agg:
    spread = f" ± {100 * a['accuracy_spread']:.1f}" if a["accuracy_spread"] is not None else ""
    lines.append(
        f"| {a['budget_type']} {a['budget']:g} | {a['method']} | {a['seeds']} | "
        f"{100 * a['accuracy_mean']:.1f}{spread} | {100 * a['before_finetune']:.1f} | "
        f"{a['achieved']:.4f} | {a['macs'] / 1e6:.2f}M ({a['macs_ratio']:.3f}) | "
        f"{a['params'] / 1e3:.1f}k ({a['params_ratio']:.3f}) | {a['speedup']:.2f}x |")
  return "\n".join(lines)


def plot(agg, path):
  """Left: accuracy vs the volume budget. Right: the same runs (and the MAC-budget ones)
  against the MACs they actually kept, the equal-compute view."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for meth, color in (("chipnet", "tab:blue"), ("magnitude", "tab:orange")):
    for ax, key in ((left, "budget"), (right, "macs_ratio")):
      pts = sorted((a for a in agg if a["method"] == meth and a["budget_type"] == "volume"),
                   key=lambda a: a[key])
      if pts:
        ax.errorbar([a[key] for a in pts], [100 * a["accuracy_mean"] for a in pts],
                    yerr=[100 * (a["accuracy_spread"] or 0) for a in pts], marker="o",
                    capsize=3, color=color, label=f"{meth} (volume budgets)")
    for a in agg:
      if a["method"] == meth and a["budget_type"] == "flops":
        right.errorbar([a["macs_ratio"]], [100 * a["accuracy_mean"]],
                       yerr=[100 * (a["accuracy_spread"] or 0)], marker="s", capsize=3,
                       color=color, mfc="none", ls="none",
                       label=f"{meth} (MACs budget {a['budget']:g})")
  dense = agg[0]["dense_accuracy"] if agg else None
  for ax in (left, right):
    if dense:
      ax.axhline(100 * dense, ls="--", c="gray", label="dense")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
  left.set_xlabel("activation-volume budget (fraction kept)")
  right.set_xlabel("MACs kept after slimming (fraction of dense)")
  left.set_ylabel("test accuracy after finetuning (%)")
  fig.suptitle("ResNet-20, CIFAR-10 subset (5k train / 1k test)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(root: str):
  rows = load(root)
  agg = aggregate(rows)
  json.dump({"runs": rows, "aggregate": agg}, open(os.path.join(HERE, "summary.json"), "w"),
            indent=1)
  md = table(agg)
  open(os.path.join(HERE, "table.md"), "w").write(md + "\n")
  plot(agg, os.path.join(HERE, "accuracy_vs_budget.png"))
  print(md)


def transfer(root: str):
  """The 2x2 of run_transfer.sh: masks learned on A, network trained from scratch on B."""
  names = {"c10": "CIFAR-10 subset", "mnist": "MNIST subset (32x32x3)"}
  own = {"mnist": json.load(open(os.path.join(root, "chipnet_mnist_f50", "results.json")))}
  lines = ["| masks learned on | trained and tested on | test acc. | dense acc. (same data) | "
           "MACs kept | params kept |", "|---|---|---|---|---|---|"]
  for src in ("c10", "mnist"):
    for dst in ("c10", "mnist"):
      r = json.load(open(os.path.join(root, f"{src}_to_{dst}", "results.json")))
      lines.append(f"| {names[src]} | {names[dst]} | {100 * r['test_accuracy']:.1f} | "
                   f"{100 * r['dense_accuracy']:.1f} | {r['ratios']['macs']:.3f} | "
                   f"{r['ratios']['params']:.3f} |")
  m = own["mnist"]
  md = "\n".join(lines) + (
      f"\n\n(For reference, ChipNet on MNIST with its own soft pruning and a 4-epoch finetune "
      f"of the dense network: {100 * m['test_accuracy']:.1f}%.)")
  open(os.path.join(HERE, "transfer.md"), "w").write(md + "\n")
  print(md)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--transfer":
    transfer(sys.argv[2])
  else:
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/chipnet_cmp")
