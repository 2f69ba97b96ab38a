"""The non-finite guard: a NaN or Inf loss or update stops a run, or skips the step.

:func:`guard_step` follows a train step with a flag that every updated array
of the state is finite (a NaN gradient shows up there one step before the loss
sees it) and, with ``skip=True``, keeps the previous state (only ``step``
advances, so the schedule and the data go on) when a metric or the update is
not finite. The step's own program is not changed: guarded and unguarded runs
give the same numbers. The loop reads the flags with the other metrics and
raises :class:`NonFiniteError` naming the step, the loss terms that went
non-finite and the last good checkpoint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.training.state import TrainState

FINITE_UPDATE = '_finite_update'  # the flag guard_step adds to the metrics
MODES = ('stop', 'skip')
# Sums of other terms, named after the terms they add up.
_TOTALS = ('extra_loss', 'loss')


class NonFiniteError(FloatingPointError):
  """A training step whose loss or update was NaN or Inf."""

  def __init__(self, message: str, *, step: int, terms: list[str], checkpoint: str | None):
    super().__init__(message)
    self.step, self.terms, self.checkpoint = step, terms, checkpoint


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guard_step(
  train_step: Callable[..., tuple[TrainState, dict]], *, skip: bool = False, mesh: jax.sharding.Mesh | None = None
) -> Callable[..., tuple[TrainState, dict]]:
  """``train_step`` followed by the finiteness check (and, with ``skip``, the skip).

  The check and the skip are programs of their own, run after the step: the
  step's own compiled program is untouched, so guarded runs give the numbers
  unguarded ones gave, bit for bit, in both modes (``skip`` keeps a copy of the
  state the step donates, and puts it back when the step was not finite).

  >>> step = guard_step(make_train_step(apply_fn, tx), skip=True)  # doctest: +SKIP
  >>> state, metrics = step(state, batch)  # metrics[FINITE_UPDATE]: 1.0 or 0.0  # doctest: +SKIP
  """
  del mesh  # the check and the select keep the (replicated) sharding of their inputs

  @jax.jit
  def check(new, metrics):
    # extra included: method state must stay finite (EPI's tracker marks unset records
    # with a finite sentinel), so a NaN in gates or records stops the run here
    finite_update = _all_finite((new.params, new.extra, new.batch_stats, new.opt_state))
    return finite_update.astype(jnp.float32), finite_update & _all_finite(metrics)

  if not skip:

    def guarded(state, batch, mask=None, hparams=None):
      new, metrics = train_step(state, batch, mask, hparams)
      return new, {**metrics, FINITE_UPDATE: check(new, metrics)[0]}

    return guarded

  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

  @functools.partial(jax.jit, donate_argnums=(1,))
  def select(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old._replace(step=new.step))

  def guarded_skip(state, batch, mask=None, hparams=None):
    old = copy(state)  # the step donates its input
    new, metrics = train_step(state, batch, mask, hparams)
    finite_update, ok = check(new, metrics)
    return select(ok, new, old), {**metrics, FINITE_UPDATE: finite_update}

  return guarded_skip


def nonfinite_terms(metrics: Mapping[str, Any]) -> list[str] | None:
  """The metrics (loss terms) of one step that are not finite, most specific first
  (``budget`` before the ``extra_loss`` and ``loss`` it adds to); ``['update']``
  when every term is finite but the update is not; None when the step is fine."""
  bad = [k for k, v in metrics.items() if k != FINITE_UPDATE and not math.isfinite(float(v))]
  if bad:
    return sorted(bad, key=lambda k: (k in _TOTALS, _TOTALS.index(k) if k in _TOTALS else 0, k))
  if float(metrics.get(FINITE_UPDATE, 1.0)) != 1.0:
    return ['update']
  return None


def describe(phase: str, step: int, metrics: Mapping[str, Any], terms: list[str]) -> str:
  """``'step 7 of phase 'search': budget=nan (and extra_loss=nan, loss=nan); finite: ce=2.3'``."""
  if terms == ['update']:
    what = 'every loss term was finite but the update made the parameters (or optimizer state) non-finite'
  else:
    first, rest = terms[0], terms[1:]
    what = f'{first}={float(metrics[first])}'
    if rest:
      what += ' (and ' + ', '.join(f'{k}={float(metrics[k])}' for k in rest) + ')'
  finite = [f'{k}={float(v):.4g}' for k, v in metrics.items() if k not in terms and k != FINITE_UPDATE]
  return f'step {step} of phase {phase!r}: {what}' + (f'; finite: {", ".join(finite)}' if finite else '')
