"""Runs one experiment from an ml_collections config file.

  python -m experiments.main \
      --config experiments/configs/dense_cifar10_subset_resnet20.py:quick \
      --workdir runs/r20_quick --config.train.epochs=1

Overrides (``--config.a.b=value``) must name existing keys. Re-running with
the same ``--workdir`` resumes from the latest checkpoint, with the same config
(apart from logging, checkpoint cadence and the like; add
``--config.checkpoint.force_resume=True`` to change more). Errors the user can
act on (a changed config, an unusable workdir, a non-finite loss, a failed or
corrupt checkpoint) print their message and exit with status 1. Multi-host: add
``--config.distributed`` (or set JAXPRUNE_DISTRIBUTED=1).

Compiled programs are kept in JAX's persistent cache (``~/.cache/jaxprune/xla``;
``JAXPRUNE_CACHE_DIR=DIR`` moves it, ``JAXPRUNE_CACHE_DIR=off`` turns it off),
so a rerun skips most of the compilation a short CPU run spends its time on.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, metrics.jsonl, results.json).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # orbax logs several lines per save at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= logging.converter.STANDARD_WARNING or 'orbax' not in r.pathname
  )
  config = _CONFIG.value
  from jaxprune import compilation_cache
  from jaxprune import training as T
  from jaxprune.training import sharding

  compilation_cache.enable()
  # Before any other JAX call: multi-host initialisation, when asked.
  sharding.maybe_initialize_distributed(bool(config.distributed) or None)
  from experiments.train import train_and_evaluate  # after the distributed initialisation
  from experiments.workdir import ConfigChangedError, WorkdirError

  try:
    results = train_and_evaluate(config, _WORKDIR.value)
  except (ConfigChangedError, WorkdirError, T.NonFiniteError, T.CheckpointWriteError, T.CorruptCheckpointError) as e:
    print(f'{type(e).__name__}: {e}', file=sys.stderr)
    return 1
  if results.get('stopped_early'):
    logging.warning('Stopped early (%s); run again with the same --workdir to resume.', results['reason'])
    print(json.dumps(results))
    return 0
  summary = {k: results[k] for k in ('test_accuracy', 'params', 'macs', 'wall_time_s') if k in results}
  print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main))
