"""Summarize magnitude-baseline runs into a markdown table and a plot.

  python -m experiments.summarize_magnitude runs/magnitude_table
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys

import numpy as np


OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "magnitude")


def main(root: str) -> None:
  rows = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
    r = json.load(open(path))
    m = r["config"]["method"]
    rows[(m["unit"], m["budget"])].append(r)
  lines = ["| budget (MACs kept) | seeds | dense acc | pruned acc, no finetune | finetuned acc | MACs kept | params kept | MACs (M) | params (K) | measured speedup (batch 128) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  plot = []
  for (unit, budget), rs in sorted(rows.items(), key=lambda kv: -kv[0][1]):
    def ms(key, f=lambda r, k: r[k]):
      v = np.array([f(r, key) for r in rs], float)
      return f"{100 * v.mean():.1f} ± {100 * v.std():.1f}"
    acc = np.array([r["test_accuracy"] for r in rs])
    plot.append((budget, acc.mean(), acc.std()))
    lines.append(
        f"| {budget} {unit} | {len(rs)} | {ms('dense_accuracy')} | {ms('pruned_accuracy_before_finetune')} "
        f"| {ms('test_accuracy')} | {np.mean([r['ratios']['macs'] for r in rs]):.3f} "
        f"| {np.mean([r['ratios']['params'] for r in rs]):.3f} | {np.mean([r['macs'] for r in rs]) / 1e6:.1f} "
        f"| {np.mean([r['params'] for r in rs]) / 1e3:.0f} | {np.mean([r['speedup']['speedup'] for r in rs]):.2f}x |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(OUT_DIR, "table.md"), "w") as f:
    f.write(table + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  b, a, s = map(np.array, zip(*sorted(plot)))
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.errorbar(b, 100 * a, yerr=100 * s, marker="o", capsize=3, label="global L1 + finetune")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("fraction of MACs kept")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("ResNet-20, CIFAR-10 subset")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(OUT_DIR, "accuracy_vs_budget.png"), dpi=120)


if __name__ == "__main__":
  main(sys.argv[1])
