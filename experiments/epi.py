"""EPI: prune once, early, when the dominant sub-network stops changing (pruning-aware training).

Phases: ``dense`` from scratch on the full schedule; after every epoch the dominant
sub-network (what global selection at ratio p would keep now) is recorded for both
criteria (L2 magnitude; first-order Taylor on BN parameters accumulated by an optax
stage in the train step) and the configured criterion's EPI may fire. Then the
network is slimmed with its optimizer state (momentum) and ``pruned`` continues the
same lr schedule to the final epoch. ``method.prune_epoch`` >= 0 prunes at that
epoch instead (the oracle sweep); -2 never prunes (the dense run, with both EPI
curves). A kill resumes in either phase, across the prune epoch too: the dense
checkpoint at the prune epoch rebuilds the slimmed network deterministically.
"""

from __future__ import annotations

import numpy as np
import optax

from experiments import phases, pruning
from experiments.configs import defaults
from experiments.recipe import Dense, Experiment, Outcome, Recipe
from jaxprune import training as T
from jaxprune.methods import epi

TRACKS = {'magnitude': 'track_magnitude', 'taylor': 'track_taylor'}
NEVER = -2


def configs(m) -> dict[str, epi.Config]:
  """EPI's settings per criterion (both are recorded; `method.criterion` triggers)."""
  common = dict(prune_ratio=float(m.prune_ratio), unit=m.unit, r=int(m.r), window=int(m.window),
                indicator=m.indicator, min_keep=int(m.min_keep))  # fmt: skip
  return {c: epi.Config(criterion=c, tau=float(m[f'tau_{c}']) or None, **common) for c in TRACKS}


def start(exp: Experiment) -> Dense:
  """A fresh network: EPI trains from scratch."""
  graphdef, fresh = T.create_train_state(phases.build_model(exp.config), optax.identity(), exp.config.seed)
  return pruning.counted(exp, graphdef, fresh, {})


def _inner(opt_state):
  """The params' optimizer state without the Taylor stage."""
  return opt_state.inner_states['params'].inner_state[1]


