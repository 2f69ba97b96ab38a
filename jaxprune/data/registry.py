"""Data sets by name: their info and how to open each split.

=====================  ========================================================
name                   source
=====================  ========================================================
``cifar10_subset``     shipped real CIFAR-10 subset (5,085 / 1,017), the default
``mnist_subset``       shipped real MNIST subset (4,000 / 1,000), 28x28x1
``mnist_subset_32x3``  the same digits zero-padded to 32x32 and repeated to 3
                       channels, for CIFAR-shaped models (mask transfer)
``multimnist``         two shipped MNIST digits overlaid in 36x36x1, labels
                       ``[N, 2]`` (left, right digit); see ``multimnist``
``multimnist3``        the same with a third task, the digit sum (19 classes)
``cifar10``            ``data_dir/cifar-10-batches-bin`` (official binary), else
                       tfds ``cifar10`` prepared in ``data_dir``
``cifar100``           ``data_dir/cifar-100-binary`` (fine labels), else tfds
``imagenet2012``       tfds ``imagenet2012`` prepared in ``data_dir``
=====================  ========================================================
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from jaxprune.data import assets, cifar_binary, mnist_idx, multimnist
from jaxprune.data.errors import DataNotFoundError

Split = Literal["train", "test"]

# Per-channel statistics of the training sets, in [0, 1] pixel units.
# CIFAR-10 std is the true per-pixel std (0.247, 0.243, 0.261), not the
# (0.2023, 0.1994, 0.2010) that is often copied from an old bug.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
# The multimnist train split (seed 0, max_shift 2): two digits per 36x36 canvas.
MULTIMNIST_MEAN = (0.1464,)
MULTIMNIST_STD = (0.3245,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a data set (no files are read to build it).

  ``train_size``/``test_size`` are those of the canonical data; a local
  ``data_dir`` holding something else is read as it is.
  ``image_shape`` is the model input ``(H, W, C)`` the pipelines yield.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  train_size: int
  test_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  shipped: bool = False
  description: str = ""


class RecordSource(Protocol):
  """Random-access source of ``(image uint8 [H, W, C], label)`` records."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class ArraySource:
  """In-memory images ``[N, H, W, C]`` uint8 and labels ``[N]`` int32."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    # Read-only: the arrays are cached and shared by every pipeline.
    images.flags.writeable = False
    labels.flags.writeable = False
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.int32]:
    return self.images[index], self.labels[index]


Loader = Callable[[Split, "Path | None"], RecordSource]


@dataclasses.dataclass(frozen=True)
class _Spec:
  info: DatasetInfo
  loader: Loader
  # Train augmentation: "cifar" (pad-4 crop + flip), "shift2"/"shift4"
  # (pad-k crop, no flip: digits must not be mirrored), "imagenet".
  augment: str


_REGISTRY: dict[str, _Spec] = {}


def available_datasets() -> tuple[str, ...]:
  """Names accepted by :func:`get_info` and the pipelines.

  Example:
    >>> "cifar10_subset" in available_datasets()
    True
  """
  return tuple(_REGISTRY)


def _spec(name: str) -> _Spec:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown data set {name!r}; valid names: {', '.join(available_datasets())}") from None


def get_info(name: str) -> DatasetInfo:
  """Returns the :class:`DatasetInfo` of a registered data set.

  Example:
    >>> info = get_info("cifar10_subset")
    >>> info.num_classes, info.image_shape, info.train_size, info.test_size
    (10, (32, 32, 3), 5085, 1017)
  """
  return _spec(name).info


def augment_policy(name: str) -> str:
  """The train-augmentation policy name of a data set (see ``_Spec``)."""
  return _spec(name).augment


def _check_split(split: str) -> None:
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def open_split(name: str, split: Split = "train", *, data_dir: str | os.PathLike | None = None) -> RecordSource:
  """Opens one split as a random-access record source.

  In-memory data sets return an :class:`ArraySource` (cached: a second call
  does not reread the files); tfds ones a lazy record source.

  Raises:
    ValueError: unknown name or split.
    DataNotFoundError: the files are missing (the message says how to get
      them).

  Example:
    >>> len(open_split("cifar10_subset", "test"))
    1017
  """
  spec = _spec(name)
  _check_split(split)
  path = None if data_dir is None else Path(data_dir).expanduser().resolve()
  return _open_cached(name, split, path, spec.loader)


@functools.lru_cache(maxsize=16)
def _open_cached(name: str, split: Split, data_dir: Path | None, loader: Loader) -> RecordSource:
  source = loader(split, data_dir)
  if isinstance(source, ArraySource):
    check_arrays(_spec(name).info, split, source.images, source.labels)
  return source


def check_arrays(info: DatasetInfo, split: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Rejects a split the pipelines would train on silently wrong: empty, images
  not ``uint8 [N, *info.image_shape]`` (0..255, normalised by the pipelines),
  or labels outside ``[0, info.num_classes)`` (multi-task labels ``[N, T]``:
  negative ones). Each error says how to fix it.

  Example:
    >>> check_arrays(get_info("cifar10_subset"), "test", np.zeros((0, 32, 32, 3), np.uint8),
    ...              np.zeros((0,), np.int32))
    Traceback (most recent call last):
    ...
    ValueError: data set 'cifar10_subset' (test split) is empty: ...
  """
  where = f"data set {info.name!r} ({split} split)"
  if len(labels) == 0:
    raise ValueError(
      f"{where} is empty: its loader returned no records. Check the files "
      "in data_dir (or the arrays given to the loader)."
    )
  if images.dtype != np.uint8:
    hint = (
      "if they are floats in [0, 1], pass np.round(x * 255).astype(np.uint8)"
      if np.issubdtype(images.dtype, np.floating)
      else "convert them to uint8 (0..255)"
    )
    raise ValueError(
      f"{where}: images have dtype {images.dtype}; the pipelines read raw "
      f"uint8 pixels (0..255) and normalise them with the data set's mean/std: "
      f"{hint}."
    )
  if tuple(images.shape[1:]) != tuple(info.image_shape):
    raise ValueError(
      f"{where}: images have shape {images.shape[1:]} per record but its "
      f"DatasetInfo says {tuple(info.image_shape)} (H, W, C): fix the loader "
      "(grey images need a channel axis: x[..., None]; channels go last) or "
      "the DatasetInfo."
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"{where}: labels have dtype {labels.dtype}; they must be class indices (integers): np.asarray(y, np.int32)."
    )
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or (labels.ndim == 1 and high >= info.num_classes):
    raise ValueError(
      f"{where}: labels range over {low}..{high} but must lie in [0, "
      f"{info.num_classes}) (DatasetInfo.num_classes={info.num_classes}): "
      "remap them to 0..num_classes-1 or fix num_classes."
    )


