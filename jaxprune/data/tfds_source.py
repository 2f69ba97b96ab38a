"""Random-access sources over data sets prepared with tensorflow-datasets.

Used for the full ``cifar10`` / ``cifar100`` / ``imagenet2012`` when a user has
prepared them with tfds. Random access (needed by grain's global shuffle and
exact resume) requires the ``array_record`` file format, which tfds reads
without TensorFlow.

``tensorflow_datasets`` is imported inside :func:`tfds_source` only, so the
default path (shipped subsets, CIFAR binary files) never imports tfds or TF.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.data.errors import DataNotFoundError

# How to get each data set into a tfds data_dir; the tfds name is the key.
_PREPARE_HINTS = {
  "imagenet2012": (
    "ImageNet cannot be downloaded automatically: put the official "
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
    "https://image-net.org/) in {data_dir}/downloads/manual/, then run "
    "`tfds build imagenet2012 --data_dir={data_dir} "
    "--file_format=array_record`."
  ),
}
_DEFAULT_HINT = (
  "On a machine with internet access run `tfds build {name} "
  "--data_dir={data_dir} --file_format=array_record` and copy {data_dir} "
  "here."
)


def default_tfds_data_dir() -> Path:
  """tfds' own default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


class TfdsRecordSource:
  """``(image uint8 [H, W, C], label int)`` records of a tfds data source.

  Satisfies grain's random-access source protocol (``__len__`` and
  ``__getitem__``), so it plugs into ``grain.MapDataset.source``.
  """

  def __init__(self, source: Any, image_key: str = "image", label_key: str = "label"):
    self._source = source
    self._image_key = image_key
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    record = self._source[index]
    image = np.asarray(record[self._image_key], dtype=np.uint8)
    if image.ndim == 2:  # grey images (a few ImageNet JPEGs are grey)
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    return image, int(record[self._label_key])


def tfds_source(name: str, split: str, data_dir: str | Path | None = None) -> TfdsRecordSource:
  """Opens a prepared tfds data set for random access, without downloading.

  Args:
    name: tfds name, e.g. ``"cifar10"``, ``"cifar100"``, ``"imagenet2012"``.
    split: tfds split name, e.g. ``"train"``, ``"test"``, ``"validation"``.
    data_dir: the tfds data directory; ``None`` for tfds' default.

  Raises:
    DataNotFoundError: the data set is not prepared in ``data_dir``, or was
      prepared as TFRecord (not randomly accessible); the message says how
      to prepare it.

  Example:
    >>> src = tfds_source("cifar10", "test", "~/tensorflow_datasets")  # doctest: +SKIP
    >>> image, label = src[0]  # doctest: +SKIP
  """
  data_dir = Path(data_dir).expanduser() if data_dir else default_tfds_data_dir()
  hint = _PREPARE_HINTS.get(name, _DEFAULT_HINT).format(name=name, data_dir=data_dir)
  fallback = (
    " Or use a data set shipped with jaxprune, which needs no download: name='cifar10_subset' or 'mnist_subset'."
  )
  if not data_dir.is_dir():
    raise DataNotFoundError(
      f"tfds data_dir {data_dir} does not exist, so tfds data set '{name}' is not prepared there. {hint}{fallback}"
    )
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"Reading '{name}' through tfds needs `pip install "
      "tensorflow-datasets array_record` (TensorFlow is not required)."
    ) from e
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise DataNotFoundError(
      f"tfds data set '{name}' is not prepared in {data_dir} (no "
      f"{builder.data_dir}/dataset_info.json). {hint}{fallback}"
    )
  file_format = str(getattr(builder.info, "file_format", ""))
  if "array_record" not in file_format.lower():
    raise DataNotFoundError(
      f"tfds data set '{name}' in {builder.data_dir} is stored as "
      f"{file_format or 'an unknown format'}, which cannot be read by "
      "random access. Rebuild it with `tfds build "
      f"{name} --data_dir={data_dir} --file_format=array_record` (or "
      "convert it with `tfds convert_format`)."
    )
  if split not in builder.info.splits:
    raise ValueError(f"tfds data set '{name}' has splits {list(builder.info.splits)}, not {split!r}")
  return TfdsRecordSource(builder.as_data_source(split=split))
