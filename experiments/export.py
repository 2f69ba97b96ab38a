"""Exports a finished run's network as a `jax.export` artifact (``jaxprune.deploy``).

  python -m experiments.export --workdir runs/mag_quick --out deploy/mag_quick
  # serving on TPU (widths padded to multiples of 128), or no padding at all:
  python -m experiments.export --workdir runs/mag_quick --out deploy/mag_tpu --round_to=tpu
  python -m experiments.export --workdir runs/mag_quick --out deploy/mag_raw --round_to=1

Reads ``results.json``, the config in it and the final network (a static
method's slimmed, finetuned network in ``workdir/final``; a dense run's
trained one), folds every BatchNorm into its conv, pads the channel widths
with zero channels to multiples of ``--round_to`` (the outputs stay the same;
default: ``jaxprune.deploy.round_to('cpu')``) and writes ``--out`` with
``jaxprune.deploy.export_module``: ``model.jax`` (batch dimension symbolic),
the weights (orbax) and ``card.json`` (model, method, budget, accuracy, MACs,
params, input shape and normalisation). Run it with
``jaxprune.deploy.load(OUT)(x)``; no model code is needed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_dict

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jaxprune.deploy.export's default


def multiple(round_to: str | int) -> int:
  """``--round_to`` as a channel multiple: an integer >= 1, or a platform's default."""
  from jaxprune import deploy

  text = str(round_to).strip()
  if text.isdigit() and int(text) >= 1:
    return int(text)
  try:
    return deploy.round_to(text)
  except ValueError as e:
    raise ValueError(f'--round_to={round_to!r}: give a positive integer or a platform. {e}') from None


def final_network(workdir: str) -> tuple[dict[str, Any], Any, dict[str, Any], dict[str, Any] | None]:
  """``(results, dense model, final variables, masks meta or None)`` of a finished run.

  The variables are those of the dense model's structure (slimmed arrays for a
  static method); the masks meta (``pruning.save_final``) is None for a dense run.
  """
  from experiments import phases, pruning, results
  from jaxprune import nnx_bridge
  from jaxprune import training as T

  r = results.load(workdir)
  config = config_dict.ConfigDict(r['config'])
  if r.get('dynamic') is not None:
    raise ValueError(
      f'{workdir} is a {r["method"]} run: a dynamic network chooses its channels per image, so there is '
      'no one slimmed network to export. Export a static method\'s run (magnitude, chipnet, epi, ...).'
    )
  model = phases.build_model(config)
  model.eval()
  _, template = nnx_bridge.split(model)
  if r['method'] == 'dense':
    _, state = pruning.load_dense(config, workdir)
    return r, model, T.core_variables(state), None
  saved, meta = pruning.load_final(workdir)
  return r, model, _as_template(template, saved, workdir), meta


def _as_template(template: Any, saved: Any, workdir: str) -> Any:
  """The restored arrays in the model's variable tree (orbax drops empty dicts and
  turns list indices into strings; the structure comes from the model)."""
  from jaxprune import deploy

  got = dict(zip(deploy.leaf_paths(saved), jax.tree_util.tree_leaves(saved)))
  names = deploy.leaf_paths(template)
  missing = [n for n in names if n not in got]
  if missing or len(got) != len(names):
    raise ValueError(
      f'{workdir}/final/variables does not fit the model of its config: missing {missing[:5]}, '
      f'{len(got)} arrays saved for {len(names)} variables.'
    )
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [got[n] for n in names])


def export_run(
  workdir: str,
  out: str,
  *,
  round_to: str | int = 'cpu',
  platforms: tuple[str, ...] = PLATFORMS,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the run's final network to ``out`` (see the module docstring); returns the card."""
  import jaxprune
  from experiments import pruning
  from jaxprune import data as data_lib
  from jaxprune import deploy

  m = multiple(round_to)
  r, model, variables, meta = final_network(workdir)
  info = data_lib.get_info(r['dataset'])
  x1 = np.zeros((1, *info.image_shape), np.float32)
  padded = None  # a dense run's widths are the model's own: nothing to pad
  if m > 1 and meta is not None and not meta['dense_graph']:
    logging.warning('%s: the masks are over an intermediate network (iterative pruning); exported unpadded.', workdir)
  elif m > 1 and meta is not None:
    dense_fn, dense_v = jaxprune.functional(model)
    graph = jaxprune.trace(dense_fn, dense_v, x1, branches=meta['branches'])
    masks = {k: np.asarray(v, np.float32) for k, v in meta['masks'].items()}
    variables, masks_up = deploy.pad_channels(graph, masks, variables, m)
    padded = pruning.count(graph, masks_up)
  small = jaxprune.module(model, variables, x1)
  card = {
    'model': r['model'],
    'dataset': r['dataset'],
    'method': r['method'],
    'budget': r['budget'],
    'unit': r['unit'],
    'accuracy': r['test_accuracy'],
    'dense_accuracy': r['dense_accuracy'],
    'macs': r['macs'],
    'params': r['params'],
    'dense_macs': r['dense']['macs'],
    'dense_params': r['dense']['params'],
    'round_to': m,
    # zero channels added: the same outputs, these counts (None: not padded)
    'padded_macs': None if padded is None else padded['macs'],
    'padded_params': None if padded is None else padded['params'],
    'seed': r['seed'],
  }
  return deploy.export_module(
    small,
    out,
    input_shape=info.image_shape,
    card=card,
    normalisation={'mean': list(info.mean), 'std': list(info.std)},
    platforms=tuple(platforms),
    overwrite=overwrite,
  )


def define_flags() -> None:
  """The CLI's flags; defined when run as a program only, so that importing this
  module next to ``experiments.main`` (which also has ``--workdir``) does not clash."""
  flags.DEFINE_string('workdir', None, 'A finished run (its results.json, final/ or train/).')
  flags.DEFINE_string('out', None, 'The artifact directory to write.')
  flags.DEFINE_string(
    'round_to', 'cpu', 'Channel multiple to pad widths to: an integer (1: no padding) or a platform (cpu, gpu, tpu).'
  )
  flags.DEFINE_list('platforms', list(PLATFORMS), 'Platforms the artifact is lowered for.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists.')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  f = flags.FLAGS
  logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= logging.converter.STANDARD_WARNING or 'orbax' not in r.pathname
  )
  card = export_run(f.workdir, f.out, round_to=f.round_to, platforms=tuple(f.platforms), overwrite=f.overwrite)
  keys = ('model', 'method', 'accuracy', 'macs', 'params', 'round_to', 'padded_macs', 'folded_batchnorms', 'platforms')
  print(json.dumps({'out': f.out, **{k: card.get(k) for k in keys}}))
  return 0


if __name__ == '__main__':
  define_flags()
  sys.exit(app.run(main))