def run(exp: Experiment, dense: Dense) -> Outcome:
  m, config = exp.config.method, exp.config
  cfgs = configs(m)
  graph = pruning.method_graph(exp, dense)
  spec = epi.channel_leaves(graph)
  spe, epochs = phases.steps_per_epoch(config), int(config.train.epochs)
  inner, schedule = T.optim_from_config(dict(config.train), spe)
  frozen = {t: None for t in TRACKS.values()}
  tx = T.partition({'params': optax.chain(epi.taylor_transform(spec), inner), **frozen})
  widths = [g.size for g in graph.groups]
  # record i is taken after epoch i + 1 (no record at initialisation: Taylor needs an epoch's gradients)
  extra = {t: epi.init(widths, capacity=epochs + 1, first_epoch=1) for t in TRACKS.values()}

  def record(step, state):  # after each epoch: both criteria's dominant sub-networks
    v, ex, acc = T.core_variables(state), dict(state.extra), epi.find_taylor(state.opt_state)
    for c, cfg in cfgs.items():
      sub = epi.dominant(epi.scores(cfg, spec, graph, v, acc), graph, cfg)
      ex[TRACKS[c]], _ = epi.update(ex[TRACKS[c]], sub.counts, sub.flat, cfg)
    return state._replace(extra=ex, opt_state=epi.replace_taylor(state.opt_state, epi.taylor_init(spec)))

  def stop(state) -> bool:
    done = int(state.step) // spe
    if m.prune_epoch == NEVER:
      return False
    if m.prune_epoch >= 0:
      return done >= int(m.prune_epoch)
    return int(state.extra[TRACKS[m.criterion]].fired) >= 0

  if m.dense_from and m.prune_epoch > 0:  # the oracle sweep shares one recorded dense run
    phases.seed_checkpoint(exp, m.dense_from, 'dense', int(m.prune_epoch) * spe)
  step = phases.Step(on_epoch_end=record, stop_when=stop, tx=tx, schedule=schedule)
  if m.prune_epoch == 0:  # pruning at initialisation: no training before it
    ran = dense.state._replace(extra=extra)
    ran = ran._replace(opt_state=tx.init(T.trainables(ran)))
  else:
    ran = phases.train(exp, 'dense', (dense.graphdef, dense.state), step=step, extra=extra).state
  done = int(ran.step) // spe
  tracks = {c: epi.history(ran.extra[TRACKS[c]]) for c in TRACKS}
  fired = {c: epi.fire_epoch(ran.extra[TRACKS[c]]) for c in TRACKS}
  details = {'criterion': m.criterion, 'prune_ratio': float(m.prune_ratio), 'fired': fired,
             'curves': {c: {'epoch': h['epoch'].tolist(), 'epi': np.nan_to_num(h['epi'], nan=-1).tolist(),
                            'early_bird': np.nan_to_num(h['eb'], nan=-1).tolist()} for c, h in tracks.items()}}  # fmt: skip
  if m.prune_epoch == NEVER or done >= epochs:  # never pruned: the dense network
    ev = phases.evaluate(exp, dense.graphdef, ran)
    details['prune_epoch'] = None
    pruning.save_final(exp.workdir, ran, graph.ones(), graph, dense_graph=True)
    return Outcome(accuracy=ev['accuracy'], cost=dense.cost, details=details)

  # Prune: the configured criterion's sub-network of this epoch (at init: the weights' magnitudes).
  crit = 'magnitude' if m.prune_epoch == 0 else m.criterion
  if m.prune_epoch == 0:
    masks = epi.dominant(epi.scores(cfgs[crit], spec, graph, T.core_variables(ran)), graph, cfgs[crit]).masks
  else:
    masks = epi.last_masks(ran.extra[TRACKS[crit]], graph)
  small = epi.slim_state(ran._replace(opt_state=_inner(ran.opt_state)), graph, masks)
  tx2 = T.partition({'params': inner, **frozen})
  opt2 = tx2.init(T.trainables(small))
  opt2 = opt2._replace(inner_states={**opt2.inner_states,
                                     'params': opt2.inner_states['params']._replace(inner_state=small.opt_state)})  # fmt: skip
  small = small._replace(opt_state=opt2)
  res = phases.train(exp, 'pruned', (dense.graphdef, small), step=phases.Step(tx=tx2, schedule=schedule),
                     continue_schedule=True)  # fmt: skip
  cost = pruning.count(graph, masks)
  compute = epi.compare_compute(dense.cost['macs'], cost['macs'], epochs=epochs, prune_epoch=done,
                                samples_per_epoch=spe * phases.global_batch(config),
                                finetune_epochs=int(m.finetune_epochs))  # fmt: skip
  details.update(prune_epoch=done, pruned_by=crit, kept_per_group=pruning.kept_per_group(masks),
                 compute={**compute._asdict(), 'saving_vs_train_prune_finetune': compute.saving})  # fmt: skip
  speed = pruning.measure_speedup(dense.graphdef, dense.state, res.state, exp.info.image_shape)
  pruning.save_final(exp.workdir, res.state, masks, graph, dense_graph=True)
  return Outcome(accuracy=res.eval.get('accuracy'), cost=cost, speedup=speed, details=details)


def check(exp: Experiment) -> None:
  m = exp.config.method
  configs(m)  # bad settings fail before training
  if m.criterion not in TRACKS:
    raise ValueError(f'method.criterion must be one of {list(TRACKS)}, got {m.criterion!r}')
  if not (m.prune_epoch in (-1, NEVER) or 0 <= m.prune_epoch < exp.config.train.epochs):
    raise ValueError(f'method.prune_epoch must be -1 (EPI), -2 (never) or an epoch in [0, '
                     f'{exp.config.train.epochs}), got {m.prune_epoch}')  # fmt: skip


recipe = Recipe(defaults=defaults.epi, run=run, check=check, start=start)
