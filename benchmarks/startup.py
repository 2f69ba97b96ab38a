"""Start-up time: the README's main job to its first training step, and the test suite.

  python -m benchmarks.startup                    # this tree: cache off / cold / warm
  python -m benchmarks.startup --before main      # ... and the code of git revision `main`
  python -m benchmarks.startup --before main --tests   # ... and both test suites (long)

Each figure is the wall time of a fresh process (``python -m experiments.main``
with ``--config.train.stop_after_steps=1``: imports, data, model creation,
compiling the train step, one step), measured ``--reps`` times, the variants
interleaved so that the machine's load falls on all of them alike:

  before         the code of ``--before`` (extracted with ``git archive``)
  cache off      this tree, ``JAXPRUNE_CACHE_DIR=off``: every program compiled
  cache cold     this tree, an empty cache folder (compiles and writes it)
  cache warm     this tree, the cache the cold run filled (the usual case)

``--tests`` also times ``python -m pytest -q`` in both trees (and the quick loop,
``-m "not slow"``, here), each with its own fresh cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_JOB = ['-m', 'experiments.main', '--config', 'experiments/configs/magnitude_cifar10_subset_resnet20.py']
FIRST_STEP = ['--config.train.stop_after_steps=1', '--config.progress=False']


def checkout(rev: str, into: str) -> str:
  """The files of git revision ``rev`` under ``into``."""
  os.makedirs(into)
  archive = subprocess.run(['git', 'archive', rev], cwd=REPO, capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', into], input=archive, check=True)
  return into


def run(args: list[str], cwd: str, env: dict[str, str], timeout: float = 3600, check: bool = True) -> tuple[float, str]:
  """Wall seconds of ``python args`` in ``cwd`` and the last line of its output; fails
  loudly if the command fails (unless ``check`` is False)."""
  t0 = time.perf_counter()
  p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise RuntimeError(f'{" ".join(args)} in {cwd} failed:\n{p.stderr[-3000:]}')
  return time.perf_counter() - t0, (p.stdout.strip().splitlines() or [''])[-1]


def environment(tree: str, cache: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_COMPILATION_CACHE', 'JAX_PERSISTENT_CACHE'))}
  env.update(JAX_PLATFORMS='cpu', JAXPRUNE_CACHE_DIR=cache, PYTHONPATH=tree)  # the tree's own code first
  return env


def first_step(trees: dict[str, str], tmp: str, reps: int) -> None:
  warm = os.path.join(tmp, 'xla')
  variants = {'cache off': ('now', 'off'), 'cache cold': ('now', None), 'cache warm': ('now', warm)}
  if 'before' in trees:
    variants = {'before': ('before', 'off'), **variants}
  run([*MAIN_JOB, f'--workdir={tmp}/fill', *FIRST_STEP], REPO, environment(REPO, warm))  # fills the warm cache
  times = {k: [] for k in variants}
  for rep in range(reps):
    for name, (tree, cache) in variants.items():
      cache = cache or os.path.join(tmp, f'cold{rep}')  # a new empty folder each time
      args = [*MAIN_JOB, f'--workdir={tmp}/{name.replace(" ", "_")}_{rep}', *FIRST_STEP]
      times[name].append(run(args, trees[tree], environment(trees[tree], cache))[0])
  print(f'Time to the first training step of the README main job (median of {reps}, seconds):')
  print('| variant | seconds |\n|---|---|')
  for name, t in times.items():
    print(f'| {name} | {np.median(t):.1f} |', flush=True)


def test_suites(trees: dict[str, str], tmp: str, which: list[str]) -> None:
  """The whole suite in each tree, then the quick loop here; each with a fresh cache."""
  suites = {'test suite, now': ('now', []), 'quick loop (-m "not slow"), now': ('now', ['-m', 'not slow'])}
  if 'before' in trees:
    suites = {'test suite, before': ('before', []), **suites}
  suites = {k: v for k, v in suites.items() if any(w in k for w in which)}
  print('\n| test run | minutes | pytest says |\n|---|---|---|')
  for name, (tree, extra) in suites.items():
    env = environment(trees[tree], os.path.join(tmp, f'tests_{len(extra)}_{tree}'))
    args = ['-m', 'pytest', '-q', '-p', 'no:cacheprovider', *extra]
    t, last = run(args, trees[tree], env, timeout=7200, check=False)
    print(f'| {name} | {t / 60:.1f} | {last.strip("= ")} |', flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--before', help='a git revision to compare with (e.g. main)')
  p.add_argument('--reps', type=int, default=2, help='first-step runs per variant (0: none)')
  p.add_argument('--tests', action='store_true', help='also time the test suites (long)')
  p.add_argument('--suites', default='before,now,quick', help='which of the test runs (with --tests)')
  a = p.parse_args()
  tmp = tempfile.mkdtemp(prefix='startup_')
  try:
    trees = {'now': REPO}
    if a.before:
      trees['before'] = checkout(a.before, os.path.join(tmp, 'before'))
    if a.reps:
      first_step(trees, tmp, a.reps)
    if a.tests:
      test_suites(trees, tmp, a.suites.split(','))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