def load_arrays(
  name: str,
  split: Split = "train",
  *,
  data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Whole split as read-only numpy arrays (raw uint8 images, int32 labels).

  Handy for calibration batches or statistics. Images are not normalised.
  Not available for ImageNet (variable image sizes; use the pipelines).

  Example:
    >>> x, y = load_arrays("mnist_subset_32x3", "test")
    >>> x.shape, y.dtype
    ((1000, 32, 32, 3), dtype('int32'))
  """
  source = open_split(name, split, data_dir=data_dir)
  if isinstance(source, ArraySource):
    return source.images, source.labels
  if _spec(name).augment == "imagenet":
    raise ValueError(f"{name} has variable-size images; iterate eval_batches() instead")
  # A tfds CIFAR: materialise once (60k small records, a few seconds).
  images = np.stack([source[i][0] for i in range(len(source))])
  labels = np.asarray([source[i][1] for i in range(len(source))], np.int32)
  return images, labels


def register(info: DatasetInfo, loader: Loader, augment: str) -> None:
  """Registers a data set; ``loader(split, data_dir)`` returns a source.

  Example:
    >>> register(dataclasses.replace(get_info("cifar10_subset"), name="x"),
    ...          lambda split, d: open_split("cifar10_subset", split), "cifar")
    >>> get_info("x").train_size
    5085
    >>> _ = _REGISTRY.pop("x")
  """
  if augment not in ("cifar", "shift2", "shift4", "imagenet", "none"):
    raise ValueError(f"unknown augmentation policy {augment!r}")
  _REGISTRY[info.name] = _Spec(info, loader, augment)


# ----------------------------------------------------------------------------
# Loaders.


def _shipped_dir_for(data_dir: Path | None, default: Path) -> Path:
  # The shipped sets ignore data_dir only when it is not given, so a user
  # can still point them at another copy (e.g. tests on a scratch copy).
  return default if data_dir is None else data_dir


def _cifar10_subset(split: Split, data_dir: Path | None) -> RecordSource:
  d = _shipped_dir_for(data_dir, assets.CIFAR10_SUBSET_DIR)
  return ArraySource(*cifar_binary.load_cifar10_binary(d, split))


def _mnist_subset(split: Split, data_dir: Path | None) -> RecordSource:
  d = _shipped_dir_for(data_dir, assets.MNIST_SUBSET_DIR)
  return ArraySource(*mnist_idx.load_mnist_idx(d, split))


def _mnist_subset_32x3(split: Split, data_dir: Path | None) -> RecordSource:
  d = _shipped_dir_for(data_dir, assets.MNIST_SUBSET_DIR)
  images, labels = mnist_idx.load_mnist_idx(d, split)
  return ArraySource(mnist_idx.to_32x32x3(images), labels)


def _default_data_dir() -> Path:
  from jaxprune.data import tfds_source  # light module; tfds stays unimported

  env = os.environ.get("JAXPRUNE_DATA_DIR")
  return Path(env).expanduser() if env else tfds_source.default_tfds_data_dir()


def _binary_or_tfds(
  binary_folder: str,
  binary_loader: Callable[[Path, Split], tuple],
  tfds_name: str,
  display: str,
  tarball: str,
) -> Loader:
  """cifar10/cifar100: official binary layout if present, else tfds."""

  def load(split: Split, data_dir: Path | None) -> RecordSource:
    from jaxprune.data import tfds_source  # pylint: disable=g-import-not-at-top

    root = data_dir if data_dir is not None else _default_data_dir()
    if cifar_binary.find_cifar_folder(root, binary_folder) is not None:
      return ArraySource(*binary_loader(root, split))
    if (root / tfds_name).is_dir():
      return tfds_source.tfds_source(tfds_name, split, root)
    raise DataNotFoundError(
      f"{display} not found in data_dir={root} (looked for "
      f"{root / binary_folder}/ in the official binary format and for a "
      f"tfds-prepared {root / tfds_name}/).\n"
      f"Either download '{tarball}' from {cifar_binary.CIFAR_URL} and "
      f"extract it into {root} (`tar xzf {tarball} -C {root}`), or run "
      f"`tfds build {tfds_name} --data_dir={root} "
      "--file_format=array_record` on a machine with internet and copy "
      "the folder here. Pass that folder as data_dir (or set "
      "$JAXPRUNE_DATA_DIR).\n"
      "Offline, use the shipped real subset instead: name='cifar10_subset'"
      " (5,085 train / 1,017 test CIFAR-10 images)."
    )

  return load


def _imagenet(split: Split, data_dir: Path | None) -> RecordSource:
  from jaxprune.data import tfds_source  # pylint: disable=g-import-not-at-top

  root = data_dir if data_dir is not None else _default_data_dir()
  return tfds_source.tfds_source("imagenet2012", "train" if split == "train" else "validation", root)


register(
  DatasetInfo(
    "cifar10_subset",
    10,
    (32, 32, 3),
    5085,
    1017,
    CIFAR10_MEAN,
    CIFAR10_STD,
    shipped=True,
    description="first 1,017 records of each official CIFAR-10 binary file (shipped)",
  ),
  _cifar10_subset,
  "cifar",
)
register(
  DatasetInfo(
    "mnist_subset",
    10,
    (28, 28, 1),
    4000,
    1000,
    MNIST_MEAN,
    MNIST_STD,
    shipped=True,
    description="5,000 real MNIST digits, 400/100 per class train/test (shipped)",
  ),
  _mnist_subset,
  "shift2",
)
register(
  DatasetInfo(
    "mnist_subset_32x3",
    10,
    (32, 32, 3),
    4000,
    1000,
    MNIST_MEAN * 3,
    MNIST_STD * 3,
    shipped=True,
    description="mnist_subset zero-padded to 32x32, grey repeated to RGB, for CIFAR-shaped models (shipped)",
  ),
  _mnist_subset_32x3,
  "shift4",
)
register(
  DatasetInfo(
    "multimnist",
    10,
    (36, 36, 1),
    4000,
    1000,
    MULTIMNIST_MEAN,
    MULTIMNIST_STD,
    shipped=True,
    description="mnist_subset digits overlaid in pairs (left, right), labels [N, 2]; num_classes is per task (shipped)",
  ),
  multimnist.loader(("left", "right")),
  "none",
)
register(
  DatasetInfo(
    "multimnist3",
    10,
    (36, 36, 1),
    4000,
    1000,
    MULTIMNIST_MEAN,
    MULTIMNIST_STD,
    shipped=True,
    description="multimnist with a third task, the digit sum (19 classes), labels [N, 3] (shipped)",
  ),
  multimnist.loader(("left", "right", "sum")),
  "none",
)
register(
  DatasetInfo(
    "cifar10",
    10,
    (32, 32, 3),
    50000,
    10000,
    CIFAR10_MEAN,
    CIFAR10_STD,
    description="full CIFAR-10 from data_dir (official binary or tfds)",
  ),
  _binary_or_tfds(
    cifar_binary.CIFAR10_FOLDER, cifar_binary.load_cifar10_binary, "cifar10", "CIFAR-10", cifar_binary.CIFAR10_TARBALL
  ),
  "cifar",
)
register(
  DatasetInfo(
    "cifar100",
    100,
    (32, 32, 3),
    50000,
    10000,
    CIFAR100_MEAN,
    CIFAR100_STD,
    description="full CIFAR-100 (fine labels) from data_dir (official binary or tfds)",
  ),
  _binary_or_tfds(
    cifar_binary.CIFAR100_FOLDER,
    cifar_binary.load_cifar100_binary,
    "cifar100",
    "CIFAR-100",
    cifar_binary.CIFAR100_TARBALL,
  ),
  "cifar",
)
register(
  DatasetInfo(
    "imagenet2012",
    1000,
    (224, 224, 3),
    1281167,
    50000,
    IMAGENET_MEAN,
    IMAGENET_STD,
    description="ILSVRC-2012 through tfds in data_dir; 'test' is the 50k validation split",
  ),
  _imagenet,
  "imagenet",
)
