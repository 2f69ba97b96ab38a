#!/usr/bin/env bash
# Copies each finished run's results.json under RUN_ROOT into DEST/<run>/results.json: the
# per-run summaries committed next to a table (experiments.summarize reads them).
#   bash results/collect.sh RUN_ROOT DEST
set -euo pipefail
root=$1; dest=$2
for f in "$root"/*/results.json; do
  run=$(basename "$(dirname "$f")")
  mkdir -p "$dest/$run"
  cp "$f" "$dest/$run/results.json"
done
