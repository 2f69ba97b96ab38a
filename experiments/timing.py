"""Timing helpers for benchmarks and speedup reports: interleaved medians on a noisy machine."""

from __future__ import annotations

import platform
import time
from typing import Callable

import jax
import numpy as np


def machine() -> str:
  dev = jax.devices()[0]
  return f"{platform.processor() or platform.machine()}, {jax.device_count()}x {dev.device_kind} ({dev.platform}), jax {jax.__version__}"


def interleaved(fns: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1) -> dict[str, float]:
  """Median seconds per call of each fn, timed in alternation.

  Alternating the candidates spreads the machine's load changes over all of
  them, so their ratio is meaningful even when absolute times drift.
  """
  for f in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}
