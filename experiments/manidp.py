"""ManiDP: per-sample saliency gates trained with sparsity and similarity terms (dynamic).

The method's phase, ``manidp``, from the dense network: backbone and gates train
together (SGD Nesterov 0.9, lr cosine per step, weight decay on the backbone only);
the loss adds the complexity-weighted sparsity and the similarity consistency
(``jaxprune.methods.manidp``). The epoch's saliency and CE sums ride in the train
state; at each epoch end the thresholds (from epoch 1 on) and the reference loss C
are refreshed, so they are checkpointed and resume with the run. No slimming: the
result is the gated network's accuracy and per-image cost.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from experiments import phases, pruning
from experiments.configs import defaults
from experiments.recipe import Dense, Experiment, Outcome, Recipe
from jaxprune import training as T
from jaxprune.methods import manidp

SUMS = ('thresholds', 'sal_sum', 'count', 'ce_sum', 'ce_ref')  # method state, not trained


def run(exp: Experiment, dense: Dense) -> Outcome:
  m = exp.config.method
  manidp.check_rate(m.target_rate)
  manidp.check_weights(lambda_sparse=m.lambda_sparse, lambda_sim=m.lambda_sim, thre_cls=m.thre_cls)
  graph = pruning.trace(exp, dense.graphdef, dense.state, branches=True)
  train_fn, eval_fn = pruning.core_fns(dense.graphdef)
  v = T.core_variables(dense.state)
  layers = manidp.gate_layers(eval_fn, graph, v, exp.example, squeeze_rate=int(m.squeeze_rate))
  gated_train, gated_eval = (manidp.gated(f, graph, layers, clamp_max=float(m.clamp_max)) for f in (train_fn, eval_fn))

  args = lambda v: (T.core_variables(v), v.extra['gates'], v.extra['thresholds'])
  apply_fn, eval_apply = pruning.gated_forward(gated_train, gated_eval, args)

  def extra_loss(v, batch, fwd, *, rng=None, hparams=None):
    ce = optax.softmax_cross_entropy_with_integer_labels(fwd.logits.astype(jnp.float32), batch['label'])
    weight = batch.get('weight', jnp.ones_like(ce))
    w = manidp.complexity_weights(ce, m.thre_cls * v.extra['ce_ref'], gamma=m.gamma,
                                  detach=m.detach_weights) * weight  # fmt: skip
    sal, feats = fwd.aux.aux, fwd.aux.observed
    sparse, sim = manidp.sparsity_loss(sal, w), manidp.similarity_loss(feats, sal)
    state = manidp.accumulate(manidp.State(v.extra['thresholds'], v.extra['sal_sum'], v.extra['count']), sal, weight)
    sets = {'sal_sum': state.sal_sum, 'count': state.count, 'ce_sum': v.extra['ce_sum'] + (ce * weight).sum()}
    kept = jnp.mean(jnp.stack([(fwd.aux.masks[l.name] > 0).mean() for l in layers]))
    parts = {'sparsity': sparse, 'similarity': sim, 'gates_open': kept, 'weight_mean': w.mean()}
    return m.lambda_sparse * sparse + m.lambda_sim * sim, parts, sets

  spe = phases.steps_per_epoch(exp.config)

  def on_epoch_end(step, state):
    e = int(round(step / spe)) - 1  # the epoch that just ended (0-based)
    ex = state.extra
    st = manidp.refresh(manidp.State(ex['thresholds'], ex['sal_sum'], ex['count']), e, int(m.epochs),
                        float(m.target_rate))  # fmt: skip
    ce_ref = ex['ce_sum'] / jnp.maximum(ex['count'], 1.0)
    extra = {**ex, 'thresholds': st.thresholds, 'sal_sum': st.sal_sum, 'count': st.count,
             'ce_sum': jnp.zeros_like(ex['ce_sum']), 'ce_ref': ce_ref}  # fmt: skip
    return state._replace(extra=extra)

  total = max(1, int(round(m.epochs * spe)))
  lr = optax.cosine_decay_schedule(float(m.lr), total)
  sgd = lambda: optax.sgd(lr, momentum=0.9, nesterov=True)
  # clipping (per part) is not in the official code; its advice for NaN losses is a lower lr or clipping
  clip = optax.clip_by_global_norm(float(m.grad_clip_norm)) if m.grad_clip_norm else optax.identity()
  tx = T.partition({'params': optax.chain(clip, optax.add_decayed_weights(m.weight_decay), sgd()),
                    'gates': optax.chain(clip, sgd()), **{k: None for k in SUMS}})  # fmt: skip
  c0 = phases.mean_train_loss(exp, dense.graphdef, dense.state) if not m.get('c_ref') else float(m.c_ref)
  state0 = manidp.init(layers)
  extra = {'gates': manidp.init_gates(int(m.seed), layers, scale=float(m.gate_init_scale)), 'thresholds': state0.thresholds,
           'sal_sum': state0.sal_sum, 'count': state0.count, 'ce_sum': jnp.float32(0.0),
           'ce_ref': jnp.float32(c0)}  # fmt: skip
  step = phases.Step(apply_fn, eval_apply, extra_loss, None, on_epoch_end, tx=tx, schedule=lr)
  res = phases.train(exp, 'manidp', (dense.graphdef, dense.state), overrides={'epochs': m.epochs, 'lr': m.lr},
                     step=step, extra=extra, seed_offset=1)  # fmt: skip
  return evaluate(exp, graph, layers, gated_eval, res.state, dense)


def evaluate(exp: Experiment, graph, layers, gated_eval, state, dense: Dense) -> Outcome:
  """Accuracy, per-image MACs (exact, the official count, gates), and how the kept
  channels follow the sample's loss, over the test split."""
  v, ex = T.core_variables(state), state.extra

  def forward(images):
    logits, res = gated_eval(v, ex['gates'], ex['thresholds'], images)
    return logits, res.masks

  def extra(masks):
    gates = jnp.concatenate([(masks[l.name] > 0) for l in layers], -1)
    return {'macs_official': manidp.paper_macs(graph, layers, masks), 'kept': gates.mean(-1),
            'gates': gates.astype(jnp.float32)}  # fmt: skip

  per, s = pruning.per_sample(exp, extra=extra, graph=graph, forward=lambda x: _hard(forward(x)))
  dense_macs, gm = float(dense.cost['macs']), manidp.gate_macs(layers)
  q = np.quantile(per['loss'], [0.25, 0.75])
  s.update(gate_macs=gm, dense_macs=dense_macs, macs_ratio=s['macs_mean'] / dense_macs,
           macs_official_mean=float(per['macs_official'].mean()),
           reduction_official=1 - float(per['macs_official'].mean()) / dense_macs,
           kept_mean=float(per['kept'].mean()), kept_easy=float(per['kept'][per['loss'] <= q[0]].mean()),
           kept_hard=float(per['kept'][per['loss'] >= q[1]].mean()),
           kept_loss_corr=float(np.corrcoef(per['kept'], per['loss'])[0, 1]))  # fmt: skip
  m = exp.config.method
  details = {'target_rate': float(m.target_rate), 'lambda_sparse': float(m.lambda_sparse),
             'lambda_sim': float(m.lambda_sim), 'gates': len(layers)}  # fmt: skip
  return pruning.dynamic_outcome(exp, per, s, dense, details)


def _hard(out):
  """(logits, masks): a channel counts where its gate is open (its saliency > 0)."""
  logits, masks = out
  return logits, {k: (m > 0).astype(jnp.float32) for k, m in masks.items()}


recipe = Recipe(defaults=defaults.manidp, run=run, check=lambda exp: manidp.check_rate(exp.config.method.target_rate))
