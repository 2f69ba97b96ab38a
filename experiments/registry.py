"""A method's recipe by name: one registry, ``jaxprune.methods``'s.

``config.method.name`` is a name of :func:`jaxprune.methods.available` (or
``'dense'``: plain training, no method). The recipe of a shipped method is
``recipe`` in ``experiments.<name>``; a method that lives elsewhere registers
one module holding its functions and its ``recipe``:

  jaxprune.methods.register('mine', 'my_package.mine')   # mine.recipe = Recipe(...)
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import jaxprune.methods
from experiments import pruning
from experiments.configs import defaults
from experiments.recipe import Recipe

# Plain training: its one phase is 'train' (which `method.pretrained` of other runs reads).
DENSE = Recipe(defaults=defaults.dense, start=functools.partial(pruning.dense_start, phase='train'))


def available() -> list[str]:
  return ['dense', *jaxprune.methods.available()]


def get(name: str) -> Recipe:
  """The recipe of method ``name``; an unknown name lists the valid ones."""
  if name == 'dense':
    return DENSE
  if name not in jaxprune.methods.available():
    raise ValueError(f'Unknown method {name!r}; valid methods: {", ".join(available())}')
  shipped = f'experiments.{name}'
  module = (
    importlib.import_module(shipped) if importlib.util.find_spec(shipped) is not None else jaxprune.methods.get(name)
  )
  recipe = getattr(module, 'recipe', None)
  if not isinstance(recipe, Recipe):
    raise ValueError(
      f'method {name!r} has no experiments recipe: define `recipe = experiments.recipe.Recipe(...)` '
      f'in {module.__name__} (see docs/adding_a_method.md)'
    )
  return recipe
