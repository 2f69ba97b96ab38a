"""The deploy latency benchmark: its time model by hand, and a tiny run of it.

No time is asserted (speed is the benchmarks' business, not the tests'); the
tiny run checks that every candidate is built, exported and checked against
the slimmed network, and that the rows carry what the README's tables read.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import deploy_latency


def test_affine_ratio_by_hand():
  # 10 ms dense, 4 ms floor at 10% of the MACs; at half the MACs the line gives
  # 4 + 6 * (0.5 - 0.1) / 0.9 = 6.667 ms: 1.5x measured against 2x in MACs.
  assert deploy_latency.affine_ratio(10.0, 4.0, 0.1, 0.5) == pytest.approx(0.75)
  assert deploy_latency.affine_ratio(10.0, 4.0, 0.1, 1.0) == pytest.approx(1.0)
  assert deploy_latency.affine_ratio(10.0, 4.0, 0.1, 0.1) == pytest.approx(0.1 * 10.0 / 4.0)


@settings(max_examples=50, deadline=None)
@given(
  t_dense=st.floats(0.1, 100.0),
  floor_frac=st.floats(0.0, 0.5),
  excess=st.floats(0.0, 1.0),
  frac=st.floats(0.5, 1.0),
)
def test_affine_ratio_is_one_when_time_follows_macs_and_below_with_a_fixed_cost(t_dense, floor_frac, excess, frac):
  proportional = floor_frac * t_dense
  assert deploy_latency.affine_ratio(t_dense, proportional, floor_frac, frac) == pytest.approx(1.0)
  # a floor slower than its MACs say (a fixed cost) pays out less than the MACs
  t_floor = proportional + excess * (t_dense - proportional)
  assert deploy_latency.affine_ratio(t_dense, t_floor, floor_frac, frac) <= 1.0 + 1e-9


def test_tiny_run_builds_and_checks_every_candidate(tmp_path, capsys):
  out = tmp_path / "rows.json"
  deploy_latency.main(
    ["--models", "resnet20", "--removed", "0.5", "--batches", "2", "--reps", "1", "--no-torch", "--json", str(out)]
  )
  rows = json.loads(out.read_text())
  by = {r["candidate"]: r for r in rows}
  assert set(by) == {"dense", "slim50", "fold50", "round50", "floor", "affine50"}
  assert all(r["model"] == "resnet20" and r["batch"] == 2 for r in rows)
  # half the MACs removed (within a channel's worth), the floor far narrower
  assert 1.9 < by["fold50"]["mac_speedup"] < 2.2
  assert by["floor"]["mac_speedup"] > 2 * by["round50"]["mac_speedup"]
  d, f, r = by["dense"]["ms"], by["floor"]["ms"], by["round50"]
  q, qf = 1 / r["mac_speedup"], 1 / by["floor"]["mac_speedup"]
  line = f + (d - f) * (q - qf) / (1 - qf)
  assert by["affine50"]["ratio"] == pytest.approx(d / line * q)
  assert by["affine50"]["ms"] is None  # a model, not a timed network
  printed = capsys.readouterr().out
  assert "| -50% MACs |" in printed and "floor" in printed


def test_conv_widths_prints_one_row_per_width(capsys):
  deploy_latency.main(["--conv", "--models", "resnet20", "--conv_widths", "4,8", "--batches", "1", "--reps", "1"])
  printed = capsys.readouterr().out
  assert "| 3x3 conv, 32x32, batch 1 | ms | GMAC/s |" in printed
  rows = [line for line in printed.splitlines() if line.startswith("| c=")]
  assert [r.split(" | ")[0] for r in rows] == ["| c=4", "| c=8"]
  assert all(float(r.split(" | ")[2].rstrip(" |")) > 0 for r in rows)
