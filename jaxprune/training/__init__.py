"""Training: train state, optax from config, jitted steps, data parallelism,
orbax checkpoints with exact resume, metrics, and one reusable loop.

Example (plain training; a method swaps in its own ``apply_fn``,
``extra_loss``, optimizer or epoch-end hook)::

  import optax
  from flax import nnx
  from jaxprune import data, models, training as T

  model = models.create('resnet20', num_classes=10, rngs=nnx.Rngs(0))
  spe = data.steps_per_epoch('cifar10_subset', 128)
  tx, schedule = T.optim_from_config(dict(epochs=2, lr=0.1, momentum=0.9,
                                          nesterov=True, weight_decay=5e-4), spe)
  graphdef, state = T.create_train_state(model, tx, rng=0)
  apply_fn = T.nnx_apply(graphdef)
  mesh = T.make_mesh()
  eval_step = T.make_eval_step(apply_fn, mesh=mesh)
  hooks = T.Hooks(
      T.make_train_step(apply_fn, tx, schedule=schedule, mesh=mesh),
      eval_fn=lambda s: T.evaluate(eval_step, s, data.eval_batches('cifar10_subset', batch_size=256),
                                   batch_size=256, mesh=mesh))
  it = data.train_iterator('cifar10_subset', batch_size=128, seed=0)
  result = T.fit(state, it, hooks, T.Plan(num_steps=2 * spe, steps_per_epoch=spe),
                 workdir='/tmp/run', mesh=mesh)
"""

from jaxprune import compilation_cache
from jaxprune.training.checkpoint import Checkpointer, CheckpointWriteError, CorruptCheckpointError
from jaxprune.training.guard import NonFiniteError, guard_step
from jaxprune.training.loop import FitResult, Hooks, Plan, evaluate, fit
from jaxprune.training.metrics import Means, MetricsWriter, read_jsonl
from jaxprune.training.optim import from_config as optim_from_config
from jaxprune.training.optim import make_optimizer, make_schedule, partition, trainable_labels
from jaxprune.training.sharding import local_batch_size, make_mesh, maybe_initialize_distributed, replicate, shard_batch
from jaxprune.training.state import (
  TrainState,
  Variables,
  core_variables,
  create_train_state,
  merge,
  num_params,
  split_model,
  trainables,
  variables,
)
from jaxprune.training.steps import (
  Forward,
  apply_mask,
  cross_entropy,
  eval_step,
  make_eval_step,
  make_train_step,
  nnx_apply,
  train_step,
  zero_masked,
)

compilation_cache.enable()  # on by default; JAXPRUNE_CACHE_DIR moves it or turns it off

__all__ = [
  'CheckpointWriteError',
  'Checkpointer',
  'CorruptCheckpointError',
  'FitResult',
  'Forward',
  'Hooks',
  'Means',
  'MetricsWriter',
  'NonFiniteError',
  'Plan',
  'TrainState',
  'Variables',
  'apply_mask',
  'core_variables',
  'create_train_state',
  'cross_entropy',
  'eval_step',
  'evaluate',
  'fit',
  'guard_step',
  'local_batch_size',
  'make_eval_step',
  'make_mesh',
  'make_optimizer',
  'make_schedule',
  'make_train_step',
  'maybe_initialize_distributed',
  'merge',
  'nnx_apply',
  'num_params',
  'optim_from_config',
  'partition',
  'read_jsonl',
  'replicate',
  'shard_batch',
  'split_model',
  'train_step',
  'trainable_labels',
  'trainables',
  'variables',
  'zero_masked',
]
