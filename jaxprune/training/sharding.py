"""Data parallelism with ``jax.sharding``: one 'data' mesh axis over all devices.

The batch is split along its first axis over the mesh (``P('data')``), the
train state is replicated (``P()``); XLA inserts the gradient all-reduce. The
same code runs on one CPU device (a 1-device mesh), on several local devices,
and on several hosts, where each host feeds only its own slice of the global
batch (:func:`shard_batch` uses ``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
DISTRIBUTED_ENV = 'JAXPRUNE_DISTRIBUTED'


def maybe_initialize_distributed(enabled: bool | None = None) -> bool:
  """Calls ``jax.distributed.initialize()`` only when asked.

  Asked means ``enabled=True`` or, when ``enabled`` is None, the environment
  variable ``JAXPRUNE_DISTRIBUTED=1``. Must run before any other JAX call.
  On TPU pods and SLURM/Open MPI clusters ``initialize()`` finds the
  coordinator by itself. Returns whether it initialised.
  """
  if enabled is None:
    enabled = os.environ.get(DISTRIBUTED_ENV, '0').lower() in ('1', 'true', 'yes')
  if enabled:
    jax.distributed.initialize()
  return bool(enabled)


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over ``devices`` (default: all, of all hosts).

  Auto axis types: sharding is propagated by XLA from the inputs, so model
  code needs no sharding annotations (``jax.make_mesh`` defaults to Explicit).

  >>> make_mesh().axis_names
  ('data',)
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """This host's share of a global batch; checks it splits evenly over devices."""
  n_dev = mesh.size if mesh is not None else jax.device_count()
  if global_batch_size % n_dev:
    raise ValueError(f'Global batch size {global_batch_size} is not divisible by the {n_dev} devices of the mesh.')
  return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this host's slice of the batch into global arrays sharded on 'data'.

  With one host the local batch is the global batch.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def process_slice(n: int) -> slice:
  """This host's contiguous share of ``n`` rows (for feeding a global batch)."""
  per = n // jax.process_count()
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)
