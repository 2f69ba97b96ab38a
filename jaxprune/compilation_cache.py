"""JAX's persistent compilation cache, on by default for jaxprune's training and models.

On CPU most of a short run is XLA compilation (every jitted step, eval step
and model initialiser); the cache keeps the compiled programs on disk, so a
second run, test or notebook skips compiling them.

  folder        ``$JAXPRUNE_CACHE_DIR``, default ``~/.cache/jaxprune/xla``
  off switch    ``JAXPRUNE_CACHE_DIR=off`` (or ``0``, ``none``, empty)

A cache folder the user set for JAX itself (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update('jax_compilation_cache_dir', ...)``) is kept as is.

Example:
  >>> from jaxprune import compilation_cache
  >>> folder = compilation_cache.enable()   # idempotent; the folder, or None when off
"""

from __future__ import annotations

import os

import jax

ENV = 'JAXPRUNE_CACHE_DIR'
DEFAULT = os.path.join('~', '.cache', 'jaxprune', 'xla')
OFF = ('', '0', 'off', 'none', 'false', 'no')


def folder() -> str | None:
  """The cache folder jaxprune would use (None: switched off)."""
  path = os.environ.get(ENV, DEFAULT)
  return None if path.strip().lower() in OFF else os.path.abspath(os.path.expanduser(path))


def enable() -> str | None:
  """Turns the cache on (unless switched off or already configured); returns its folder."""
  current = jax.config.jax_compilation_cache_dir
  if current:  # the user's (or an earlier call's) choice
    return current
  path = folder()
  if path is None:
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  # Cache every program: on CPU the many small ones (initialisers, eval steps)
  # are what a short run or a test spends its time compiling.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path
