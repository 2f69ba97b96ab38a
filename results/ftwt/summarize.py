"""Table and plots of the FTWT sweep (run_sweep.sh), next to ChipNet/magnitude at equal MACs.

  python results/ftwt/summarize.py --runs runs/ftwt_sweep
  # writes results/ftwt/{summary.json, table.md, macs_histogram.png, accuracy_vs_macs.png};
  # static points: results/chipnet/summary.json and run_static.sh's runs (--static_runs).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def load(root: str) -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
    wd = os.path.dirname(path)
    r = json.load(open(path))
    d = r["dynamic"]
    per = np.load(os.path.join(wd, "per_sample.npz"))
    rows.append({
        "run": os.path.basename(wd), "mode": r["mode"], "r": r["r"], "pool": r["pool"],
        "seed": r["config"]["seed"], "epochs": r["config"]["method"]["epochs"],
        "accuracy": d["accuracy"], "macs_mean": d["macs_mean"], "macs_std": d["macs_std"],
        "macs_p05": float(np.percentile(per["macs"], 5)),
        "macs_p95": float(np.percentile(per["macs"], 95)),
        "dense_macs": d["dense_macs"], "reduction": 1 - d["macs_ratio"],
        "reduction_with_predictors": 1 - d["macs_ratio_with_predictors"],
        "reduction_legacy": d["reduction_legacy"], "gates_open": d["gates_open_mean"],
        "per_sample_macs": per["macs"].tolist(),
    })
  return rows


def aggregate(rows: list[dict]) -> list[dict]:
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["mode"], r["r"])].append(r)
  out = []
  for (mode, r), rs in sorted(groups.items()):
    acc = np.array([x["accuracy"] for x in rs])
    mean = lambda k: float(np.mean([x[k] for x in rs]))
    out.append({"mode": mode, "r": r, "seeds": len(rs), "epochs": rs[0]["epochs"],
                "accuracy_mean": float(acc.mean()),
                "accuracy_spread": float(acc.max() - acc.min()) / 2 if len(rs) > 1 else None,
                **{k: mean(k) for k in ("macs_mean", "macs_std", "macs_p05", "macs_p95",
                                        "dense_macs", "reduction", "reduction_with_predictors",
                                        "reduction_legacy", "gates_open")}})
  return out


def static_points(path: str, runs: str) -> list[dict]:
  """Static pruning of the same dense network: ChipNet / magnitude rows of
  results/chipnet/summary.json, and the magnitude runs of run_static.sh under `runs`."""
  out = json.load(open(path))["aggregate"] if os.path.exists(path) else []
  groups = collections.defaultdict(list)
  for p in sorted(glob.glob(os.path.join(runs, "*", "results.json"))):
    r = json.load(open(p))
    groups[r["config"]["method"]["budget"]].append(r)
  for b, rs in sorted(groups.items()):
    acc = np.array([r["test_accuracy"] for r in rs])
    out.append({"method": "magnitude", "budget_type": "flops", "budget": b, "seeds": len(rs),
                "accuracy_mean": float(acc.mean()),
                "accuracy_spread": float(acc.max() - acc.min()) / 2 if len(rs) > 1 else None,
                "macs": float(np.mean([r["macs"] for r in rs])),
                "macs_ratio": float(np.mean([r["ratios"]["macs"] for r in rs])),
                "dense_accuracy": rs[0]["dense_accuracy"]})
  return out


def table(agg: list[dict], static: list[dict], dense_accuracy: float | None) -> str:
  lines = ["| mode | r | seeds | test acc. | mean MACs / sample (5–95%) | MAC reduction: exact | "
           "with predictors | FTWT's legacy count | gates open |",
           "|---|---|---|---|---|---|---|---|---|"]
  for a in agg:
    spread = f" ± {100 * a['accuracy_spread']:.1f}" if a["accuracy_spread"] is not None else ""
    lines.append(
        f"| {a['mode']} | {a['r']:g} | {a['seeds']} | {100 * a['accuracy_mean']:.1f}{spread} | "
        f"{a['macs_mean'] / 1e6:.2f}M ({a['macs_p05'] / 1e6:.2f}–{a['macs_p95'] / 1e6:.2f}) | "
        f"{100 * a['reduction']:.2f}% | {100 * a['reduction_with_predictors']:.2f}% | "
        f"{100 * a['reduction_legacy']:.2f}% | {100 * a['gates_open']:.1f}% |")
  if dense_accuracy is not None:
    lines.append(f"| dense | – | 1 | {100 * dense_accuracy:.1f} | "
                 f"{agg[0]['dense_macs'] / 1e6:.2f}M | 0 | 0 | 0 | 100% |")
  if static:
    lines += ["", "Static pruning of the same dense network (results/chipnet and run_static.sh), for equal-MACs "
              "comparison (`flops` = a MAC budget):", "",
              "| method (budget) | seeds | test acc. | MACs | MAC reduction |", "|---|---|---|---|---|"]
    for s in sorted(static, key=lambda s: -s["macs_ratio"]):
      if s["macs_ratio"] < 0.2:
        continue  # far below any FTWT point
      spread = f" ± {100 * s['accuracy_spread']:.1f}" if s["accuracy_spread"] is not None else ""
      lines.append(f"| {s['method']} ({s['budget_type']} {s['budget']:g}) | {s['seeds']} | "
                   f"{100 * s['accuracy_mean']:.1f}{spread} | {s['macs'] / 1e6:.2f}M | "
                   f"{100 * (1 - s['macs_ratio']):.1f}% |")
  return "\n".join(lines)


def plots(rows: list[dict], agg: list[dict], static: list[dict], dense_accuracy, out_dir: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  modes = sorted({r["mode"] for r in rows})
  fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.6), squeeze=False,
                           sharey=True)
  # The per-image spread is narrow next to the gaps between r: bins over the data's range.
  lo = min(min(r["per_sample_macs"]) / r["dense_macs"] for r in rows)
  span = (max(0.0, lo - 0.02), 1.0)
  for ax, mode in zip(axes[0], modes):
    for r in sorted((r for r in rows if r["mode"] == mode and r["seed"] == 0),
                    key=lambda r: r["r"]):
      ratio = np.asarray(r["per_sample_macs"]) / r["dense_macs"]
      ax.hist(ratio, bins=200, range=span, alpha=0.7,
              label=f"r={r['r']:g}: {100 * ratio.mean():.1f}% ± {100 * ratio.std():.2f}%")
    ax.set_title(f"FTWT {mode}, seed 0: per-image MACs (1,017 test images)")
    ax.set_xlabel("MACs of the image / dense MACs")
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("test images")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "macs_histogram.png"), dpi=110)

  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, marker in (("decoupled", "o"), ("joint", "^")):
    pts = [a for a in agg if a["mode"] == mode]
    if pts:
      ax.errorbar([a["macs_mean"] / a["dense_macs"] for a in pts],
                  [100 * a["accuracy_mean"] for a in pts],
                  yerr=[100 * (a["accuracy_spread"] or 0) for a in pts], marker=marker,
                  ls="none", capsize=3, label=f"FTWT {mode} (mean per image)")
      for a in pts:
        ax.annotate(f"r={a['r']:g}", (a["macs_mean"] / a["dense_macs"], 100 * a["accuracy_mean"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
  for meth, color in (("chipnet", "tab:green"), ("magnitude", "tab:red")):
    pts = sorted((s for s in static if s["method"] == meth and s["macs_ratio"] >= 0.2),
                 key=lambda s: s["macs_ratio"])
    if pts:
      ax.errorbar([s["macs_ratio"] for s in pts], [100 * s["accuracy_mean"] for s in pts],
                  yerr=[100 * (s["accuracy_spread"] or 0) for s in pts], marker="s", mfc="none",
                  ls=":", capsize=3, color=color, label=f"{meth} (static, finetuned)")
  if dense_accuracy is not None:
    ax.axhline(100 * dense_accuracy, ls="--", c="gray", label="dense")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("MACs kept (fraction of dense)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("ResNet-20, CIFAR-10 subset: dynamic vs static")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "accuracy_vs_macs.png"), dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="runs/ftwt_sweep")
  p.add_argument("--static", default=os.path.join(HERE, "..", "chipnet", "summary.json"))
  p.add_argument("--static_runs", default="runs/ftwt_static", help="run_static.sh's runs")
  p.add_argument("--out", default=HERE)
  a = p.parse_args()
  rows = load(a.runs)
  if not rows:
    raise SystemExit(f"no finished FTWT runs (results.json + per_sample.npz) under {a.runs}")
  agg = aggregate(rows)
  static = static_points(a.static, a.static_runs)
  dense = static[0]["dense_accuracy"] if static else None
  md = table(agg, static, dense)
  json.dump({"runs": [{k: v for k, v in r.items() if k != "per_sample_macs"} for r in rows],
             "aggregate": agg}, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
  open(os.path.join(a.out, "table.md"), "w").write(md + "\n")
  plots(rows, agg, static, dense, a.out)
  print(md)


if __name__ == "__main__":
  main()
