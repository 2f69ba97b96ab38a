"""Soak: the README's main job under random SIGKILLs ends exactly as an uninterrupted run.

  nice -n 10 python -m benchmarks.soak                  # tiny settings, ~5 minutes of kills
  python -m benchmarks.soak --minutes 20 --max-kills 50 --full   # the main job as the README runs it

Runs ``python -m experiments.main`` with the main job's config
(``magnitude_cifar10_subset_resnet20.py``) once without interruption, then again
in another workdir, SIGKILLing the process and starting it again until
``--max-kills`` kills or ``--minutes`` have passed, then lets it finish. Kills
alternate between a random moment (``--min-delay`` seconds after the start up to
a quarter of the uninterrupted run's duration: imports, compilation, training,
evaluation, slimming, ...) and the moment the 1st, 2nd or 3rd checkpoint write of the
process is under way (a new tmp directory of orbax appears). The two runs' ``results.json`` (less timings: speedup, phase and
wall times) and ``metrics.jsonl`` records (less time and steps/s) must be
equal; the exit status is 1 otherwise. Prints each kill (when, during what)
and a JSON summary with the kills survived.

Tiny settings (the default): 3 dense epochs of 12 steps of batch 64, one-shot
L1 to 50% of the MACs, 2 finetune epochs, checkpoints every 4 steps.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_JOB = ['-m', 'experiments.main', '--config', 'experiments/configs/magnitude_cifar10_subset_resnet20.py']
TINY = [
  '--config.train.epochs=3',
  '--config.train.max_steps_per_epoch=12',
  '--config.data.batch_size=64',
  '--config.method.finetune.epochs=2',
  '--config.checkpoint.every_steps=4',
]
TIMINGS = ('speedup', 'phase_times_s', 'wall_time_s')
RECORD_TIMINGS = ('time', 'steps_per_s')


def command(workdir: str, full: bool) -> list[str]:
  return [sys.executable, *MAIN_JOB, f'--workdir={workdir}', '--config.progress=False', *([] if full else TINY)]


def environment() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS='cpu')


def start(workdir: str, full: bool, attempt: int) -> subprocess.Popen:
  log = open(os.path.join(os.path.dirname(workdir), f'attempt{attempt}.log'), 'w')
  return subprocess.Popen(command(workdir, full), cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT)


def saving(workdir: str) -> list[str]:
  """The checkpoint writes under way (orbax's tmp directories)."""
  return glob.glob(os.path.join(workdir, '*', 'checkpoints', '*.orbax-checkpoint-tmp*'))


def doing(workdir: str) -> str:
  """What the run had reached: its last metrics record and the last file it wrote."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs]
  if not files:
    return 'before writing anything'
  newest = os.path.relpath(max(files, key=os.path.getmtime), workdir)
  last = 'no step yet'
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    for line in reversed(open(path).read().splitlines()):
      try:
        r = json.loads(line)
        last = f'{r["phase"]} step {r["step"]} ({r["split"]})'
        break
      except (json.JSONDecodeError, KeyError):
        continue
  return f'last record {last}, last file {newest}'


def _inode(path: str) -> int | None:
  try:
    return os.stat(path).st_ino
  except FileNotFoundError:
    return None


def kill_when(p: subprocess.Popen, workdir: str, mode: str, delay: float, nth: int = 1) -> tuple[bool, str]:
  """SIGKILLs the run ``delay`` seconds after its start (mode 'random') or when its
  ``nth`` checkpoint write is under way (mode 'checkpoint'; at ``delay`` at the
  latest); returns (killed, what it was doing)."""
  t0, seen = time.time(), {(d, _inode(d)) for d in saving(workdir)}  # left by the last kill
  while time.time() - t0 < delay:
    if p.poll() is not None:
      return False, 'finished'
    if mode == 'checkpoint':
      new = {(d, _inode(d)) for d in saving(workdir)} - seen
      if new:
        seen |= new
        nth -= 1
        if nth == 0:
          p.send_signal(signal.SIGKILL)
          p.wait()
          return True, f'writing checkpoint {os.path.relpath(sorted(new)[0][0], workdir)}'
      time.sleep(0.002)
    else:
      time.sleep(0.05)
  if p.poll() is not None:
    return False, 'finished'
  during = 'writing a checkpoint, ' if {(d, _inode(d)) for d in saving(workdir)} - seen else ''
  p.send_signal(signal.SIGKILL)
  p.wait()
  return True, during + doing(workdir)


def outputs(workdir: str) -> tuple[dict, list]:
  with open(os.path.join(workdir, 'results.json')) as f:
    r = {k: v for k, v in json.load(f).items() if k not in TIMINGS}
  recs = []
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    rec = json.loads(line)
    recs.append({k: v for k, v in rec.items() if k not in RECORD_TIMINGS})
  return r, recs


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--minutes', type=float, default=5.0, help='stop killing after this long (then finish)')
  ap.add_argument('--max-kills', type=int, default=12)
  ap.add_argument('--min-delay', type=float, default=4.0, help='seconds after a start before a random kill')
  ap.add_argument('--max-delay', type=float, default=None, help='default: a quarter of the uninterrupted run')
  ap.add_argument('--seed', type=int, default=0, help='of the kill times')
  ap.add_argument('--full', action='store_true', help="the main job's own settings instead of tiny ones")
  ap.add_argument('--workdir', default=None, help='keep the runs here (default: a temporary folder)')
  args = ap.parse_args(argv)
  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix='jaxprune_soak_')
  ref, soak = os.path.join(root, 'ref', 'run'), os.path.join(root, 'soak', 'run')
  for d in (ref, soak):
    shutil.rmtree(os.path.dirname(d), ignore_errors=True)
    os.makedirs(os.path.dirname(d))

  t0 = time.time()
  p = start(ref, args.full, 0)
  if p.wait() != 0:
    print(f'the uninterrupted run failed; see {os.path.dirname(ref)}/attempt0.log')
    return 1
  ref_s = time.time() - t0
  print(f'uninterrupted run: {ref_s:.0f} s')

  kills, attempt, t_soak = [], 0, time.time()
  while True:
    attempt += 1
    p = start(soak, args.full, attempt)
    if len(kills) >= args.max_kills or time.time() - t_soak > 60 * args.minutes:
      break
    mode = 'checkpoint' if attempt % 2 == 0 else 'random'
    longest = args.max_delay or max(ref_s / 4, args.min_delay + 1)  # a restart must rarely finish
    delay = rng.uniform(args.min_delay, longest) if mode == 'random' else longest
    t_start = time.time()
    killed, where = kill_when(p, soak, mode, delay, nth=rng.randint(1, 3))
    if not killed:
      print(f'attempt {attempt}: finished before its kill')
      break
    kills.append({'after_s': round(time.time() - t_start, 1), 'mode': mode, 'during': where})
    print(f'kill {len(kills)}: {kills[-1]["after_s"]} s after start ({mode}): {where}', flush=True)
  rc = p.wait()
  if rc != 0:
    print(f'the soaked run failed (exit {rc}); see {os.path.dirname(soak)}/attempt{attempt}.log')
    return 1
  same = outputs(ref) == outputs(soak)
  a, b = outputs(ref)[0], outputs(soak)[0]
  summary = {
    'kills_survived': len(kills),
    'during_checkpoint_writes': sum(k['during'].startswith('writing') for k in kills),
    'starts': attempt,
    'equal_to_uninterrupted': same,
    'test_accuracy': [a['test_accuracy'], b['test_accuracy']],
    'dense_accuracy': [a['dense_accuracy'], b['dense_accuracy']],
    'uninterrupted_s': round(ref_s),
    'soak_s': round(time.time() - t_soak),
    'settings': 'full' if args.full else 'tiny',
    'workdir': root,
  }
  print(json.dumps(summary))
  if args.workdir is None and same:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if same else 1


if __name__ == '__main__':
  sys.exit(main())
