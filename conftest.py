"""The names the docstring examples of ``jaxprune`` assume, so that they run as doctests.

An example says ``jaxprune.slim(variables, graph, masks)`` as a user would, with a model,
its traced graph and a few real images already at hand; this file puts those in every
doctest's namespace (ResNet-20 on 8 test images of the shipped CIFAR-10 subset, traced
with residual-branch groups; for the PAGCP modules a two-task network on MultiMNIST) and
runs each example in a fresh temporary folder, so that the export examples write there.
"""

import functools

import pytest


@functools.cache
def _common() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import jaxprune
  from jaxprune import data, models
  from jaxprune.methods import chipnet, epi, ftwt, magnitude, manidp, pagcp

  return dict(
    jax=jax, jnp=jnp, np=np, optax=optax, nnx=nnx, jaxprune=jaxprune, data=data, models=models,
    chipnet=chipnet, epi=epi, ftwt=ftwt, magnitude=magnitude, manidp=manidp, pagcp=pagcp,
  )  # fmt: skip


@functools.cache
def _cifar() -> dict:
  c = _common()
  jaxprune, jnp, nnx, ftwt = c['jaxprune'], c['jnp'], c['nnx'], c['ftwt']
  model = c['models'].create('resnet20', num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  fn, variables = jaxprune.functional(model)
  batch = next(c['data'].eval_batches('cifar10_subset', batch_size=8))
  x, y = jnp.asarray(batch['image']), jnp.asarray(batch['label'])
  graph = jaxprune.trace(fn, variables, x[:1], branches=True)
  scores = jaxprune.criteria.l1(variables, graph)
  masks = jaxprune.select.global_topk(scores, graph, budget=0.5, unit='macs')
  small = jaxprune.slim(variables, graph, masks)
  points = ftwt.gate_points(fn, graph, variables, x[:1])
  preds = ftwt.init_predictors(0, points)
  _, aux = ftwt.gated(fn, graph, points)(variables, preds, x)
  return dict(
    model=model, fn=fn, variables=variables, v=variables, state=variables, x=x, y=y, images=x,
    graph=graph, scores=scores, masks=masks, small=small, small_model=jaxprune.module(model, small),
    points=points, preds=preds, aux=aux, epochs=3,
  )  # fmt: skip


@functools.cache
def _multitask() -> dict:
  c = _common()
  jaxprune, jnp, nnx = c['jaxprune'], c['jnp'], c['nnx']
  model = c['models'].create('multitask_resnet', num_classes={'left': 10, 'right': 10}, rngs=nnx.Rngs(0))
  model.eval()
  fn, variables = jaxprune.functional(model)
  batch = next(c['data'].eval_batches('multimnist', batch_size=16))
  x_val, y_val = jnp.asarray(batch['image']), jnp.asarray(batch['label'])
  graph = jaxprune.trace(fn, variables, x_val[:1])
  masks = {g.name: c['np'].ones(g.size, c['np'].float32) for g in graph.groups}
  return dict(
    model=model, fn=fn, variables=variables, x_val=x_val, y_val=y_val, graph=graph, masks=masks,
    finetune=lambda variables, masks, round: variables,  # a round's finetune: none here
  )  # fmt: skip


@pytest.fixture(autouse=True)
def _doctest_context(request):
  if type(request.node).__name__ != 'DoctestItem':
    return
  ns = request.getfixturevalue('doctest_namespace')
  ns.update(_common())
  ns.update(_multitask() if request.node.name.startswith('jaxprune.methods.pagcp') else _cifar())
  request.getfixturevalue('monkeypatch').chdir(request.getfixturevalue('tmp_path'))
