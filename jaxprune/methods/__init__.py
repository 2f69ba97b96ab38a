"""Pruning methods built on the core, found by name.

Each method is a small module of pure functions; `get(name)` imports it.

Example:
  >>> magnitude = jaxprune.methods.get("magnitude")
  >>> masks = magnitude.prune(state, graph, criterion="l1", budget=0.5, unit="macs")
"""

from __future__ import annotations

import importlib
from types import ModuleType

_METHODS = {
  "magnitude": "jaxprune.methods.magnitude",
  "ftwt": "jaxprune.methods.ftwt",
  "chipnet": "jaxprune.methods.chipnet",
  "manidp": "jaxprune.methods.manidp",
  "epi": "jaxprune.methods.epi",
  "pagcp": "jaxprune.methods.pagcp",
}


def available() -> list[str]:
  return sorted(_METHODS)


def get(name: str) -> ModuleType:
  """The module implementing method `name`."""
  if name not in _METHODS:
    raise ValueError(f"unknown method {name!r}; available: {available()}")
  return importlib.import_module(_METHODS[name])


def register(name: str, module: str) -> None:
  """Make `get(name)` import `module` (for methods that live outside jaxprune)."""
  _METHODS[name] = module
