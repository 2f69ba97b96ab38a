"""Data sets and input pipelines for jaxprune.

Offline by default: ``cifar10_subset`` and ``mnist_subset`` (real images in the
official formats) ship inside the package. The full CIFAR-10/100 are read from
their official binary files or a tfds ``data_dir``; ImageNet from tfds.

Example:
  >>> import jaxprune.data as jd
  >>> info = jd.get_info("cifar10_subset")
  >>> it = jd.train_iterator("cifar10_subset", batch_size=128, seed=0,
  ...                        shard_index=0, shard_count=1)
  >>> batch = next(it)       # {"image": f32[128,32,32,3], "label": i32[128]}
  >>> state = it.get_state() # {"next_index": 1}; it.set_state(state) resumes
  >>> n = sum(len(b["label"]) for b in jd.eval_batches("cifar10_subset",
  ...                                                  batch_size=256))
  >>> n
  1017
"""

from jaxprune.data.augment import (
  normalize,
  random_crop_flip,
  random_resized_crop,
  resize_bilinear,
  resize_center_crop,
)
from jaxprune.data.cifar_binary import (
  decode_cifar_records,
  load_cifar10_binary,
  load_cifar100_binary,
  read_cifar_binary_file,
)
from jaxprune.data.errors import CorruptDataError, DataNotFoundError
from jaxprune.data.mnist_idx import load_mnist_idx, read_idx_file, to_32x32x3
from jaxprune.data.pipeline import (
  eval_batches,
  holdout_indices,
  shard_indices,
  steps_per_epoch,
  train_dataset,
  train_iterator,
)
from jaxprune.data.registry import (
  ArraySource,
  DatasetInfo,
  available_datasets,
  get_info,
  load_arrays,
  open_split,
  register,
)

DEFAULT_DATASET = "cifar10_subset"

__all__ = [
  "ArraySource",
  "CorruptDataError",
  "DEFAULT_DATASET",
  "DataNotFoundError",
  "DatasetInfo",
  "available_datasets",
  "holdout_indices",
  "decode_cifar_records",
  "eval_batches",
  "get_info",
  "load_arrays",
  "load_cifar10_binary",
  "load_cifar100_binary",
  "load_mnist_idx",
  "normalize",
  "open_split",
  "random_crop_flip",
  "random_resized_crop",
  "read_cifar_binary_file",
  "read_idx_file",
  "register",
  "resize_bilinear",
  "resize_center_crop",
  "shard_indices",
  "steps_per_epoch",
  "to_32x32x3",
  "train_dataset",
  "train_iterator",
]
